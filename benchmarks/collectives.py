"""Collective bytes of the train step per device: the OSP recipe against the AdamW baseline, with the
least the Muon update has to move on each mesh. Compile-only: nothing runs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/collectives.py \\
        --config=configs/osp_124m.py --batch=16 --seq-len=1024 [--mesh=fsdp=4,op=2 ...] [--output=FILE]

For every mesh (default: the six of MESHES) three train steps are compiled, each in its own process:
  adamw  the AdamW baseline (step_time.BASELINE: AdamW, per-channel RMSNorm, no EmbProj);
  model  the OSP model (Single-Scale RMSNorm, EmbProj) trained with AdamW: what the model change moves;
  osp    the OSP recipe (Muon for the hidden matrices and EmbProj).

Bytes are each collective's result bytes per device, in the dtype the program moves them in, counted
from the HLO XLA dumps just before its `float-normalization-bf16` pass: after it, the CPU backend
(which has no bfloat16 collectives) moves every bfloat16 collective as float32, twice its size. Counts
are static (an op inside the layer scan counts once), as in `step_time.py --compile-only`; the
compiled program's own figures are recorded too (`compiled`).

The minimum is the issue's: the momentum of every Muon leaf moved from its parameter layout to whole
matrices split over the Newton–Schulz axes (optim.NS_SHARD_AXES) and the update moved back, in
bfloat16 (the dtype Newton–Schulz runs in). For a leaf of S bytes split over A devices of those
axes and replicated over the R others (N = A * R): an all-to-all to whole matrices (result S/N per
device) where A > 1, the same all-to-all back (S/N), and an all-gather over R (result S/A) where
R > 1. Each op-replica keeps its own 1/R of the matrices with no collective, so nothing moves over R
on the way there. That sum is the fractional minimum. Whole matrices cannot be shared more evenly
than ceil(count / N) a device, and every device of an SPMD program moves the same shapes, so the
minimum is each group of same-shaped matrices' share scaled by ceil(count / N) * N / count.
ratio = (osp - adamw) / minimum: all the OSP step's extra bytes, including what the OSP model's own
parameters (EmbProj's two matrices) move under any optimizer; muon_ratio = (osp - model) / minimum.

Prints one table a mesh, then one JSON line per mesh; `--output FILE` appends those lines.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from etils import epath  # noqa: E402

from osp_jax.cli import write_text_atomic  # noqa: E402
from step_time import BASELINE, COLLECTIVES, OSP, apply_overrides, collectives, git_commit, load_config  # noqa: E402

MESHES = ("fsdp=8", "fsdp=4,op=2", "fsdp=2,op=4", "op=8", "dp=2,fsdp=2,tp=2", "fsdp=4,tp=2")
RECIPES = {"adamw": BASELINE, "model": {**OSP, "optimizer.name": "adamw"}, "osp": OSP}
REMAT_WARNING = "Involuntary full rematerialization"
NS_BYTES = 2  # bfloat16: what Newton–Schulz runs in, so what the move carries


def parse_mesh(text: str) -> dict:
    sizes = {"dp": 1, "op": 1, "fsdp": 1, "tp": 1}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis not in sizes or not size.isdigit():
            raise SystemExit(f"collectives: --mesh={text}: expected AXIS=N[,AXIS=N...] over dp, op, fsdp, tp")
        sizes[axis] = int(size)
    return sizes


def _config(args, mesh: dict, recipe: dict):
    config = load_config(args.config)
    apply_overrides(config, [*args.set, *(f"{k}={v}" for k, v in recipe.items())])
    apply_overrides(config, {f"mesh.{k}": v for k, v in mesh.items()})
    if args.batch:
        config.train.global_batch_size = args.batch
    if args.seq_len:
        config.train.seq_len = args.seq_len
    return config


# ---------------------------------------------------------------- the minimum
def _split_by(spec, ndim: int) -> set[str]:
    axes = set()
    for entry in tuple(spec) + (None,) * (ndim - len(spec)):
        axes |= set() if entry is None else {entry} if isinstance(entry, str) else set(entry)
    return axes


def minimum(config, dtype_bytes: int = NS_BYTES) -> dict:
    """The issue's minimum for the Muon leaves of `config` on its mesh, leaf by leaf (module docstring),
    and the same with whole matrices. `dtype_bytes=4` gives the float32 minimum, to hold the compiled
    CPU program's figures to (it moves bfloat16 collectives as float32)."""
    import jax
    from flax import linen as nn

    from osp_jax import sharding
    from osp_jax.model import abstract_params
    from osp_jax.muon import _MatrixView, infer_dimension_numbers
    from osp_jax.optim import MUON, NS_SHARD_AXES, param_labels

    mesh = sharding.make_mesh(config.mesh)
    boxed = abstract_params(config.model, config.train.seq_len)
    params = nn.unbox(boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, sharding.param_shardings(boxed, mesh)), is_leaf=is_spec)
    labels = jax.tree.leaves(param_labels(params, config.optimizer.name))
    dims = jax.tree.leaves(infer_dimension_numbers(params), is_leaf=lambda x: x is None or hasattr(x, "reduction_axis"))
    sizes = dict(mesh.shape)
    ns_axes = [a for a in NS_SHARD_AXES if sizes.get(a, 1) > 1]
    n = math.prod(sizes[a] for a in ns_axes)
    leaves, groups = [], {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), label, spec, dim in zip(flat, labels, specs, dims):
        if label != MUON:
            continue
        view = _MatrixView.of(path, leaf.shape, dim)
        split = _split_by(spec, leaf.ndim)
        a = math.prod(sizes[x] for x in ns_axes if x in split)
        r = n // a
        s = math.prod(leaf.shape) * dtype_bytes
        row = {"leaf": "/".join(str(getattr(k, "key", k)) for k in path), "shape": list(leaf.shape),
               "matrices": view.batch, "bytes": s, "split": a, "replicated": r,
               "split_axes": sorted(split & set(ns_axes)),
               "all_to_all": 2 * s / n if a > 1 else 0.0, "all_gather": s / a if r > 1 else 0.0}
        leaves.append(row)
        groups.setdefault(tuple(sorted((view.fan_in, view.fan_out))), []).append(row)
    total = {"all-to-all": sum(x["all_to_all"] for x in leaves), "all-gather": sum(x["all_gather"] for x in leaves)}
    whole = 0.0
    for rows in groups.values():
        # Whole matrices: a group's count rounds up to a multiple of N, and so do the all-to-alls and the
        # all-gather over the axes no leaf of the group is split over. A leaf replicated over an axis
        # that splits the others (EmbProj over tp) joins their layout by a local slice and gathers its
        # own part back: that all-gather is not padded.
        count = sum(x["matrices"] for x in rows)
        pad = -(-count // n) * n / count
        group_split = set().union(*(x["split_axes"] for x in rows))
        for x in rows:
            joined = math.prod(sizes[a] for a in group_split if a not in x["split_axes"])
            whole += pad * x["all_to_all"]
            if x["replicated"] > joined:  # gathered over the group's replicated axes (padded) ...
                whole += pad * x["bytes"] / (x["split"] * joined)
            if joined > 1:  # ... then over the axes it joined by slicing
                whole += x["bytes"] / x["split"]
    return {"ns_axes": ns_axes, "devices": n, "leaves": leaves, **total, "total": sum(total.values()),
            "whole_matrices": whole,
            "groups": {f"{m}x{k}": sum(x["matrices"] for x in rows) for (m, k), rows in groups.items()}}


# ---------------------------------------------------------------- one compile (a child process)
def _native_hlo(dump_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(dump_dir, "*jit_train_step*before_float-normalization-bf16*.txt")))
    if not files:
        raise SystemExit(f"collectives: XLA wrote no HLO before float-normalization-bf16 into {dump_dir}")
    return pathlib.Path(files[0]).read_text()


