"""`python -m osp_jax.plot --workdir=DIR [--output=FILE.png] [--compare=DIR2,DIR3]`

Training curves from `metrics.jsonl`: loss and validation loss, learning rate, excess kurtosis and
max |activation| of the residual stream (where `train.outlier_every` recorded them). With
`--compare`, the runs are drawn on the same axes, e.g. Adam against OSP.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from etils import epath

from osp_jax import cli, storage

PROG = "osp_jax.plot"

PANELS = (("loss", "training loss"), ("val_loss", "validation loss"), ("kurtosis", "excess kurtosis (mean over layers)"),
          ("max_abs", "max |activation|"), ("learning_rate", "learning rate"), ("tokens_per_sec", "tokens / s"))


def read_metrics(workdir: str) -> list[dict]:
    """Records of metrics.jsonl; a step logged twice (a resumed run) keeps its last record."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    by_step = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            cli.say(PROG, f"{path}:{line_no}: not JSON, skipped (a line cut off by a crash?)")
            continue
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot(workdirs: list[str], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {epath.Path(w).name or w: read_metrics(w) for w in workdirs}
    present = [(key, title) for key, title in PANELS
               if any(r.get(key) is not None for records in runs.values() for r in records)]
    cols = 2
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "max_abs":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend()
    fig.tight_layout()
    image = io.BytesIO()  # drawn whole, then written at once: no half-written file, and gs:// works
    fig.savefig(image, format=epath.Path(output).suffix[1:] or None, dpi=110)
    plt.close(fig)
    cli.write_bytes_atomic(output, image.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir (has metrics.jsonl)")
    parser.add_argument("--compare", default="", help="more workdirs to draw on the same axes, comma-separated")
    parser.add_argument("--output", default=None, help="PNG to write (default WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    workdirs = [args.workdir] + [w for w in args.compare.split(",") if w]
    output = args.output or str(epath.Path(args.workdir) / "curves.png")

    def run():
        storage.check_all(reads=[("--workdir", w) for w in workdirs], writes={"--output": output}, files=("--output",))
        plot(workdirs, output)

    status = cli.guarded(PROG, run, {FileNotFoundError: "error", ImportError: "error", cli.UserError: "error"})
    if status == cli.EXIT_OK:
        print(f"wrote {output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
