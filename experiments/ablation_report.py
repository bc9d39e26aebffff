"""The ablation's report: what it compares (the arms, its rows; the quantisation settings, its columns), the
markdown sections of docs/ablation.md, their tables, and the plots of the curves over training.

`experiments/ablation.py` trains and evaluates; this module only reads what that left (dicts, metrics rows)
and writes the report. Every file goes through `etils.epath` / `osp_jax.cli`, so --doc and --plots may be
gs:// paths; a figure is drawn to memory and written whole.
"""
from __future__ import annotations

import datetime
import io
import math
import os
import platform
import posixpath
import re
import subprocess
import sys

from etils import epath

from osp_jax import cli, storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# ---------------------------------------------------------------------------------------------- provenance, where
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


def _today(args) -> str:
    return args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def resolve_doc(parser, args, name: str) -> str:
    """--doc, else OUT/NAME: a trial run with other settings must not rewrite the repository's record
    (docs/ablation.md), which takes --doc=docs/ablation.md. --report-only writes nothing under --out, so
    it needs --doc."""
    if args.doc:
        doc = storage.normalized(args.doc)
        if not storage.exists(doc):  # e.g. --doc=docs/ablation.md given outside the repository's root
            print(f"{parser.prog}: --doc={args.doc} is {doc}, which does not exist yet: a new report starts there",
                  file=sys.stderr)
        return doc
    if args.report_only:
        parser.error("--report-only writes nothing under --out: pass --doc=FILE (docs/ablation.md rebuilds the record)")
    return os.fspath(epath.Path(args.out) / name)


def _beside_doc(doc: str, preset_plots: str) -> str:
    """The preset's plot name (docs/ablation_PRESET) in --doc's directory."""
    return os.fspath(epath.Path(doc).parent / epath.Path(preset_plots).name)


# ---------------------------------------------------------------------------------------------- files
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
        write_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_figure(fig, path) -> None:
    """`fig` drawn to memory and written whole at `path` (local or gs://; its format from the suffix), its
    directory made: no half-written file."""
    image = io.BytesIO()
    fig.savefig(image, format=epath.Path(path).suffix[1:] or None, dpi=110)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    cli.write_bytes_atomic(path, image.getvalue())


def link(path, doc) -> str:
    """`path` as a markdown link from the file `doc`: relative to its directory when both are on the local disk or
    in the same bucket, else the whole URL."""
    path, doc = os.fspath(path), os.fspath(doc)
    if not storage.is_remote(path) and not storage.is_remote(doc):
        return os.path.relpath(path, os.path.dirname(os.path.abspath(doc)))
    (where, _, name), (doc_where, _, doc_name) = (p.partition("://")[2].partition("/") for p in (path, doc))
    if storage.is_remote(path) and storage.is_remote(doc) and where == doc_where:
        return posixpath.relpath("/" + name, posixpath.dirname("/" + doc_name))
    return path


def write_section(doc: str, preset: str, body: str) -> None:
    """Replaces this preset's section of `doc` (between markers), keeping everything else."""
    begin, end = f"<!-- ablation:{preset}:begin -->", f"<!-- ablation:{preset}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = epath.Path(doc).read_text(encoding="utf-8") if storage.is_file(doc) else (
        "# The OSP ablation, reproduced small\n\n"
        "Made by `experiments/ablation.py` (see `experiments/README.md`). Each section below is one preset;\n"
        "the text between its markers is regenerated by the script, the rest is written by hand.\n\n")
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    epath.Path(doc).parent.mkdir(parents=True, exist_ok=True)
    cli.write_text_atomic(doc, text)


# ---------------------------------------------------------------------------------------------- tables
def _fmt(x, spec=".2f") -> str:
    if x is None or (isinstance(x, str)):
        return str(x) if x is not None else "–"
    return f"{x:{spec}}" if math.isfinite(x) else str(x)


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



def report(args, preset, info: dict, sweep: list, chosen: dict, results: dict, curves: dict, plots: list,
           wall_s: float) -> str:
    rel = lambda p: link(p, args.doc)  # noqa: E731
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
    rel = lambda p: link(p, args.doc)  # noqa: E731
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


