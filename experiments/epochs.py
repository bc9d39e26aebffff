"""Past one epoch: does training on the same tokens again change what 4-bit quantisation costs?

    python experiments/epochs.py --preset=cpu_tiny --out=runs/epochs_cpu --train-tokens=4e5 --epochs=1,2,4
    python experiments/epochs.py --preset=gpu_124m --out=runs/epochs --epochs=1,3 --lrs=adam:1e-3,osp:4e-3

The OSP issue's probe saw an OSP model lose more to round-to-nearest 4-bit than an Adam model after
several epochs over a small corpus; memorisation is one of the explanations it names. This script
separates it from the others: the same arms as `experiments/ablation.py`, at fixed learning rates, each
trained for every epoch count in --epochs over the same training subset (one run per count, each with
its whole warmup + cosine schedule, so a 1-epoch model is not a 4-epoch model caught mid-schedule),
then evaluated with `osp_jax.evaluate` at 16-16-16, 4-16-16, 16-4-16 and 4-4-4 on held-out documents.

Steps (each skipped when its output exists, so a re-run resumes):
1. the subset: whole training documents of the corpus, taken evenly across it until about
   --train-tokens, plus every validation document (the corpus's `split` field, else every 50th
   document of each file), into OUT/subset.jsonl; `osp_jax.data.prepare` makes OUT/data;
2. the runs, OUT/ARM_epE, with `osp_jax.train` (memorisation shows as train loss below validation loss);
3. the evaluations (eval_*.json in each run), the report section `<!-- ablation:PRESET:NAME:... -->`
   of docs/ablation.md (--name, default "epochs") and a plot of each arm's 4-bit cost and perplexity
   against epochs.

Epoch counts below one make the same script a token-count study within one epoch (`--name=tokens`).
--out, --corpus, --doc and --plot may be gs:// paths (--out and the outputs checked at start).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ablation as abl  # noqa: E402  (the arms, presets, training and evaluation steps)
from etils import epath  # noqa: E402

from osp_jax import cli, storage  # noqa: E402

ROOT = abl.ROOT
SETTINGS = tuple(s for s in abl.SETTINGS if s[0] in ("w16a16kv16", "w4a16kv16", "w16a4kv16", "w4a4kv4"))
DEFAULT_LR = {"cpu_tiny": 1e-2, "gpu_124m": 4e-3}  # the rates the presets' sweeps chose (docs/ablation.md)
TRAIN_PROBE = "train_probe.jsonl"  # training documents, evaluated like the held-out ones
VAL_EVERY = 50  # without a `split` field: every 50th document of a file is held out

log = logging.getLogger("epochs")


# ---------------------------------------------------------------------------------------------- data
def _documents(files: list[str]):
    """{"text", "split"} for every valid document, read by osp_jax.data.sources (so .xz/.gz/.zst, the
    split field and malformed-record skips work as in `prepare`); without a split field, every 50th
    document of a file is held out."""
    from osp_jax.data import sources

    for inp in sources.expand_inputs(files):
        for i, doc in enumerate(sources.read_documents(inp)):
            split = doc.split or ("validation" if i % VAL_EVERY == VAL_EVERY // 2 else "train")
            yield {"text": doc.text, "split": split}


def _write_jsonl(path: str, docs: list[dict]) -> None:
    cli.write_text_atomic(path, "".join(json.dumps(d) + "\n" for d in docs))


def make_subset(files: list[str], out: str, train_chars: float, probe_docs: int = 64) -> dict:
    """OUT/subset.jsonl: every validation document and about `train_chars` of training text, taken as
    every k-th training document so that each source keeps its share. OUT/train_probe.jsonl: about
    `probe_docs` of those training documents, spread across the subset, for measuring what the model
    memorised. Written atomically; returns counts."""
    docs = list(_documents(files))
    train = [d for d in docs if d["split"] == "train"]
    val = [d for d in docs if d["split"] == "validation"]
    if not train or not val:
        raise SystemExit(f"epochs: {files} hold {len(train)} training and {len(val)} validation documents; "
                         "both are needed")
    total = sum(len(d["text"]) for d in train)
    stride = max(1, round(total / train_chars)) if math.isfinite(train_chars) else 1
    chosen = train[::stride]
    _write_jsonl(abl._join(out, TRAIN_PROBE), chosen[::max(1, len(chosen) // probe_docs)])
    _write_jsonl(abl._join(out, "subset.jsonl"), chosen + val)
    return {"train_docs": len(chosen), "train_chars": sum(len(d["text"]) for d in chosen), "val_docs": len(val),
            "stride": stride}


def prepare(args, preset: dict) -> str:
    from osp_jax.data import pipeline, prepare as prepare_lib

    out = abl._join(args.out, "data")
    made = abl._join(args.out, "subset.json")
    if storage.is_file(abl._join(out, "metadata.json")) and storage.is_file(made):
        asked = abl._read_json(made).get("asked_train_tokens")
        if asked is not None and asked != args.train_tokens:
            raise SystemExit(f"epochs: {out} holds a subset made for --train-tokens={asked:g}, not "
                             f"{args.train_tokens:g}; use another --out")
        return out
    if args.corpus:
        files = storage.glob(args.corpus)
    elif preset["data"] == "builtin":
        files = [pipeline.builtin_files()[0]]
    else:
        files = storage.glob(preset["corpus"])
    if not files:
        raise SystemExit(f"epochs: --corpus={args.corpus or preset['corpus']!r} matches no file")
    tokenizer = args.tokenizer or preset["tokenizer"] or pipeline.builtin_files()[1]
    # Characters for the token target: ~4 per token for BPE on English and code; the report uses the
    # prepared split's exact token count, so the estimate only sets the subset's size.
    counts = make_subset(files, args.out, args.train_tokens * args.chars_per_token)
    log.info("subset: %s", counts)
    argv = ["--input", abl._join(args.out, "subset.jsonl"), "--output", out, "--tokenizer", tokenizer,
            "--workers", str(args.workers), "--quiet"]
    log.info("python -m osp_jax.data.prepare %s", shlex.join(argv))
    if prepare_lib.main(argv) != 0:
        raise SystemExit("epochs: data preparation failed")
    abl._write_json(made, {**counts, "asked_train_tokens": args.train_tokens})  # last: the subset is complete
    return out


# ---------------------------------------------------------------------------------------------- report
def _ratio(r: dict, key: str) -> float:
    """Perplexity at `key` over the same model's 16-16-16 perplexity; NaN if either was not run."""
    if key not in r or "w16a16kv16" not in r:
        return float("nan")
    return r[key]["quant_ppl"] / r["w16a16kv16"]["quant_ppl"]