def child(args) -> dict:
    import time

    import jax

    from osp_jax import sharding
    from osp_jax.metrics import compiled_cost
    from osp_jax.train import lower_train_step

    config = _config(args, parse_mesh(args.mesh[0]), RECIPES[args.child])
    start = time.perf_counter()
    lowered, _ = lower_train_step(config, sharding.make_mesh(config.mesh))
    compiled = lowered.compile()
    record = {"recipe": args.child, "compile_s": round(time.perf_counter() - start, 1),
              "native": collectives(_native_hlo(args.dump_dir)), "compiled": collectives(compiled.as_text()),
              "compiled_flops": compiled_cost(compiled).get("flops"), "devices": jax.device_count()}
    if args.child == "osp":
        record["minimum"] = minimum(config)
    return record


def run_child(args, mesh: str, recipe: str, script: str = __file__, extra=()) -> dict:
    """One compile in a process of its own (XLA's flags are read once a process): `script --child`."""
    with tempfile.TemporaryDirectory(prefix="collectives_") as dump:
        flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} "
                 "--xla_dump_hlo_pass_re=float-normalization-bf16 --xla_dump_hlo_module_re=jit_train_step")
        cmd = [sys.executable, os.path.abspath(script), *extra, f"--child={recipe}", f"--mesh={mesh}",
               f"--dump-dir={dump}", f"--config={args.config}", *(f"--set={s}" for s in args.set)]
        cmd += [f"--batch={args.batch}"] if args.batch else []
        cmd += [f"--seq-len={args.seq_len}"] if args.seq_len else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": flags})
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"collectives: the {recipe} compile on mesh {mesh} failed (exit {proc.returncode})")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["remat_warnings"] = proc.stderr.count(REMAT_WARNING)
    return record


