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
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere in the repository
    sys.path.insert(0, ROOT)

# (name, label, optimizer.name, model.norm_scale, model.embed_proj): the paper's ablation rows.
ARMS = (
    ("adam", "Adam", "adamw", "channel", False),
    ("muon", "Muon", "muon", "channel", False),
    ("muon_ssnorm", "Muon + SSNorm", "muon", "single", False),
    ("osp", "Muon + SSNorm + EmbProj (OSP)", "muon", "single", True),
)
# (key, W,A,KV bits, extra osp_jax.evaluate flags, column title)
SETTINGS = (
    ("w16a16kv16", "16,16,16", (), "16-16-16"),
    ("w4a16kv16", "4,16,16", (), "4-16-16 (W only)"),
    ("w4a16kv16_clip", "4,16,16", ("--clip-search",), "4-16-16, MSE clip"),
    ("w16a4kv16", "16,4,16", (), "16-4-16 (A only)"),
    ("w4a4kv4", "4,4,4", (), "4-4-4"),
    ("w4a4kv4_had", "4,4,4", ("--hadamard=ffn",), "4-4-4 + FFN Had."),
    # osp_jax.ptq's other methods; GPTQ calibrates on 128 sequences of the run's training split.
    ("w4a4kv4_quarot", "4,4,4", ("--method=quarot",), "4-4-4 QuaRot"),
    ("w4a4kv4_gptq", "4,4,4", ("--method=gptq",), "4-4-4 GPTQ"),
    ("w4a4kv4_quarot_gptq", "4,4,4", ("--method=quarot+gptq",), "4-4-4 QuaRot + GPTQ"),
)
# The settings the sweep's shorter runs are evaluated at (the columns of the sweep tables).
SWEEP_SETTINGS = ("w16a16kv16", "w4a16kv16", "w16a4kv16", "w4a4kv4", "w4a4kv4_had")

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


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = platform.processor() or ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
        except OSError:
            pass
        return f"CPU ({cpu or 'unknown'}), {os.cpu_count()} cores visible, jax {jax.__version__}"
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}"


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

    out = os.path.join(args.out, "data")
    corpus = args.corpus or preset["corpus"]
    if not glob.glob(corpus):
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
        kept = sorted(glob.glob(os.path.join(out or "", "**", "data_metadata.json"), recursive=True))
        if not (REPORT_ONLY and kept):
            raise
        meta = _read_json(kept[0])
    return int(meta["splits"]["train"]["tokens"])


REPORT_ONLY = False  # --report-only: never train or evaluate; report what is on disk


def run(config, workdir: str) -> dict | None:
    """Trains (resuming if interrupted; skipping if done); returns a summary with the wall time.
    With --report-only, returns the summary of a finished run or None."""
    from osp_jax.train import train

    done = os.path.join(workdir, "done.json")
    if REPORT_ONLY:
        return _read_json(done) if os.path.exists(done) else None
    if os.path.exists(done):
        saved = _read_json(os.path.join(workdir, "config.json"))
        want = (config.optimizer.learning_rate, config.train.steps, config.train.seed)
        have = (saved["optimizer"]["learning_rate"], saved["train"]["steps"], saved["train"]["seed"])
        if have == want:
            return _read_json(done)
        # A wider sweep chose another rate (or --steps or --seed changed): keep the old run aside, train afresh.
        aside = f"{workdir}.lr{have[0]:g}_s{have[1]}" + (f"_seed{have[2]}" if have[2] != want[2] else "")
        log.warning("%s was trained with lr %g, %d steps, seed %d; moved to %s", workdir, *have, aside)
        os.replace(workdir, aside)
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
        path = os.path.join(workdir, f"{prefix}_{key}.json")
        if REPORT_ONLY and not os.path.exists(path):
            continue
        if not os.path.exists(path):
            argv = [f"--workdir={workdir}", f"--data={data_path}", f"--bits={bits}", f"--output={path}",
                    f"--max-tokens={max_tokens}", f"--batch-size={batch_size}", *flags]
            log.info("python -m osp_jax.evaluate %s", " ".join(argv))
            t0 = time.time()
            if evaluate.main(argv) != 0:
                raise RuntimeError(f"evaluate failed for {workdir} at {bits}")
            log.info("  %.1f s", time.time() - t0)
        out[key] = _read_json(path)
    return out


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
            rec["eval"] = evaluate_all(os.path.join(out, "sweep", f"{rec['arm']}_lr{rec['lr']:g}"),
                                       data_path, eval_tokens, batch_size, few)


