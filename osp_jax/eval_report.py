"""How `python -m osp_jax.evaluate` shows a record: the table it prints and the figure --plot draws."""
from __future__ import annotations

import io

import numpy as np
from etils import epath

from osp_jax import cli
from osp_jax.eval_data import EvalError


def format_table(r: dict) -> str:
    """The record as the CLI prints it: kurtosis and max |activation| a layer, then one row a number."""
    lines = [f"step {r['step']} | {r['tokens']:,} tokens | seq_len {r['seq_len']}",
             f"{'layer':>8} {'kurtosis':>12} {'max|act|':>12}"]
    for i, (k, m) in enumerate(zip(r["kurtosis_per_layer"], r["max_abs_per_layer"])):
        lines.append(f"{'embed' if i == 0 else i:>8} {k:>12.4f} {m:>12.4f}")
    method = r.get("method", "rtn")
    extras = "".join([f" {method}" if method != "rtn" else "", " +act order" if (r.get("calibration") or {}).get(
        "act_order") else "", " +FFN Had" if r["hadamard"] and "quarot" not in method else "",
        " +clip search" if r["clip_search"] else ""])
    rows = [("kurtosis (mean over layers)", f"{r['kurtosis']:.4f}"),
            ("max |activation|", f"{r['max_abs']:.4f}"),
            *((f"  at {name} (linear input): kurtosis / max", f"{v['kurtosis']:.4f} / {v['max_abs']:.4f}")
              for name, v in r.get("linear_inputs", {}).items()),
            ("perplexity", f"{r['ppl']:.4f}  (loss {r['loss']:.4f})"),
            (f"perplexity {r['setting']}{extras}", f"{r['quant_ppl']:.4f}  (loss {r['quant_loss']:.4f})")]
    width = max(len(label) for label, _ in rows)
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    """Per-layer kurtosis and max |activation| (log scale), two panels: the residual stream, and the
    q/k/v and down-projection inputs where the record has them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    layers = np.arange(len(r["kurtosis_per_layer"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(layers, r["kurtosis_per_layer"], marker="o", label="residual stream")
    ax1.set_ylabel("excess kurtosis")
    ax1.set_title(f"step {r['step']}: kurtosis {r['kurtosis']:.3g}, ppl {r['ppl']:.3g}, "
                  f"{r['setting']} ppl {r['quant_ppl']:.3g}")
    ax2.plot(layers, np.maximum(r["max_abs_per_layer"], 1e-12), marker="o", label="residual stream")
    # Inputs of layer l's linear layers, drawn at l (q/k/v reads the residual stream after layer l - 1).
    for name, label in (("qkv_in", "q/k/v input"), ("down_in", "down-proj input")):
        li = r.get("linear_inputs", {}).get(name)
        if li:
            x = np.arange(1, len(li["kurtosis_per_layer"]) + 1)
            ax1.plot(x, li["kurtosis_per_layer"], marker=".", linestyle="--", label=label)
            ax2.plot(x, np.maximum(li["max_abs_per_layer"], 1e-12), marker=".", linestyle="--", label=label)
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("max |activation|")
    ax2.set_xlabel("layer (residual stream: after it, 0 = embedding; linear inputs: inside it)")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()  # drawn whole, then written at once: no half-written file, and gs:// works
    fig.savefig(image, format=epath.Path(path).suffix[1:] or None, dpi=120)
    plt.close(fig)
    cli.write_bytes_atomic(path, image.getvalue())


def check_plot_format(path: str) -> None:
    """EvalError unless matplotlib draws --plot's suffix (no suffix: PNG)."""
    from matplotlib.figure import Figure

    suffix = epath.Path(path).suffix[1:].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise EvalError(f"--plot={path}: matplotlib cannot draw a .{suffix} file; expected one of "
                        f"{', '.join(sorted(formats))} (or no suffix: PNG)")