# ---------------------------------------------------------------- report
def compare(args, mesh: str) -> dict:
    runs = {name: run_child(args, mesh, name) for name in RECIPES}
    total = {name: run["native"]["total"]["bytes"] for name, run in runs.items()}
    least = runs["osp"]["minimum"]
    extra, model_extra = total["osp"] - total["adamw"], total["model"] - total["adamw"]
    commit, dirty = git_commit()
    return {"benchmark": "collectives", "mesh": parse_mesh(mesh), "config": args.config, "overrides": args.set,
            "batch": args.batch, "seq_len": args.seq_len, "runs": runs, "extra": extra, "model_extra": model_extra,
            "minimum": least["whole_matrices"], "minimum_fractional": least["total"],
            "ratio": _ratio(extra, least["whole_matrices"]),
            "muon_ratio": _ratio(total["osp"] - total["model"], least["whole_matrices"]),
            "ratio_fractional": _ratio(extra, least["total"]),
            "git_commit": commit, "git_dirty": dirty}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _mib(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def table(r: dict) -> str:
    runs, least = r["runs"], r["runs"]["osp"]["minimum"]
    lines = [f"mesh {', '.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1)} "
             f"(Newton–Schulz axes {', '.join(least['ns_axes']) or 'none'}): MiB per device, native dtypes",
             f"  {'':8}" + "".join(f"{k:>20}" for k in (*COLLECTIVES, "total")) + f"{'remat warnings':>16}"]
    for name, run in runs.items():
        kinds = run["native"]
        lines.append(f"  {name:8}" + "".join(f"{_mib(kinds[k]['bytes']):>20}" for k in (*COLLECTIVES, "total"))
                     + f"{run['remat_warnings']:>16}")
    lines.append(f"  minimum (the Muon move) in whole matrices: {_mib(least['whole_matrices'])} MiB (shape groups "
                 f"{least['groups']} split over {least['devices']} devices); fractional {_mib(least['total'])} "
                 f"MiB = all-to-all {_mib(least['all-to-all'])} + all-gather {_mib(least['all-gather'])}:")
    for leaf in least["leaves"]:
        lines.append(f"    {leaf['leaf']:24} {str(tuple(leaf['shape'])):20} {_mib(leaf['bytes']):>7} MiB bf16, "
                     f"split {leaf['split']} x replicated {leaf['replicated']}: all-to-all 2 x "
                     f"{_mib(leaf['all_to_all'] / 2)}, all-gather {_mib(leaf['all_gather'])}")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines.append(f"  OSP extra {_mib(r['extra'])} MiB (Muon {_mib(r['extra'] - r['model_extra'])}, the OSP model's "
                 f"EmbProj and norms {_mib(r['model_extra'])}): ratio {fmt(r['ratio'])} (Muon alone "
                 f"{fmt(r['muon_ratio'])}; against the fractional minimum {fmt(r['ratio_fractional'])})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="configs/osp_124m.py", help="recipe file (or FILE:ARG)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override; repeatable")
    p.add_argument("--mesh", action="append", default=[], help=f"AXIS=N[,AXIS=N...]; repeatable (default: {MESHES})")
    p.add_argument("--batch", type=int, default=None, help="train.global_batch_size (default: the recipe's)")
    p.add_argument("--seq-len", type=int, default=None, help="train.seq_len (default: the recipe's)")
    p.add_argument("--output", default=None, help="append each mesh's JSON record to this file")
    p.add_argument("--child", choices=tuple(RECIPES), help=argparse.SUPPRESS)
    p.add_argument("--dump-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    for mesh in args.mesh or MESHES:
        parse_mesh(mesh)
    for mesh in args.mesh or MESHES:
        record = compare(args, mesh)
        print(table(record), flush=True)
        if args.output:  # appended: one JSON line a mesh
            path = epath.Path(args.output)
            write_text_atomic(path, (path.read_text() if path.exists() else "") + json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
