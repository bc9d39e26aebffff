"""The paper's ablation, reproduced small: Adam -> Muon -> +SSNorm -> +EmbProj, equal tokens, then 4-bit.

    python experiments/ablation.py --preset=cpu_tiny --out=runs/ablation_cpu            # ~15 min, 2 CPU cores
    python experiments/ablation.py --preset=gpu_124m --out=runs/ablation                # one GPU

Steps, in order (each skipped when its output is already complete, so a re-run resumes):
1. data: `data.path=builtin`, or `python -m osp_jax.data.prepare` of --corpus into OUT/data;
2. learning-rate sweep: every rate in --lrs, for the Adam arm and the Muon arm, on --sweep-fraction of
   the steps (same warmup, cosine to the shorter end); the lowest final validation loss wins. Muon's
   update is RMS-matched to AdamW, so both optimisers sweep the same rates. The Muon arm's rate is used
   by all three Muon arms unless --sweep-each gives every arm its own sweep;
3. the four compared runs, equal tokens, with kurtosis / max |activation| logged every outlier_every;
4. `osp_jax.evaluate` of each at W16A16KV16, W4A16KV16 (round-to-nearest, and with the per-channel
   MSE clip search), W16A4KV16, W4A4KV4, W4A4KV4 + FFN Hadamard, and W4A4KV4 by QuaRot, GPTQ and
   QuaRot + GPTQ (`--method`, osp_jax.ptq);
   then the sweep's shorter runs at the same settings but the clip search and the other methods
   (quantisation cost against 16-bit quality);
5. the report: a section of docs/ablation.md (between `<!-- ablation:PRESET:begin/end -->` markers;
   text outside the markers, such as interpretation, is kept) and two plots of the curves.

--tokens (or --epochs) sets the training tokens of every compared run; the report states the fraction of
an epoch of the training split that this is, and flags runs that pass one epoch.

--out, --doc and --plots may be gs:// paths (checked at start: the bucket, the credentials, a write). This
module trains and evaluates; experiments/ablation_report.py writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):  # run as a script from anywhere in the repository; ablation_report beside it
    if _path not in sys.path:
        sys.path.insert(0, _path)

from etils import epath  # noqa: E402

from ablation_report import (  # noqa: E402,F401  (re-exported: epochs.py and older callers use abl.NAME)
    ARMS, SETTINGS, SWEEP_SETTINGS, _beside_doc, _count_params, _device, _fmt, _git, _linear_inputs_cell, _sweep_table,
    _today, link, plot_curves, report, report_sweep, resolve_doc, write_figure, write_section)
from osp_jax import cli, storage  # noqa: E402

PRESETS = {
    # 2 CPU cores: ~1.8 M parameters on the built-in corpus (2.82 M training tokens).
    "cpu_tiny": dict(
        label="CPU, 2 cores, tiny model, built-in corpus — not the paper's scale",
        corpus=None, data="builtin", tokenizer=None,
        model=dict(vocab_size=4096, dim=128, layers=4, heads=4, kv_heads=2, ffn_dim=352,
                   dtype="float32", remat="none"),
        train=dict(global_batch_size=16, seq_len=128, log_every=10, eval_every=50, eval_batches=8,
                   outlier_every=20, checkpoint_every=0, tensorboard=False),
        optimizer=dict(warmup_steps=10),
        steps=150, lrs="1e-3,3e-3,1e-2,3e-2", sweep_fraction=0.44, eval_tokens=32768, eval_batch=8,
        plots="docs/ablation",
    ),
    # One GPU: GPT-2-small shape (~110 M parameters with a 16k vocabulary) on shared/corpus
    # (~30 M training tokens with train:16384): default one pass over 0.95 of the training split.
    "gpu_124m": dict(
        label="1 GPU, GPT-2-small shape (~110 M parameters), shared/corpus prose + Python, < 1 epoch",
        corpus="/work/shared/corpus/*.jsonl.xz", data=None, tokenizer="train:16384",
        model=dict(vocab_size=16384, dim=768, layers=12, heads=12, kv_heads=12, ffn_dim=2048,
                   dtype="bfloat16", remat="none"),
        train=dict(global_batch_size=16, seq_len=1024, log_every=20, eval_every=100, eval_batches=16,
                   outlier_every=50, checkpoint_every=250, tensorboard=False),  # resumable if cut off
        optimizer=dict(warmup_steps=100),
        epochs=0.95, lrs="5e-4,1e-3,2e-3,4e-3", sweep_fraction=1 / 3, eval_tokens=1 << 20, eval_batch=16,
        plots="docs/ablation_gpu_124m",
    ),
}

log = logging.getLogger("ablation")


# ---------------------------------------------------------------------------------------------- helpers
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _join(base, *names: str) -> str:
    """`base`/NAME/...: a local path or a gs:// URL, as a string."""
    return os.fspath(epath.Path(base).joinpath(*names))