# ---------------------------------------------------------------------------------------------- report
def plot_curves(runs: dict, prefix: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, log_y in (("kurtosis", "excess kurtosis (mean over layers)", False),
                               ("max_abs", "max |activation| (residual stream)", True)):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for (name, label, *_), rows in runs.items():
            pts = [(r["tokens"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot([t / 1e6 for t in x], y, marker="o", ms=3, label=label)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{prefix}_{key}.png"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(x, spec=".2f") -> str:
    if x is None or (isinstance(x, str)):
        return str(x) if x is not None else "–"
    return f"{x:{spec}}" if math.isfinite(x) else str(x)


def report(args, preset, info: dict, sweep: list, chosen: dict, results: dict, curves: dict, plots: list,
           wall_s: float) -> str:
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.doc)))
    linear = any("linear_inputs" in results[a[0]]["w16a16kv16"] for a in ARMS)
    L = [f"## `{args.preset}`: {info['label']}", ""]
    L += [f"- Date: {info['date']}; git commit `{info['commit']}`{info['dirty']}; device: {info['device']}.",
          f"- Command: `{info['command']}` (wall time of the whole script: {wall_s / 60:.1f} min"
          f"{', resumed: earlier steps not counted' if info.get('resumed') else ''}).",
          f"- Model: dim {info['model']['dim']}, {info['model']['layers']} layers, {info['model']['heads']} heads "
          f"({info['model']['kv_heads']} KV), SwiGLU {info['model']['ffn_dim']}, vocabulary "
          f"{info['model']['vocab_size']}; {info['params'] / 1e6:.2f} M parameters (Adam arm; EmbProj adds "
          f"{2 * info['model']['dim'] ** 2 / 1e6:.2f} M). Compute dtype {info['model']['dtype']}.",
          f"- Data: `{info['data']}` ({info['train_tokens'] / 1e6:.2f} M training tokens). Every compared run: "
          f"{info['steps']} steps x {info['batch']} sequences x {info['seq_len']} tokens = "
          f"{info['tokens'] / 1e6:.3f} M tokens = **{info['epochs']:.3f} epoch**"
          + (" — more than one epoch: memorisation is part of what is compared." if info['epochs'] > 1 else
             " (within one epoch)."),
          f"- Schedule: linear warmup {info['warmup']} steps, cosine to 0.1x; weight decay 0.1; clip 1.0; "
          f"seed {info['seed']}. Evaluation: `osp_jax.evaluate` on {info['eval_tokens']:,} tokens of the "
          f"validation split (whole held-out documents), float32; round-to-nearest W per output channel "
          f"(symmetric; \"MSE clip\": each channel's clip ratio searched over 1.0-0.5 for the least weight "
          f"error), A per token and KV in groups of 128 (asymmetric). QuaRot (`--method=quarot`): norm gains "
          f"folded, residual stream rotated by a random Hadamard matrix (seed 0), values and (online) queries/"
          f"keys per head, FFN Hadamard online; then the same quantisers. GPTQ (`--method=gptq`): the same "
          f"weight grid, rounded by GPTQ layer by layer on 128 sequences of {info['seq_len']} tokens of the "
          f"run's training split (dampening 0.01, blocks of 128, no act order); A and KV as above.", ""]

    if len(info["lrs"]) < 2:  # --lrs with one value: no sweep was run
        L += ["### Learning rate", "", f"No sweep: every arm trained at lr {info['lrs'][0]:g} (`--lrs`).", ""]
    else:
        L += _sweep_table(info, sweep, chosen)

    L += ["### Ablation table", "",
          "Excess kurtosis and max |activation| of the residual stream (embedding output and every layer's "
          "output) on the evaluation tokens at the end of training; perplexity at W-A-KV bits.", "",
          "| model | lr | excess kurtosis | max \\|act\\| | " + " | ".join(s[3] for s in SETTINGS) + " |"
          + (" kurtosis (max \\|x\\|) at q/k/v / down-proj inputs |" if linear else ""),
          "|---|---:|---:|---:|" + "---:|" * len(SETTINGS) + ("---:|" if linear else "")]
    for arm in ARMS:
        name, label = arm[0], arm[1]
        r = results[name]
        fp = r["w16a16kv16"]
        L.append(f"| {label} | {chosen[name]:g} | {fp['kurtosis']:.3f} | {fp['max_abs']:.1f} | "
                 + " | ".join(_fmt(r[s[0]]["quant_ppl"]) for s in SETTINGS) + " |"
                 + (f" {_linear_inputs_cell(fp)} |" if linear else ""))
    L += ["", "Perplexity relative to the same model at 16-16-16 (how much each quantisation costs):", "",
          "| model | " + " | ".join(s[3] for s in SETTINGS[1:]) + " | train wall time |",
          "|---|" + "---:|" * (len(SETTINGS) - 1) + "---:|"]
    for arm in ARMS:
        name, label = arm[0], arm[1]
        r = results[name]
        base = r["w16a16kv16"]["quant_ppl"]
        L.append(f"| {label} | " + " | ".join(f"{r[s[0]]['quant_ppl'] / base:.3f}x" for s in SETTINGS[1:])
                 + f" | {info['wall'][name]:.0f} s |")
    evaluated = [s for s in sweep if "eval" in s]
    if evaluated:
        L += ["", f"The sweep's shorter runs ({info['sweep_steps']} steps), evaluated the same way: quantisation "
              "cost against 16-bit quality, to separate the optimizer from how far training got:", "",
              "| arm | lr | excess kurtosis | max \\|act\\| | 16-16-16 | 4-4-4 | 4-4-4 + FFN Had. |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for s in sorted(evaluated, key=lambda s: (s["arm"], s["lr"])):
            e = s["eval"]
            base = e["w16a16kv16"]["quant_ppl"]
            label = dict((a[0], a[1]) for a in ARMS)[s["arm"]]
            L.append(f"| {label} | {s['lr']:g} | {e['w16a16kv16']['kurtosis']:.3f} | "
                     f"{e['w16a16kv16']['max_abs']:.1f} | {base:.2f} | "
                     f"{e['w4a4kv4']['quant_ppl']:.2f} ({e['w4a4kv4']['quant_ppl'] / base:.3f}x) | "
                     f"{e['w4a4kv4_had']['quant_ppl']:.2f} ({e['w4a4kv4_had']['quant_ppl'] / base:.3f}x) |")
    L += ["", "Per-layer excess kurtosis / max |activation| (0 = embedding output):", "",
          "| model | kurtosis per layer | max \\|act\\| per layer |", "|---|---|---|"]
    for arm in ARMS:
        fp = results[arm[0]]["w16a16kv16"]
        L.append(f"| {arm[1]} | {' '.join(f'{v:.3f}' for v in fp['kurtosis_per_layer'])} | "
                 f"{' '.join(f'{v:.1f}' for v in fp['max_abs_per_layer'])} |")
    L += ["", "### Curves over training", "",
          f"Logged every {info['outlier_every']} steps on one fixed validation batch "
          f"({info['batch']} x {info['seq_len']} tokens) by `osp_jax.train`.", "",
          f"![excess kurtosis over training]({rel(plots[0])})", "",
          f"![max |activation| over training]({rel(plots[1])})", ""]
    L += ["Final training loss / validation loss (train's fixed batches): " + "; ".join(
        f"{a[1]} {_fmt(info['final'][a[0]]['loss'], '.3f')} / {_fmt(info['final'][a[0]]['val_loss'], '.3f')}"
        for a in ARMS) + ".", ""]
    return "\n".join(L)


def _count_params(model_config) -> int:
    from osp_jax.model import abstract_params, count_params

    return count_params(abstract_params(model_config))


def _linear_inputs_cell(fp) -> str:
    """Excess kurtosis (max |x|) at the q/k/v and down-projection inputs: what the activation quantiser sees."""
    li = (fp or {}).get("linear_inputs")
    if not li:
        return "–"
    return " / ".join(f"{li[k]['kurtosis']:.2f} ({li[k]['max_abs']:.0f})" for k in ("qkv_in", "down_in"))


def report_sweep(args, info: dict, sweep: list, chosen: dict, plots: list) -> str:
    """The sweep stage's report: every run at the sweep's length, the four arms at their chosen rates."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.doc)))  # noqa: E731
    labels = dict((a[0], a[1]) for a in ARMS)
    m = info["model"]
    tokens = info["sweep_steps"] * info["batch"] * info["seq_len"]
    # Evaluations since the linear-input statistics were added carry them: a column only then.
    linear = any("linear_inputs" in (r.get("eval", {}).get("w16a16kv16") or {}) for r in sweep)
    L = [f"## `{args.preset}`, sweep stage: {info['label']}", "",
         f"- Date: {info['date']}; git commit `{info['commit']}`; device: {info['device']}.",
         f"- Command: `{info['command']}`.",
         f"- Model: dim {m['dim']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), SwiGLU "
         f"{m['ffn_dim']}, vocabulary {m['vocab_size']}; {info['params'] / 1e6:.2f} M parameters (Adam arm; "
         f"EmbProj adds {2 * m['dim'] ** 2 / 1e6:.2f} M). Compute dtype {m['dtype']}.",
         f"- Every run: {info['sweep_steps']} steps x {info['batch']} x {info['seq_len']} tokens = "
         f"{tokens / 1e6:.2f} M tokens = **{tokens / info['train_tokens']:.3f} epoch** of "
         f"{info['train_tokens'] / 1e6:.2f} M training tokens; warmup {info['warmup']} steps, cosine to 0.1x; "
         f"weight decay 0.1; clip 1.0; seed {info['seed']}.",
         f"- Swept ({', '.join(l for _, l in info['swept'])}): peak rates {', '.join(f'{x:g}' for x in info['lrs'])}, "
         "the same for the AdamW and the Muon groups (Muon's update is RMS-matched). The other arms ran at "
         "the Muon arm's best rate. Best = lowest final validation loss.",
         "- Evaluation: `osp_jax.evaluate` on the validation split, float32; round-to-nearest W per output "
         "channel (symmetric), A per token and KV in groups of 128 (asymmetric); ratio = perplexity / the "
         "same model's 16-16-16 perplexity.", "",
         "| arm | lr | val loss | excess kurtosis | max \\|act\\| | ppl 16-16-16 | 4-16-16 (W only) | 16-4-16 (A only) "
         "| 4-4-4 | 4-4-4 + FFN Had. | tokens/s |" + (" kurtosis (max \\|x\\|) at q/k/v / down-proj inputs |" if linear else ""),
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if linear else "")]
    order = {a[0]: i for i, a in enumerate(ARMS)}
    for rec in sorted(sweep, key=lambda r: (order[r["arm"]], r["lr"])):
        e = rec.get("eval", {})
        fp = e.get("w16a16kv16")
        star = " **(best)**" if chosen.get(rec["arm"]) == rec["lr"] else ""
        def q(key):
            if key not in e or not fp:
                return "not run"
            return f"{e[key]['quant_ppl']:.2f} ({e[key]['quant_ppl'] / fp['quant_ppl']:.3f}x)"
        tps = (rec.get("summary") or {}).get("tokens_per_sec")
        L.append(f"| {labels[rec['arm']]} | {rec['lr']:g}{star} | {_fmt(rec['val_loss'], '.4f')} | "
                 + (f"{fp['kurtosis']:.3f} | {fp['max_abs']:.1f} | {fp['quant_ppl']:.2f}" if fp else "– | – | –")
                 + f" | {q('w4a16kv16')} | {q('w16a4kv16')} | {q('w4a4kv4')} | {q('w4a4kv4_had')} | {_fmt(tps, ',.0f')} |"
                 + (f" {_linear_inputs_cell(fp)} |" if linear else ""))
    edges = [labels[a] for a, _ in info["swept"] if chosen[a] in (min(info["lrs"]), max(info["lrs"]))]
    if edges and len(info["lrs"]) > 1:
        L += ["", f"Best rate at the edge of the grid for: {', '.join(edges)} (a wider sweep may find a better one)."]
    L += ["", "Per-layer excess kurtosis / max |activation| at each arm's best rate (0 = embedding output):", "",
          "| model | kurtosis per layer | max \\|act\\| per layer |", "|---|---|---|"]
    for arm in ARMS:
        rec = next((r for r in sweep if r["arm"] == arm[0] and r["lr"] == chosen[arm[0]]), None)
        fp = (rec or {}).get("eval", {}).get("w16a16kv16")
        if fp:
            L.append(f"| {arm[1]} | {' '.join(f'{v:.2f}' for v in fp['kurtosis_per_layer'])} | "
                     f"{' '.join(f'{v:.0f}' for v in fp['max_abs_per_layer'])} |")
    L += ["", f"Curves at each arm's best rate (logged every {info['outlier_every']} steps on one fixed "
          f"validation batch by `osp_jax.train`):", "",
          f"![excess kurtosis over training]({rel(plots[0])})", "",
          f"![max |activation| over training]({rel(plots[1])})", ""]
    return "\n".join(L)


def write_section(doc: str, preset: str, body: str) -> None:
    """Replaces this preset's section of `doc` (between markers), keeping everything else."""
    begin, end = f"<!-- ablation:{preset}:begin -->", f"<!-- ablation:{preset}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else (
        "# The OSP ablation, reproduced small\n\n"
        "Made by `experiments/ablation.py` (see `experiments/README.md`). Each section below is one preset;\n"
        "the text between its markers is regenerated by the script, the rest is written by hand.\n\n")
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(doc + ".tmp", doc)


# ---------------------------------------------------------------------------------------------- main
def _sweep_table(info, sweep, chosen) -> list[str]:
    """The report's learning-rate sweep: validation loss of every swept arm at every rate."""
    L = ["### Learning-rate sweep", "",
          f"Each rate on {info['sweep_steps']} steps ({info['sweep_fraction']:.2f} of the run, cosine to that "
          "end); the same rate for the AdamW and the Muon group (Muon's update is RMS-matched). Final validation "
          f"loss on {info['eval_batches']} fixed batches.", "",
          "| arm | " + " | ".join(f"lr {lr:g}" for lr in info["lrs"]) + " | chosen |",
          "|---|" + "---:|" * len(info["lrs"]) + "---:|"]
    for name, label in info["swept"]:
        cells = []
        for lr in info["lrs"]:
            v = next((s["val_loss"] for s in sweep if s["arm"] == name and s["lr"] == lr), None)
            cells.append(_fmt(v, ".4f") + (" (diverged)" if v is not None and not math.isfinite(v) else ""))
        edge = chosen[name] in (min(info["lrs"]), max(info["lrs"])) and len(info["lrs"]) > 1
        L.append(f"| {label} | " + " | ".join(cells) + f" | {chosen[name]:g}{' (edge of grid)' if edge else ''} |")
    L.append("")
    return L


def resolve_doc(parser, args, name: str) -> str:
    """--doc, else OUT/NAME: a trial run with other settings must not rewrite the repository's record
    (docs/ablation.md), which takes --doc=docs/ablation.md. --report-only writes nothing under --out, so
    it needs --doc."""
    if args.doc:
        doc = os.path.abspath(args.doc)
        if not os.path.exists(doc):  # e.g. --doc=docs/ablation.md given outside the repository's root
            print(f"{parser.prog}: --doc={args.doc} is {doc}, which does not exist yet: a new report starts there",
                  file=sys.stderr)
        return doc
    if args.report_only:
        parser.error("--report-only writes nothing under --out: pass --doc=FILE (docs/ablation.md rebuilds the record)")
    return os.path.join(args.out, name)


def _beside_doc(doc: str, preset_plots: str) -> str:
    """The preset's plot name (docs/ablation_PRESET) in --doc's directory."""
    return os.path.join(os.path.dirname(doc), os.path.basename(preset_plots))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)  # Orbax wants absolute checkpoint paths
    if args.report_only and args.stage != "sweep":
        p.error("--report-only works with --stage=sweep")
    args.doc = resolve_doc(p, args, "ablation.md")
    global REPORT_ONLY
    REPORT_ONLY = args.report_only

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("ablation", "osp_jax"):
        logging.getLogger(name).setLevel(logging.INFO)
    t_start = time.time()
    preset = PRESETS[args.preset]
    extra = _overrides(args.set)
    if not args.report_only:
        os.makedirs(args.out, exist_ok=True)

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
    lrs = _floats(args.lrs or preset["lrs"])
    fraction = args.sweep_fraction or preset["sweep_fraction"]
    sweep_steps = max(int(steps * fraction), 1)
    swept = [a for a in ARMS if args.sweep_each or a[0] in ("adam", "muon")]
    log.info("%d steps x %d tokens = %.3f M tokens = %.3f epoch of %s; sweep %s on %d steps",
             steps, per_step, steps * per_step / 1e6, steps * per_step / train_tokens, data_path, lrs, sweep_steps)

    # 2. learning-rate sweep
    sweep, chosen = [], {}
    for arm in swept:
        if len(lrs) == 1:
            chosen[arm[0]] = lrs[0]
            continue
        for lr in lrs:
            cfg = make_config(preset, data_path, arm, lr, sweep_steps, args.seed, extra)
            _add_sweep_run(sweep, arm, lr, run(cfg, os.path.join(args.out, "sweep", f"{arm[0]}_lr{lr:g}")))
        chosen[arm[0]] = min((x for x in sweep if x["arm"] == arm[0]), key=lambda x: x["val_loss"])["lr"]
    for arm in ARMS:
        chosen.setdefault(arm[0], chosen["muon"] if arm[2] == "muon" else chosen["adam"])
    if not REPORT_ONLY:  # --report-only reads --out and writes nothing there
        _write_json(os.path.join(args.out, "sweep.json"), {"sweep": sweep, "chosen": chosen})

    if args.stage == "sweep":
        # The arms that were not swept, at their chosen (the Muon arm's) rate and the sweep's length:
        # with the sweep's best runs, a complete short ablation at equal tokens.
        for arm in ARMS:
            if arm in swept:
                continue
            lr = chosen[arm[0]]
            cfg = make_config(preset, data_path, arm, lr, sweep_steps, args.seed, extra)
            _add_sweep_run(sweep, arm, lr, run(cfg, os.path.join(args.out, "sweep", f"{arm[0]}_lr{lr:g}")))
        if not args.no_eval_sweep:
            evaluate_sweep(sweep, args.out, data_path, args.eval_tokens or preset["eval_tokens"], preset["eval_batch"])
        if not REPORT_ONLY:
            _write_json(os.path.join(args.out, "sweep.json"), {"sweep": sweep, "chosen": chosen})
        curves = {arm: _metrics(os.path.join(args.out, "sweep", f"{arm[0]}_lr{chosen[arm[0]]:g}")) for arm in ARMS}
        plots = plot_curves(curves, (args.plots or _beside_doc(args.doc, preset["plots"])) + "_sweep")
        info = {
            "label": preset["label"], "device": args.device or _device(),
            "date": args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": args.commit or _git("rev-parse", "--short", "HEAD"),
            "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "model": probe.model.to_dict(), "params": _count_params(probe.model),
            "train_tokens": train_tokens, "sweep_steps": sweep_steps, "batch": probe.train.global_batch_size,
            "seq_len": probe.train.seq_len, "lrs": lrs, "swept": [(a[0], a[1]) for a in swept],
            "warmup": min(preset["optimizer"]["warmup_steps"], max(sweep_steps // 10, 1)),
            "outlier_every": probe.train.outlier_every, "seed": args.seed,
        }
        body = report_sweep(args, info, sweep, chosen, plots)
        write_section(args.doc, f"{args.preset}:sweep", body)
        print(body)
        log.info("--stage=sweep: chosen %s (%.1f min)", chosen, (time.time() - t_start) / 60)
        return 0

    # 3. the compared runs; 4. evaluation
    results, curves, final, wall = {}, {}, {}, {}
    for arm in ARMS:
        cfg = make_config(preset, data_path, arm, chosen[arm[0]], steps, args.seed, extra)
        workdir = os.path.join(args.out, arm[0])
        final[arm[0]] = run(cfg, workdir)
        wall[arm[0]] = final[arm[0]]["wall_s"]
        curves[arm] = _metrics(workdir)
    eval_tokens = args.eval_tokens or preset["eval_tokens"]
    for arm in ARMS:
        results[arm[0]] = evaluate_all(os.path.join(args.out, arm[0]), data_path, eval_tokens, preset["eval_batch"])

    # The sweep's shorter runs too: models of other 16-bit quality, to tell how much of a difference in
    # quantisation cost is the optimizer and how much is how far training got.
    if not args.no_eval_sweep:
        evaluate_sweep(sweep, args.out, data_path, eval_tokens, preset["eval_batch"])

    # 5. report
    from osp_jax.evaluate import load_checkpoint

    _, params, _ = load_checkpoint(os.path.join(args.out, "adam"), None)
    import jax
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    plots = plot_curves(curves, args.plots or _beside_doc(args.doc, preset["plots"]))
    cfg = make_config(preset, data_path, ARMS[0], chosen["adam"], steps, args.seed, extra)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "label": preset["label"], "date": args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "commit": args.commit or _git("rev-parse", "--short", "HEAD"),
        "dirty": " (plus uncommitted changes in the working tree)" if dirty and dirty != "unknown" and not args.commit
                 else "",
        "device": _device(), "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "model": cfg.model.to_dict(), "params": n_params, "data": data_path, "train_tokens": train_tokens,
        "steps": steps, "batch": cfg.train.global_batch_size, "seq_len": cfg.train.seq_len,
        "tokens": steps * per_step, "epochs": steps * per_step / train_tokens, "warmup": cfg.optimizer.warmup_steps,
        "seed": args.seed, "eval_tokens": results["adam"]["w16a16kv16"]["tokens"], "lrs": lrs,
        "sweep_steps": sweep_steps, "sweep_fraction": fraction, "eval_batches": cfg.train.eval_batches,
        "swept": [(a[0], a[1]) for a in swept], "wall": wall, "final": final,
        "outlier_every": cfg.train.outlier_every,
        "resumed": any(os.path.getmtime(f) < t_start for f in glob.glob(os.path.join(args.out, "**", "done.json"),
                                                                          recursive=True)),
    }
    body = report(args, preset, info, sweep, chosen, results, curves, plots, time.time() - t_start)
    write_section(args.doc, args.preset, body)
    _write_json(os.path.join(args.out, "ablation.json"), {"info": info, "sweep": sweep, "chosen": chosen,
                                                         "results": results})
    print(body)
    log.info("wrote %s and %s (%.1f min)", args.doc, ", ".join(plots), (time.time() - t_start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
