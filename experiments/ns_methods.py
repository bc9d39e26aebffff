"""Newton–Schulz methods compared: accuracy, compiled FLOPs, and what a tiny model's loss makes of them.

    python experiments/ns_methods.py --out=runs/ns_methods                 # all three parts, ~30 min on 2 cores
    python experiments/ns_methods.py --out=runs/ns_methods --parts=accuracy,flops

For each method of osp_jax.newton_schulz.NS_METHODS (quintic: the OSP paper's; polar_express: arXiv
2505.16932; gram: Dao-AILab's Gram Newton–Schulz):
  accuracy  the relative Frobenius error ||NS_k(x) - U V^T|| / ||U V^T|| against the float64 polar
            factor from an SVD, after k = 1..8 steps, for square and rectangular shapes of the 124M and
            two inputs: Gaussian (a well-spread spectrum) and singular values log-uniform in [1e-3, 1]
            (an ill-conditioned one); osp_jax's bfloat16 implementation and the same iteration in float64;
            the spread of the singular values of the output (min, max);
  flops     XLA's FLOP count (`cost_analysis`, compiled, not run) of one optimizer update of the 1.4B
            tree (benchmarks/muon.py's tree: Muon for the hidden matrices, AdamW for the rest), per method;
  loss      configs/tiny.py trained for its 150 steps with each method, seeds 0, 1, 2
            (`python -m osp_jax.train`): the final training and validation loss.

Writes OUT/ns_methods.json and prints a markdown report; finished training runs are reused. OUT may be a
gs:// path (checked at start: the bucket, the credentials, a write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from osp_jax import cli, storage  # noqa: E402
from osp_jax.cli import read_json, write_json  # noqa: E402
from osp_jax.newton_schulz import NS_METHODS, newton_schulz, newton_schulz_reference  # noqa: E402

SHAPES = ((768, 768), (768, 2048), (2048, 768))
KINDS = ("gaussian", "ill-conditioned")
STEPS = tuple(range(1, 9))
SEEDS = (0, 1, 2)


def _input(kind: str, shape, rng) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal(shape).astype(np.float32)
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * np.exp(rng.uniform(np.log(1e-3), 0.0, k))) @ v.T).astype(np.float32)


def accuracy() -> list[dict]:
    rng = np.random.default_rng(0)
    runs = {(m, k): jax.jit(lambda a, k=k, m=m: newton_schulz(a, steps=k, method=m)) for m in NS_METHODS for k in STEPS}
    rows = []
    for shape in SHAPES:
        for kind in KINDS:
            x = _input(kind, shape, rng)
            u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
            polar = u @ vt
            for method in NS_METHODS:
                for k in STEPS:
                    y = np.asarray(runs[method, k](jnp.asarray(x)), np.float64)
                    ref = newton_schulz_reference(x, k, method=method)
                    s = np.linalg.svd(y, compute_uv=False)
                    rows.append({"shape": list(shape), "input": kind, "method": method, "steps": k,
                                 "error": float(np.linalg.norm(y - polar) / np.linalg.norm(polar)),
                                 "error_float64": float(np.linalg.norm(ref - polar) / np.linalg.norm(polar)),
                                 "sv_min": float(s.min()), "sv_max": float(s.max())})
            print(f"accuracy: {shape} {kind} done", flush=True)
    return rows


def flops() -> list[dict]:
    from muon import optimizers, parameter_shapes, update_cost  # benchmarks/muon.py

    shapes = parameter_shapes(24, 2048, 16, 16, 128, 5504, 49152)  # configs/osp_1b4.py
    rows = []
    for name, opt in optimizers(shapes, methods=NS_METHODS).items():
        if name.startswith("osp_jax.muon") or name == "optax.adamw":
            rows.append({"optimizer": name, **update_cost(opt, shapes)})
            print(f"flops: {name} {rows[-1]['gflops']} GFLOP", flush=True)
    return rows


def _records(path: epath.Path) -> list[dict]:
    if not storage.is_file(path):  # asked of the storage: the run just wrote it, in another process
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_tiny(out: epath.Path, method: str, seed: int) -> dict:
    workdir = out / f"tiny_{method}_seed{seed}"
    path = workdir / "metrics.jsonl"
    steps = 150
    if not any(r.get("step") == steps for r in _records(path)):
        cmd = [sys.executable, "-m", "osp_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.optimizer.ns_method={method}", f"--config.train.seed={seed}",
               f"--config.train.steps={steps}", "--config.train.checkpoint_every=0",
               "--config.train.outlier_every=0", "--config.train.tensorboard=False"]
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    records = _records(path)
    last = [r for r in records if "loss" in r][-1]
    val = [r for r in records if "val_loss" in r][-1]
    return {"method": method, "seed": seed, "step": last["step"], "loss": last["loss"],
            "val_loss": val["val_loss"], "val_step": val["step"]}


def loss(out: epath.Path) -> list[dict]:
    rows = []
    for method in NS_METHODS:
        for seed in SEEDS:
            rows.append(_run_tiny(out, method, seed))
            print(f"loss: {method} seed {seed}: val_loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def report(results: dict) -> str:
    lines = []
    if "accuracy" in results:
        acc = results["accuracy"]
        lines += ["Relative Frobenius error against the float64 polar factor (bfloat16 implementation; in "
                  "brackets the same iteration in float64), after k steps:", ""]
        for shape in SHAPES:
            for kind in KINDS:
                lines += [f"{shape[0]} x {shape[1]}, {kind}:", "",
                          "| method | " + " | ".join(f"k={k}" for k in STEPS) + " | singular values at k=5 |",
                          "| --- |" + " --- |" * (len(STEPS) + 1)]
                for method in NS_METHODS:
                    rows = [r for r in acc if (r["shape"], r["input"], r["method"]) == (list(shape), kind, method)]
                    five = next(r for r in rows if r["steps"] == 5)
                    errors = " | ".join(f"{r['error']:.3f} ({r['error_float64']:.3f})" for r in rows)
                    lines.append(f"| {method} | {errors} | {five['sv_min']:.2f} – {five['sv_max']:.2f} |")
                lines.append("")
    if "flops" in results:
        lines += ["Compiled FLOPs of one optimizer update, the 1.4B tree (XLA `cost_analysis`, CPU, not run):", "",
                  "| update | GFLOP | x quintic |", "| --- | --- | --- |"]
        base = next(r["gflops"] for r in results["flops"] if r["optimizer"] == "osp_jax.muon")
        for r in results["flops"]:
            lines.append(f"| {r['optimizer']} | {r['gflops']:,.1f} | {r['gflops'] / base:.3f} |")
        lines.append("")
    if "loss" in results:
        lines += ["configs/tiny.py, 150 steps, seeds 0, 1, 2 (mean ± standard deviation):", "",
                  "| method | final training loss | final validation loss | per seed (validation) |",
                  "| --- | --- | --- | --- |"]
        for method in NS_METHODS:
            rows = [r for r in results["loss"] if r["method"] == method]
            tr, va = [r["loss"] for r in rows], [r["val_loss"] for r in rows]
            lines.append(f"| {method} | {statistics.mean(tr):.4f} ± {statistics.stdev(tr):.4f} | "
                         f"{statistics.mean(va):.4f} ± {statistics.stdev(va):.4f} | "
                         + ", ".join(f"{v:.4f}" for v in va) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ns_methods.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="directory for the training runs and ns_methods.json")
    p.add_argument("--parts", default="accuracy,flops,loss", help="comma-separated: accuracy, flops, loss")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if not set(parts) <= {"accuracy", "flops", "loss"}:
        raise SystemExit(f"ns_methods: --parts={args.parts}: expected names from accuracy, flops, loss")
    try:
        storage.check_all(writes={"--out": args.out})
    except cli.UserError as e:
        cli.die(p.prog, f"error: {e}")
    out = epath.Path(storage.normalized(args.out))  # the training runs' workdirs: absolute, or a gs:// URL
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ns_methods.json"
    results = read_json(path) if storage.is_file(path) else {}
    results["device"] = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    for part in parts:
        results[part] = accuracy() if part == "accuracy" else flops() if part == "flops" else loss(out)
        write_json(path, results)  # each part kept as it finishes
    print(report(results))


if __name__ == "__main__":
    main()
