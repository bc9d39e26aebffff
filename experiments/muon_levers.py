"""What each lever of the sharded Muon update is worth: the OSP step compiled with one lever undone.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python experiments/muon_levers.py \\
        --config=configs/osp_124m.py --batch=16 --seq-len=1024 [--mesh=fsdp=8 ...] [--levers=...]

Levers (each undone by patching the code for that compile only; `final` is the code as it is):
  final        the momentum moved in bfloat16, same-shaped matrices of all leaves grouped, the work
               split over op as well (each op-replica orthogonalises its 1/op and all-gathers the rest);
  float32      the stacks handed to the move in float32 (Newton–Schulz casts them to bfloat16 after);
  per_leaf     every leaf its own group: the layer stack alone is the split axis (12 layers over 8
               devices pad to 16);
  no_op_split  the Newton–Schulz work split over fsdp and tp only (`optim.NS_SHARD_AXES`): each
               op-replica orthogonalises all of its fsdp share, nothing gathered over op, op times the
               FLOPs.
For each mesh and lever: Muon's bytes (the OSP step's collectives less AdamW's on the OSP model, native
dtypes, as benchmarks/collectives.py counts them), against the minimum in whole matrices, XLA's FLOPs of
the step per device and the "Involuntary full rematerialization" warnings.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import collectives  # noqa: E402  (benchmarks/collectives.py)

LEVERS = ("final", "float32", "per_leaf", "no_op_split")
DEFAULT_MESHES = ("fsdp=8", "fsdp=4,op=2", "op=8", "dp=2,fsdp=2,tp=2")


def undo(lever: str) -> None:
    """Patches osp_jax so that the next optimizer built has `lever` undone."""
    import importlib

    import jax.numpy as jnp

    muon = importlib.import_module("osp_jax.muon")  # the module: the package's `muon` is the function
    optim = importlib.import_module("osp_jax.optim")

    if lever == "float32":
        muon._normalize = lambda x, eps: (x / (jnp.linalg.norm(x.astype(jnp.float32), axis=(-2, -1), keepdims=True)
                                               + eps)).astype(jnp.float32)
    elif lever == "per_leaf":
        grouped = muon.orthogonalize_stacks
        muon.orthogonalize_stacks = lambda stacks, *a: [grouped([s], *a)[0] for s in stacks]
    elif lever == "no_op_split":
        optim.NS_SHARD_AXES = tuple(a for a in optim.NS_SHARD_AXES if a != "op")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {LEVERS}")
    p.add_argument("--lever", help=argparse.SUPPRESS)  # a child's
    args, rest = p.parse_known_args(argv)
    if args.lever:  # a child: one compile with the lever undone
        undo(args.lever)
        collectives.main(rest)
        return
    q = argparse.ArgumentParser()
    q.add_argument("--config", default="configs/osp_124m.py")
    q.add_argument("--set", action="append", default=[])
    q.add_argument("--mesh", action="append", default=[])
    q.add_argument("--batch", type=int)
    q.add_argument("--seq-len", type=int)
    c = q.parse_args(rest)
    print("| mesh | lever | Muon MiB per device | x minimum (whole matrices) | step GFLOP per device "
          "| remat warnings |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mesh in c.mesh or DEFAULT_MESHES:
        model = collectives.run_child(c, mesh, "model")["native"]["total"]["bytes"]
        # The minimum of the code as it is (no_op_split's own would leave op out of the axes).
        least = collectives.minimum(collectives._config(c, collectives.parse_mesh(mesh), collectives.RECIPES["osp"]))
        for lever in args.levers.split(","):
            run = collectives.run_child(c, mesh, "osp", script=__file__, extra=[f"--lever={lever}"])
            muon = run["native"]["total"]["bytes"] - model
            print(f"| {mesh} | {lever} | {muon / 2**20:,.2f} | {muon / least['whole_matrices']:.3f} | "
                  f"{run['compiled_flops'] / 1e9:,.1f} | {run['remat_warnings']} |", flush=True)


if __name__ == "__main__":
    main()
