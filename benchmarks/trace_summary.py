"""Where a traced step spends its device time: per-op totals from a `jax.profiler` trace.

    python benchmarks/trace_summary.py TRACE_DIR [--steps=N] [--top=40]

Reads the newest `*.xplane.pb` under TRACE_DIR (written by `benchmarks/step_time.py --profile=DIR`),
and for every device plane sums the duration of each op on its "XLA Ops" line (or, without one, on
its stream lines), divided by the number of traced steps. Ops are also grouped into rough categories
(matmul, attention, reduction/fusion, copy, collective) by name, so the split is visible at a glance.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re

CATEGORIES = (  # first match wins; names are XLA's (fusion.12, cublas-gemm.3, ...) or the kernels'
    ("attention (cuDNN)", re.compile(r"cudnn|custom-call.*fmha|flash|fmha", re.I)),
    ("matmul", re.compile(r"gemm|dot|cublas|nvjet|matmul|convolution|triton_gemm", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|nccl", re.I)),
    ("copy / transpose", re.compile(r"^copy|transpose|memcpy|memset|dynamic-update-slice|concatenate", re.I)),
    ("reduce / fusion (elementwise)", re.compile(r"fusion|reduce|loop|input", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def summarize(trace_dir: str, steps: int = 1, top: int = 40) -> str:
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"trace_summary: no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        ops = [l for l in lines if l.name == "XLA Ops"] or [l for l in lines if l.name.startswith("Stream")]
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for line in ops:
            for e in line.events:
                totals[e.name] += e.duration_ns
                counts[e.name] += 1
        busy = sum(totals.values())
        modules = [l for l in lines if l.name == "XLA Modules"]
        span = sum(e.duration_ns for l in modules for e in l.events)
        out.append(f"{plane.name}: lines {[l.name for l in lines]}")
        out.append(f"  op time per step {busy / steps / 1e6:.2f} ms"
                   + (f"; module time per step {span / steps / 1e6:.2f} ms" if span else ""))
        by_cat: collections.Counter = collections.Counter()
        for name, ns in totals.items():
            by_cat[category(name)] += ns
        for cat, ns in by_cat.most_common():
            out.append(f"  {cat:<32} {ns / steps / 1e6:9.2f} ms  {100 * ns / max(busy, 1):5.1f}%")
        out.append(f"  top {top} ops (ms per step, calls per step, category):")
        for name, ns in totals.most_common(top):
            out.append(f"    {ns / steps / 1e6:9.3f}  {counts[name] / steps:6.1f}  {category(name):<20} {name[:110]}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (totals are divided by it)")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    print(summarize(args.trace_dir, args.steps, args.top))


if __name__ == "__main__":
    main()