def _cell(r: dict, key: str) -> str:
    return f"{r[key]['quant_ppl']:.2f} ({_ratio(r, key):.3f}x)" if key in r else "not run"


def plot(rows: list[dict], labels: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.4))
    for arm, label in labels.items():
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["epochs"])
        if not rs:
            continue
        x = [r["epochs"] for r in rs]
        line, = a1.plot(x, [_ratio(r["eval"], "w4a4kv4") for r in rs], marker="o", label=f"{label}: held out")
        a1.plot(x, [_ratio(r["train_eval"], "w4a4kv4") for r in rs], marker="s", ls="--", color=line.get_color(),
                label=f"{label}: training documents")
        a2.plot(x, [r["eval"]["w16a16kv16"]["quant_ppl"] for r in rs], marker="o", color=line.get_color(),
                label=f"{label}: held out")
        a2.plot(x, [r["train_eval"].get("w16a16kv16", {}).get("quant_ppl", math.nan) for r in rs], marker="s",
                ls="--", color=line.get_color(), label=f"{label}: training documents")
        # The cost against how good the model is: the comparison at matched quality.
        a3.plot([r["eval"]["w16a16kv16"]["quant_ppl"] for r in rs], [_ratio(r["eval"], "w4a4kv4") for r in rs],
                marker="o", color=line.get_color(), label=f"{label} (points: epoch counts)")
    a1.set_ylabel("4-4-4 perplexity / 16-bit perplexity")
    a2.set_ylabel("16-bit perplexity")
    a2.set_yscale("log")
    a3.set_xscale("log")
    a3.invert_xaxis()  # better models to the right
    a3.set_xlabel("held-out 16-bit perplexity (log, better to the right)")
    a3.set_ylabel("4-4-4 perplexity / 16-bit perplexity (held out)")
    for a in (a1, a2, a3):
        if a is not a3:
            a.set_xlabel("epochs over the training subset")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    abl.write_figure(fig, path)
    plt.close(fig)
    return path


