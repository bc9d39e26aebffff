"""Muon against AdamW on configs/tiny.py: the loss each reaches over the same steps.

    python experiments/muon_vs_adamw.py --out=runs/muon_vs_adamw                   # 60 steps, seed 0: ~3 min, 2 cores
    python experiments/muon_vs_adamw.py --out=runs/muon_vs_adamw --steps=150 --seeds=0,1,2
    python experiments/muon_vs_adamw.py --out=/tmp/smoke --steps=4 --set=optimizer.warmup_steps=1   # a smoke run

The claim this measures was an assertion of tests/test_train.py until issue 20 moved it here (a research
result, not a behaviour of the code): after 60 steps of configs/tiny.py, Muon's validation loss is at
most AdamW's + 0.02 (--margin). Each run is `python -m osp_jax.train --config=configs/tiny.py` with
--config.optimizer.name=muon or adamw and the recipe's own rates (3e-3 for both), validated every
steps / 2; the two runs of a seed train side by side, one process each. Prints the two training-loss
curves and a markdown table of the final losses with the claim's verdict for each seed, and writes
OUT/muon_vs_adamw.json. Finished runs (metrics.jsonl reaching --steps) are reused; --set KEY=VALUE
overrides a config key of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from etils import epath  # noqa: E402

from osp_jax.cli import write_json  # noqa: E402

OPTIMIZERS = ("muon", "adamw")


def _records(path: epath.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _finished(workdir: epath.Path, steps: int) -> bool:
    return any(r.get("step") == steps and "val_loss" in r for r in _records(workdir / "metrics.jsonl"))


def train_pair(out: epath.Path, steps: int, seed: int, overrides=()) -> dict[str, list[dict]]:
    """Trains (or reuses) one Muon and one AdamW run of `seed`; returns each run's metrics records."""
    procs = {}
    for name in OPTIMIZERS:
        workdir = out / f"{name}_seed{seed}"
        if _finished(workdir, steps):
            continue
        cmd = [sys.executable, "-m", "osp_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.optimizer.name={name}", f"--config.train.seed={seed}", f"--config.train.steps={steps}",
               f"--config.train.eval_every={max(1, steps // 2)}", "--config.train.outlier_every=0",
               "--config.train.checkpoint_every=0", "--config.train.tensorboard=False",
               *(f"--config.{kv}" for kv in overrides)]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"muon_vs_adamw: the {name} run of seed {seed} failed (exit {proc.returncode})")
    return {name: _records(out / f"{name}_seed{seed}" / "metrics.jsonl") for name in OPTIMIZERS}


def summary(curves: dict[str, list[dict]], seed: int, margin: float) -> dict:
    """The final training and validation losses of a seed's two runs, and whether the claim holds."""
    row = {"seed": seed}
    for name in OPTIMIZERS:
        row[f"{name}_loss"] = [r for r in curves[name] if "loss" in r][-1]["loss"]
        row[f"{name}_val_loss"] = [r for r in curves[name] if "val_loss" in r][-1]["val_loss"]
    row["holds"] = row["muon_val_loss"] <= row["adamw_val_loss"] + margin
    return row


def report(results: dict) -> str:
    lines = [f"configs/tiny.py, {results['steps']} steps; claim: Muon's validation loss <= AdamW's + "
             f"{results['margin']}", "",
             "| seed | Muon val loss | AdamW val loss | Muon train loss | AdamW train loss | claim |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results["seeds"]:
        lines.append(f"| {r['seed']} | {r['muon_val_loss']:.4f} | {r['adamw_val_loss']:.4f} | {r['muon_loss']:.4f} "
                     f"| {r['adamw_loss']:.4f} | {'holds' if r['holds'] else 'does not hold'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="directory for the runs and muon_vs_adamw.json")
    p.add_argument("--steps", type=int, default=60, help="training steps of every run (default 60)")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every run")
    p.add_argument("--margin", type=float, default=0.02, help="the claim's slack on the validation loss")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={args.seeds}: expected comma-separated integers, e.g. 0,1,2")
    if args.steps < 2:
        p.error(f"--steps={args.steps}: expected at least 2 (the runs validate every steps / 2)")
    out = epath.Path(os.path.abspath(args.out))
    out.mkdir(parents=True, exist_ok=True)
    results = {"steps": args.steps, "margin": args.margin, "overrides": args.set, "seeds": []}
    for seed in seeds:
        curves = train_pair(out, args.steps, seed, args.set)
        print(f"\nseed {seed}: training loss\nstep  muon    adamw")
        for m, a in zip(*([r for r in curves[name] if "loss" in r] for name in OPTIMIZERS)):
            print(f"{m['step']:4d}  {m['loss']:.4f}  {a['loss']:.4f}")
        results["seeds"].append(summary(curves, seed, args.margin))
        write_json(out / "muon_vs_adamw.json", results)  # each seed kept as it finishes
    print()
    print(report(results))


if __name__ == "__main__":
    main()