def _read_json(path):
    return cli.read_json(path, error=FileNotFoundError)


def _write_json(path, obj) -> None:
    """`obj` as indented JSON (non-finite numbers as JSON's Infinity/NaN, as a diverged run's loss), written
    whole; the directory made."""
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    cli.write_text_atomic(path, json.dumps(obj, indent=2))


def _metrics(workdir) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _overrides(pairs: list[str]) -> dict:
    """--set model.dim=256 -> {"model.dim": 256} (values parsed as JSON where they parse, else strings)."""
    out = {}
    for p in pairs:
        key, _, value = p.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = {"True": True, "False": False}.get(value, value)
    return out


# ---------------------------------------------------------------------------------------------- config
def make_config(preset: dict, data_path: str, arm: tuple, lr: float, steps: int, seed: int, extra: dict):
    from osp_jax import config as config_lib

    _, _, opt, norm, embproj = arm
    c = config_lib.defaults()
    for section in ("model", "train", "optimizer"):
        for k, v in preset[section].items():
            c[section][k] = v
    c.model.norm_scale, c.model.embed_proj = norm, embproj
    c.optimizer.name = opt
    c.optimizer.learning_rate = lr        # AdamW group (all leaves for adamw; embedding/head/norms for muon)
    c.optimizer.muon_learning_rate = lr   # RMS-matched Muon update: the same rate
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(steps // 10, 1))
    c.train.steps = steps
    c.train.seed = seed
    c.data.path = data_path
    for key, value in extra.items():
        section, _, name = key.partition(".")
        c[section][name] = value
    return config_lib.validate(c)


# ---------------------------------------------------------------------------------------------- steps
def prepare_data(preset: dict, args) -> str:
    if args.data:
        return args.data
    if preset["data"] == "builtin" and not args.corpus:
        return "builtin"
    from osp_jax.data import prepare

    out = _join(args.out, "data")
    corpus = args.corpus or preset["corpus"]
    if not storage.glob(corpus):
        sys.exit(f"ablation: --corpus={corpus!r} matches no file")
    cmd = ["--input", corpus, "--output", out, "--tokenizer", args.tokenizer or preset["tokenizer"],
           "--val-fraction", str(args.val_fraction), "--workers", str(args.workers)]
    log.info("python -m osp_jax.data.prepare %s", shlex.join(cmd))
    if prepare.main(cmd) != 0:
        sys.exit("ablation: data preparation failed")
    return out


def train_tokens_in(data_path: str, out: str | None = None) -> int:
    """Training tokens of the prepared data; with --report-only (the data may be elsewhere) the copy
    of its metadata that `osp_jax.train` keeps in each run's workdir serves as well."""
    from osp_jax.data import pipeline

    try:
        meta = pipeline.load_metadata(pipeline.resolve_data_dir(data_path))
    except FileNotFoundError:
        kept = storage.glob(_join(out or "", "**", "data_metadata.json"))
        if not (REPORT_ONLY and kept):
            raise
        meta = _read_json(kept[0])
    return int(meta["splits"]["train"]["tokens"])


REPORT_ONLY = False  # --report-only: never train or evaluate; report what is on disk


def run(config, workdir: str) -> dict | None:
    """Trains (resuming if interrupted; skipping if done); returns a summary with the wall time.
    With --report-only, returns the summary of a finished run or None."""
    from osp_jax.train import train

    done = _join(workdir, "done.json")
    if REPORT_ONLY:
        return _read_json(done) if storage.is_file(done) else None
    if storage.is_file(done):
        saved = _read_json(_join(workdir, "config.json"))
        want = (config.optimizer.learning_rate, config.train.steps, config.train.seed)
        have = (saved["optimizer"]["learning_rate"], saved["train"]["steps"], saved["train"]["seed"])
        if have == want:
            return _read_json(done)
        # A wider sweep chose another rate (or --steps or --seed changed): keep the old run aside, train afresh.
        aside = f"{workdir}.lr{have[0]:g}_s{have[1]}" + (f"_seed{have[2]}" if have[2] != want[2] else "")
        log.warning("%s was trained with lr %g, %d steps, seed %d; moved to %s", workdir, *have, aside)
        storage.uncached(workdir).rename(aside)  # on gs://, every object copied by the server, then deleted
    log.info("train %s (%d steps, optimizer %s, lr %.3g, norm %s, embed_proj %s)", workdir, config.train.steps,
             config.optimizer.name, config.optimizer.learning_rate, config.model.norm_scale, config.model.embed_proj)
    t0 = time.time()
    last = train(config, workdir)
    rows = _metrics(workdir)
    if not rows or rows[-1]["step"] != config.train.steps:  # e.g. stopped by SIGTERM: not done
        raise RuntimeError(f"{workdir} stopped before step {config.train.steps}; re-run to resume")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    summary = {"steps": config.train.steps, "wall_s": time.time() - t0, "loss": last.get("loss"),
               "val_loss": vals[-1] if vals else None, "tokens": last.get("tokens"),
               "tokens_per_sec": last.get("tokens_per_sec"),
               "finite": all(math.isfinite(r.get("loss", float("nan"))) for r in rows)}
    _write_json(done, summary)
    return summary


def evaluate_all(workdir: str, data_path: str, max_tokens: int, batch_size: int, settings=SETTINGS,
                 prefix: str = "eval") -> dict:
    from osp_jax import evaluate

    out = {}
    for key, bits, flags, _ in settings:
        path = _join(workdir, f"{prefix}_{key}.json")
        made = storage.is_file(path)
        if REPORT_ONLY and not made:
            continue
        if not made:
            argv = [f"--workdir={workdir}", f"--data={data_path}", f"--bits={bits}", f"--output={path}",
                    f"--max-tokens={max_tokens}", f"--batch-size={batch_size}", *flags]
            log.info("python -m osp_jax.evaluate %s", " ".join(argv))
            t0 = time.time()
            if evaluate.main(argv) != 0:
                raise RuntimeError(f"evaluate failed for {workdir} at {bits}")
            log.info("  %.1f s", time.time() - t0)
        out[key] = _read_json(path)
    return out


def _sweep_dir(out: str, arm_name: str, lr: float) -> str:
    return _join(out, "sweep", f"{arm_name}_lr{lr:g}")


def _add_sweep_run(sweep: list, arm: tuple, lr: float, summary: dict | None) -> None:
    """Appends a finished sweep run (a diverged one at +inf validation loss); None (--report-only, not
    run) adds nothing."""
    if summary is None:
        return
    v = summary["val_loss"] if summary["finite"] and summary["val_loss"] is not None else float("inf")
    sweep.append({"arm": arm[0], "lr": lr, "val_loss": v, "summary": summary})


def evaluate_sweep(sweep: list, out: str, data_path: str, eval_tokens: int, batch_size: int) -> None:
    """The SWEEP_SETTINGS for every finite sweep run (into each record's "eval"): with the arms the sweep
    stage adds, the issue's whole table at the sweep's length."""
    few = [s for s in SETTINGS if s[0] in SWEEP_SETTINGS]
    for rec in sweep:
        if rec["val_loss"] is not None and math.isfinite(rec["val_loss"]):
            rec["eval"] = evaluate_all(_sweep_dir(out, rec["arm"], rec["lr"]), data_path, eval_tokens, batch_size, few)


# ---------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Plan:
    """What one invocation trains: the data, the compared runs' length and the sweep."""
    preset: dict
    extra: dict
    data_path: str
    train_tokens: int
    probe: object       # the Adam arm's config: the shapes and batch every arm shares
    steps: int
    lrs: list
    fraction: float
    sweep_steps: int
    swept: list

    @property
    def per_step(self) -> int:
        return self.probe.train.global_batch_size * self.probe.train.seq_len

    def config(self, args, arm: tuple, lr: float, steps: int):
        return make_config(self.preset, self.data_path, arm, lr, steps, args.seed, self.extra)


def make_plan(args) -> Plan:
    preset = PRESETS[args.preset]
    extra = _overrides(args.set)
    data_path = args.data if args.report_only and args.data else prepare_data(preset, args)
    train_tokens = train_tokens_in(data_path, args.out)
    probe = make_config(preset, data_path, ARMS[0], 1e-3, 100, args.seed, extra)
    per_step = probe.train.global_batch_size * probe.train.seq_len
    if args.steps:
        steps = args.steps
    elif args.tokens:
        steps = int(args.tokens // per_step)
    elif args.epochs or preset.get("epochs"):
        steps = int((args.epochs or preset["epochs"]) * train_tokens // per_step)
    else:
        steps = preset["steps"]
    fraction = args.sweep_fraction or preset["sweep_fraction"]
    plan = Plan(preset, extra, data_path, train_tokens, probe, steps, _floats(args.lrs or preset["lrs"]), fraction,
                max(int(steps * fraction), 1), [a for a in ARMS if args.sweep_each or a[0] in ("adam", "muon")])
    log.info("%d steps x %d tokens = %.3f M tokens = %.3f epoch of %s; sweep %s on %d steps", steps, per_step,
             steps * per_step / 1e6, steps * per_step / train_tokens, data_path, plan.lrs, plan.sweep_steps)
    return plan


def lr_sweep(args, plan: Plan) -> tuple[list, dict]:
    """Step 2: every rate for every swept arm at the sweep's length; the best rate of each arm (the unswept
    Muon arms take the Muon arm's)."""
    sweep, chosen = [], {}
    for arm in plan.swept:
        if len(plan.lrs) == 1:
            chosen[arm[0]] = plan.lrs[0]
            continue
        for lr in plan.lrs:
            cfg = plan.config(args, arm, lr, plan.sweep_steps)
            _add_sweep_run(sweep, arm, lr, run(cfg, _sweep_dir(args.out, arm[0], lr)))
        chosen[arm[0]] = min((x for x in sweep if x["arm"] == arm[0]), key=lambda x: x["val_loss"])["lr"]
    for arm in ARMS:
        chosen.setdefault(arm[0], chosen["muon"] if arm[2] == "muon" else chosen["adam"])
    if not REPORT_ONLY:  # --report-only reads --out and writes nothing there
        _write_json(_join(args.out, "sweep.json"), {"sweep": sweep, "chosen": chosen})
    return sweep, chosen


# ---------------------------------------------------------------------------------------------- stages
def _command() -> str:
    return "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])


def sweep_stage(args, plan: Plan, sweep: list, chosen: dict, t_start: float) -> int:
    """--stage=sweep: the arms that were not swept, at their chosen (the Muon arm's) rate and the sweep's
    length: with the sweep's best runs, a complete short ablation at equal tokens; evaluated and reported."""
    for arm in ARMS:
        if arm in plan.swept:
            continue
        lr = chosen[arm[0]]
        cfg = plan.config(args, arm, lr, plan.sweep_steps)
        _add_sweep_run(sweep, arm, lr, run(cfg, _sweep_dir(args.out, arm[0], lr)))
    if not args.no_eval_sweep:
        evaluate_sweep(sweep, args.out, plan.data_path, args.eval_tokens or plan.preset["eval_tokens"],
                       plan.preset["eval_batch"])
    if not REPORT_ONLY:
        _write_json(_join(args.out, "sweep.json"), {"sweep": sweep, "chosen": chosen})
    curves = {arm: _metrics(_sweep_dir(args.out, arm[0], chosen[arm[0]])) for arm in ARMS}
    plots = plot_curves(curves, (args.plots or _beside_doc(args.doc, plan.preset["plots"])) + "_sweep")
    probe = plan.probe
    info = {
        "label": plan.preset["label"], "device": args.device or _device(), "date": _today(args),
        "commit": args.commit or _git("rev-parse", "--short", "HEAD"), "command": _command(),
        "model": probe.model.to_dict(), "params": _count_params(probe.model),
        "train_tokens": plan.train_tokens, "sweep_steps": plan.sweep_steps, "batch": probe.train.global_batch_size,
        "seq_len": probe.train.seq_len, "lrs": plan.lrs, "swept": [(a[0], a[1]) for a in plan.swept],
        "warmup": min(plan.preset["optimizer"]["warmup_steps"], max(plan.sweep_steps // 10, 1)),
        "outlier_every": probe.train.outlier_every, "seed": args.seed,
    }
    body = report_sweep(args, info, sweep, chosen, plots)
    write_section(args.doc, f"{args.preset}:sweep", body)
    print(body)
    log.info("--stage=sweep: chosen %s (%.1f min)", chosen, (time.time() - t_start) / 60)
    return 0


def compare_stage(args, plan: Plan, sweep: list, chosen: dict, t_start: float) -> int:
    """Steps 3-5: the compared runs at equal tokens, their evaluations (and the sweep's), the report."""
    results, curves, final, wall = {}, {}, {}, {}
    for arm in ARMS:
        workdir = _join(args.out, arm[0])
        final[arm[0]] = run(plan.config(args, arm, chosen[arm[0]], plan.steps), workdir)
        wall[arm[0]] = final[arm[0]]["wall_s"]
        curves[arm] = _metrics(workdir)
    eval_tokens = args.eval_tokens or plan.preset["eval_tokens"]
    for arm in ARMS:
        results[arm[0]] = evaluate_all(_join(args.out, arm[0]), plan.data_path, eval_tokens, plan.preset["eval_batch"])
    # The sweep's shorter runs too: models of other 16-bit quality, to tell how much of a difference in
    # quantisation cost is the optimizer and how much is how far training got.
    if not args.no_eval_sweep:
        evaluate_sweep(sweep, args.out, plan.data_path, eval_tokens, plan.preset["eval_batch"])

    import jax

    from osp_jax.evaluate import load_checkpoint

    _, params, _ = load_checkpoint(_join(args.out, "adam"), None)
    plots = plot_curves(curves, args.plots or _beside_doc(args.doc, plan.preset["plots"]))
    cfg = plan.config(args, ARMS[0], chosen["adam"], plan.steps)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tokens = plan.steps * plan.per_step
    info = {
        "label": plan.preset["label"], "date": _today(args),
        "commit": args.commit or _git("rev-parse", "--short", "HEAD"),
        "dirty": " (plus uncommitted changes in the working tree)" if dirty and dirty != "unknown" and not args.commit
                 else "",
        "device": args.device or _device(), "command": _command(),
        "model": cfg.model.to_dict(), "params": sum(int(x.size) for x in jax.tree.leaves(params)),
        "data": plan.data_path, "train_tokens": plan.train_tokens,
        "steps": plan.steps, "batch": cfg.train.global_batch_size, "seq_len": cfg.train.seq_len,
        "tokens": tokens, "epochs": tokens / plan.train_tokens, "warmup": cfg.optimizer.warmup_steps,
        "seed": args.seed, "eval_tokens": results["adam"]["w16a16kv16"]["tokens"], "lrs": plan.lrs,
        "sweep_steps": plan.sweep_steps, "sweep_fraction": plan.fraction, "eval_batches": cfg.train.eval_batches,
        "swept": [(a[0], a[1]) for a in plan.swept], "wall": wall, "final": final,
        "outlier_every": cfg.train.outlier_every,
        "resumed": any(storage.stat(f)[1] < t_start * 1e9 for f in storage.glob(_join(args.out, "**", "done.json"))),
    }
    body = report(args, plan.preset, info, sweep, chosen, results, curves, plots, time.time() - t_start)
    write_section(args.doc, args.preset, body)
    _write_json(_join(args.out, "ablation.json"), {"info": info, "sweep": sweep, "chosen": chosen, "results": results})
    print(body)
    log.info("wrote %s and %s (%.1f min)", args.doc, ", ".join(plots), (time.time() - t_start) / 60)
    return 0


# ---------------------------------------------------------------------------------------------- main
def check_paths(parser, args, files: tuple[str, ...] = ()) -> None:
    """Exit 2 with one line, before anything is trained, unless a gs:// --out can be written (with --report-only,
    read) and a gs:// --doc and the file paths of `files` can be written: the bucket, the credentials, a probe."""
    outputs = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in ("--doc", *files)}
    out = {"--out": args.out}
    reads, writes = (out, outputs) if args.report_only else ({}, {**out, **outputs})
    try:
        storage.check_all(reads=reads, writes=writes, files=tuple(outputs))
    except cli.UserError as e:
        cli.die(parser.prog, f"error: {e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", required=True, help="directory for data, runs and evaluations")
    p.add_argument("--corpus", default=None, help="glob of .jsonl[.xz] files (default: the preset's)")
    p.add_argument("--data", default=None, help="an already prepared data directory, or 'builtin'")
    p.add_argument("--tokenizer", default=None, help="for prepare: PATH or train:VOCAB (default: the preset's)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out (prepare)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="prepare's tokenizer processes")
    p.add_argument("--tokens", type=float, default=None, help="training tokens of every compared run")
    p.add_argument("--epochs", type=float, default=None, help="... or as a fraction of the training split")
    p.add_argument("--steps", type=int, default=None, help="... or as optimizer steps")
    p.add_argument("--lrs", default=None, help="comma-separated peak rates to sweep (default: the preset's); "
                                               "one value: no sweep")
    p.add_argument("--sweep-fraction", type=float, default=None, help="sweep runs' length / the full run's")
    p.add_argument("--sweep-each", action="store_true", help="sweep every arm, not only Adam and Muon")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens per evaluation (default: the preset's)")
    p.add_argument("--no-eval-sweep", action="store_true", help="do not evaluate the sweep's checkpoints")
    p.add_argument("--stage", choices=("all", "sweep"), default="all",
                   help="'sweep': the learning-rate sweep, then the arms that were not swept at the Muon "
                        "arm's best rate and the sweep's length, all evaluated and reported as a short "
                        "ablation of its own; a later run with the same --out goes on from there")
    p.add_argument("--report-only", action="store_true",
                   help="with --stage=sweep: train and evaluate nothing, report the runs found under --out "
                        "(e.g. results copied back from an accelerator machine)")
    p.add_argument("--device", default=None, help="device written in the report (default: this machine's)")
    p.add_argument("--commit", default=None, help="commit written in the report (default: this checkout's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set=model.layers=6")
    p.add_argument("--doc", default=None,
                   help="report file, its PRESET section rewritten (default: OUT/ablation.md; the repository's "
                        "record is --doc=docs/ablation.md)")
    p.add_argument("--plots", default=None, help="plot path prefix (default: the preset's plot name, next to --doc)")
    p.add_argument("--date", default=None, help="date written in the report (default: today, UTC)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.out = storage.normalized(args.out)  # Orbax wants absolute checkpoint paths; a gs:// URL as it is
    if args.report_only and args.stage != "sweep":
        p.error("--report-only works with --stage=sweep")
    check_paths(p, args, ("--plots",))
    args.doc = resolve_doc(p, args, "ablation.md")
    global REPORT_ONLY
    REPORT_ONLY = args.report_only

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("ablation", "osp_jax"):
        logging.getLogger(name).setLevel(logging.INFO)
    t_start = time.time()
    if not args.report_only:
        epath.Path(args.out).mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    sweep, chosen = lr_sweep(args, plan)
    stage = sweep_stage if args.stage == "sweep" else compare_stage
    return stage(args, plan, sweep, chosen, t_start)


if __name__ == "__main__":
    sys.exit(main())