def report(args, info: dict, rows: list[dict], plot_path: str, curves: list[str] = (),
           curve_epochs: dict | None = None) -> str:
    m = info["model"]
    labels = {a[0]: a[1] for a in abl.ARMS}
    rel = abl.link(plot_path, args.doc)
    title = ("past one epoch: memorisation and the 4-bit cost" if max(r["epochs"] for r in rows) > 1.01 else
             "within one epoch: training tokens and the 4-bit cost")
    L = [f"## `{args.preset}`, {title} (`--name={args.name}`)", "",
         f"- Date: {info['date']}; git commit `{info['commit']}`; device: {info['device']}.",
         f"- Command: `{info['command']}` (made by `experiments/epochs.py`).",
         f"- Model: dim {m['dim']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), SwiGLU "
         f"{m['ffn_dim']}, vocabulary {m['vocab_size']}; compute dtype {m['dtype']}.",
         f"- Data: {info['train_tokens'] / 1e6:.3f} M training tokens ({info['subset']['train_docs']} whole "
         f"documents taken evenly across {info['corpus']}); {info['batch']} x {info['seq_len']} tokens a step.",
         f"- One run per arm and epoch count, each with its own schedule (warmup, cosine to 0.1x over the "
         f"run); weight decay 0.1; clip 1.0; seed {info['seed']}; rates fixed, not swept here: "
         + ", ".join(f"{labels[a]} {lr:g}" for a, lr in info["lrs"].items()) + ".",
         f"- Evaluation (`osp_jax.evaluate`, float32, round-to-nearest as in the ablation): held out = "
         f"{info['eval_tokens']:,} tokens of validation documents; training documents = "
         f"{info['train_eval_tokens']:,} tokens of documents the model trained on (`{TRAIN_PROBE}`), which "
         "shows what it memorised. Ratios: perplexity / the same model's 16-16-16 perplexity on the same "
         "tokens.", "",
         "| arm | epochs | tokens | ppl train docs (4-4-4) | ppl held out | excess kurtosis | max \\|act\\| | "
         "kurtosis (max \\|x\\|) at q/k/v / down-proj inputs | 4-16-16 (W only) | 16-4-16 (A only) | 4-4-4 |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {a[0]: i for i, a in enumerate(abl.ARMS)}
    for r in sorted(rows, key=lambda r: (order[r["arm"]], r["epochs"])):
        e, fp, t = r["eval"], r["eval"]["w16a16kv16"], r["train_eval"]
        train_cell = "not run" if "w16a16kv16" not in t else (
            f"{t['w16a16kv16']['quant_ppl']:.2f} (" + (f"{_ratio(t, 'w4a4kv4'):.3f}x" if "w4a4kv4" in t
                                                     else "4-4-4 not run") + ")")
        L.append(f"| {labels[r['arm']]} | {r['epochs']:.3g} | {r['tokens'] / 1e6:.2f} M | {train_cell} | "
                 f"{fp['quant_ppl']:.2f} | {fp['kurtosis']:.3f} | {fp['max_abs']:.1f} | "
                 f"{abl._linear_inputs_cell(fp)} | " + " | ".join(_cell(e, k) for k in ("w4a16kv16", "w16a4kv16",
                                                                                          "w4a4kv4")) + " |")
    L += ["", f"![4-bit cost and perplexity against epochs, and the cost against perplexity]({rel})", ""]
    if curves:
        runs = ", ".join(f"{labels[a]} {ep:.3g} epochs" for a, ep in (curve_epochs or {}).items())
        L += [f"Over training, for each arm's longest run ({runs}; logged every `train.outlier_every` steps on "
              "one fixed validation batch by `osp_jax.train`):", ""]
        L += [f"![{epath.Path(c).name}]({abl.link(c, args.doc)})"
              for c in curves] + [""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- main
def _arm_rates(text: str | None, preset: str, arms: list[str]) -> dict:
    out = {a: DEFAULT_LR[preset] for a in arms}
    for part in (text or "").split(","):
        if part.strip():
            arm, _, lr = part.partition(":")
            if arm not in out:
                raise SystemExit(f"epochs: --lrs names arm {arm!r}, not one of --arms {arms}")
            out[arm] = float(lr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="epochs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(abl.PRESETS), required=True)
    p.add_argument("--out", required=True, help="directory for the subset, runs and evaluations")
    p.add_argument("--corpus", default=None, help="glob of .jsonl[.xz] files (default: the preset's)")
    p.add_argument("--tokenizer", default=None, help="PATH or train:VOCAB (default: the preset's)")
    p.add_argument("--train-tokens", type=float, default=float("inf"),
                   help="size of the training subset (default: every training document)")
    p.add_argument("--chars-per-token", type=float, default=4.0, help="to size the subset before tokenising")
    p.add_argument("--epochs", default="1,2,4", help="comma-separated epoch counts, one run each")
    p.add_argument("--arms", default="adam,osp", help=f"comma-separated, of {[a[0] for a in abl.ARMS]}")
    p.add_argument("--lrs", default=None, help="ARM:RATE,... (default: the rate the preset's sweep chose)")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens per evaluation (default: the preset's)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every run")
    p.add_argument("--doc", default=None,
                   help="report file, its PRESET:NAME section rewritten (default: OUT/ablation.md; the "
                        "repository's record is --doc=docs/ablation.md)")
    p.add_argument("--name", default="epochs", help="report section PRESET:NAME and plot name (default epochs)")
    p.add_argument("--plot", default=None, help="plot path (default: ablation_PRESET_NAME.png next to --doc)")
    p.add_argument("--prepare-only", action="store_true",
                   help="make OUT/data and the training-document probe, then stop (e.g. to carry them to a GPU)")
    p.add_argument("--date", default=None, help="date written in the report (default: today, UTC)")
    p.add_argument("--commit", default=None, help="commit written in the report (default: this checkout's)")
    p.add_argument("--device", default=None, help="device written in the report (default: this machine's)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: report the runs and evaluations found in --out (e.g. "
                        "results brought back from a GPU without their checkpoints); a missing one is 'not run'")
    args = p.parse_args(argv)
    args.out = storage.normalized(args.out)  # Orbax wants absolute checkpoint paths; a gs:// URL as it is
    abl.check_paths(p, args, ("--plot",))
    args.doc = abl.resolve_doc(p, args, "ablation.md")
    arms = [a for a in args.arms.split(",") if a]
    by_name = {a[0]: a for a in abl.ARMS}
    if unknown := [a for a in arms if a not in by_name]:
        p.error(f"--arms: unknown {unknown}; choose from {list(by_name)}")
    epochs = sorted(abl._floats(args.epochs))
    if not epochs or min(epochs) <= 0:
        p.error("--epochs: positive numbers, e.g. 1,2,4")
    if not args.train_tokens > 0:
        p.error("--train-tokens: a positive number")
    lrs = _arm_rates(args.lrs, args.preset, arms)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for name in ("epochs", "ablation", "osp_jax"):
        logging.getLogger(name).setLevel(logging.INFO)
    preset = abl.PRESETS[args.preset]
    epath.Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    abl.REPORT_ONLY = args.report_only
    data = abl._join(args.out, "data") if args.report_only else prepare(args, preset)
    train_tokens = abl.train_tokens_in(data, args.out)
    if args.prepare_only:
        log.info("prepared %s: %s training tokens; %s holds what the runs need (subset.jsonl is not needed)",
                 data, f"{train_tokens:,}", args.out)
        return 0
    extra = abl._overrides(args.set)
    extra.setdefault("train.checkpoint_every", 0)
    eval_tokens = args.eval_tokens or preset["eval_tokens"]
    trained_docs = abl._join(args.out, TRAIN_PROBE)

    probe_cfg = abl.make_config(preset, data, by_name[arms[0]], lrs[arms[0]], 1, args.seed, extra)
    per_step = probe_cfg.train.global_batch_size * probe_cfg.train.seq_len  # the same for every arm
    rows = []
    for arm in arms:
        for ep in epochs:
            steps = max(1, round(ep * train_tokens / per_step))
            cfg = abl.make_config(preset, data, by_name[arm], lrs[arm], steps, args.seed, extra)
            workdir = abl._join(args.out, f"{arm}_ep{ep:g}")
            if abl.run(cfg, workdir) is None:  # --report-only and never finished
                log.warning("%s: no finished run; left out of the report", workdir)
                continue
            ev = abl.evaluate_all(workdir, data, eval_tokens, preset["eval_batch"], SETTINGS)
            tr = abl.evaluate_all(workdir, trained_docs, eval_tokens, preset["eval_batch"],
                                  tuple(s for s in SETTINGS if s[0] in ("w16a16kv16", "w4a4kv4")), prefix="train")
            rows.append({"arm": arm, "epochs": steps * per_step / train_tokens, "steps": steps,
                         "tokens": steps * per_step, "lr": lrs[arm],
                         "eval": ev, "train_eval": tr, "workdir": workdir})

    info = {"date": args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": args.commit or abl._git("rev-parse", "--short", "HEAD"), "device": args.device or abl._device(),
            "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "model": probe_cfg.model.to_dict(), "train_tokens": train_tokens,
            "subset": abl._read_json(abl._join(args.out, "subset.json")),
            "corpus": args.corpus or preset["corpus"] or "the built-in corpus",
            "eval_tokens": rows[0]["eval"]["w16a16kv16"]["tokens"],
            "train_eval_tokens": next(r["train_eval"]["w16a16kv16"]["tokens"] for r in rows
                                     if "w16a16kv16" in r["train_eval"]),
            "batch": probe_cfg.train.global_batch_size, "seq_len": probe_cfg.train.seq_len, "lrs": lrs,
            "seed": args.seed}
    path = plot(rows, {a: by_name[a][1] for a in arms},
                args.plot or abl._join(epath.Path(args.doc).parent, f"ablation_{args.preset}_{args.name}.png"))
    # Kurtosis and max |activation| over training (logged by osp_jax.train), for each arm's longest run:
    # its last row, as each arm's rows follow the sorted epoch counts.
    longest = {r["arm"]: r for r in rows}
    logged = {by_name[a]: abl._metrics(r["workdir"]) for a, r in longest.items()}
    logged = {arm: m for arm, m in logged.items() if any("kurtosis" in r for r in m)}
    curves = abl.plot_curves(logged, os.fspath(epath.Path(path).with_suffix("")) + "_curves") if logged else []
    body = report(args, info, rows, path, curves, {a: r["epochs"] for a, r in longest.items()})
    abl.write_section(args.doc, f"{args.preset}:{args.name}", body)
    if not args.report_only:  # --report-only writes nothing into --out
        abl._write_json(abl._join(args.out, "epochs.json"), {"info": info, "rows": rows})
    print(body)
    log.info("wrote %s and %s (%.1f min)", args.doc, path, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
