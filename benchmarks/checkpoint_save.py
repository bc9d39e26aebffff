"""How long a checkpoint save blocks the train step, the way osp_jax.train saves.

Builds the sharded train state and the jitted step exactly as `osp_jax.train` does (the same
`state_shardings`, `init_state` and `jit_train_step`, the state donated), trains on one synthetic
batch already on the devices, and every `--every` steps calls `Checkpointer.save(...)` with asynchronous
saving on, as the loop does once the step's metrics are read (the state is computed when save is called).

Measured for each save:
- `save_s`: from calling `save(...)` to its return: the time the loop cannot dispatch the next step;
- `step_after_s`: the step right after it, while the checkpoint is written in the background;
- `steps_s`: the steps with no save in flight (their median is the reference);
- `write_s`: from calling save until the checkpoint is final (`wait()` after the timed steps).
The first save also compiles what it runs on the device; it is reported apart (`first_save_s`).
`--parts` times instead the two passes a save runs over the state: the finiteness check it waits for, and the
checksums it leaves computing.

    python benchmarks/checkpoint_save.py                          # configs/osp_124m.py, batch 1 x 128
    python benchmarks/checkpoint_save.py --batch=2 --seq-len=256 --saves=5
    python benchmarks/checkpoint_save.py --parts                  # the finiteness check and the checksums alone
    python benchmarks/checkpoint_save.py --smoke                  # tiny config, seconds

Prints a summary, then one JSON object as the last line; `--output FILE` appends it as a JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks.step_time import apply_overrides, git_commit, load_config, runtime_env  # noqa: E402
from osp_jax import config as config_lib  # noqa: E402
from osp_jax import sharding  # noqa: E402
from osp_jax.checkpoint import Checkpointer  # noqa: E402
from osp_jax.model import Transformer, count_params  # noqa: E402
from osp_jax.optim import make_optimizer  # noqa: E402
from osp_jax.step import init_state  # noqa: E402
from osp_jax.train import jit_train_step, state_shardings  # noqa: E402

DEFAULT_CONFIG = "configs/osp_124m.py"
SMOKE_CONFIG = "configs/tiny.py"


def _timed_step(step_fn, state, batch):
    start = time.perf_counter()
    state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))
    return state, time.perf_counter() - start


def _setup(config, seed: int):
    """(mesh, model, tx, shardings, initialised state) of a validated `config`, as osp_jax.train builds them."""
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    model = Transformer(config.model)
    tx, _ = make_optimizer(config, mesh)
    shardings = state_shardings(config, model, tx, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(functools.partial(init_state, config, model, tx), out_shardings=shardings)(
            jax.random.key(seed))
    return mesh, model, tx, shardings, jax.block_until_ready(state)


def measure(config, directory: str, *, saves: int, every: int, seed: int = 0) -> dict:
    """Trains `saves * every` steps of a validated `config`, saving into `directory` every `every` steps."""
    t, m = config.train, config.model
    mesh, model, tx, shardings, state = _setup(config, seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        tokens = jax.random.randint(jax.random.key(seed + 1), (t.global_batch_size, t.seq_len + 1), 0, m.vocab_size)
        batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                "positions": jnp.broadcast_to(jnp.arange(t.seq_len), (t.global_batch_size, t.seq_len)),
                                "segment_ids": jnp.ones((t.global_batch_size, t.seq_len), jnp.int32)},
                               sharding.batch_sharding(mesh))
        step_fn = jit_train_step(config, model, tx, shardings, mesh)
        state, compile_and_first_s = _timed_step(step_fn, state, batch)
        state, _ = _timed_step(step_fn, state, batch)  # warm-up
        ckpt = Checkpointer(directory, save_every=every, keep=2, async_save=True)
        save_s, step_after_s, write_s, steps_s = [], [], [], []
        try:
            step = 0
            for _ in range(saves):
                for _ in range(every - 1):
                    state, s = _timed_step(step_fn, state, batch)
                    steps_s.append(s)
                    step += 1
                step += 1
                start = time.perf_counter()
                assert ckpt.save(step, state, config=config.to_dict(), force=True)
                save_s.append(time.perf_counter() - start)
                state, s = _timed_step(step_fn, state, batch)  # the step the background write overlaps
                step_after_s.append(s)
                step += 1
                ckpt.wait()
                write_s.append(time.perf_counter() - start)
        finally:
            ckpt.close()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    commit, dirty = git_commit()
    device = jax.devices()[0]
    median = statistics.median
    return {
        "benchmark": "checkpoint_save",
        "optimizer": config.optimizer.name, "params": count_params(state.params), "state_bytes": state_bytes,
        "layers": m.layers, "dim": m.dim, "vocab_size": m.vocab_size,
        "mesh": dict(mesh.shape), "batch": t.global_batch_size, "seq_len": t.seq_len,
        "saves": saves, "every": every,
        "compile_and_first_step_s": compile_and_first_s,
        # The first save also compiles what it runs on the device: reported apart, left out of the medians.
        "first_save_s": save_s[0], "save_s": median(save_s[1:]), "save_all_s": save_s,
        "step_s": median(steps_s),
        "step_after_save_s": median(step_after_s[1:]), "step_after_save_all_s": step_after_s,
        "write_s": median(write_s[1:]), "write_all_s": write_s,
        "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "env": runtime_env(), "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_parts(config, *, repeats: int = 3, seed: int = 0) -> dict:
    """The two passes a save runs over the initialised state of a validated `config`, each timed `repeats` times
    after a first (compiling) call: the finiteness check save() waits for, and the checksums it leaves computing
    (the time to dispatch them, then until they are ready)."""
    from osp_jax.checkpoint import checksums

    state = _setup(config, seed)[-1]
    finite_s, dispatch_s, ready_s = [], [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        checksums.nonfinite_leaves(state)
        dispatched = time.perf_counter()
        pending = checksums.start(state)
        ready = time.perf_counter()
        pending.result()
        finite_s.append(dispatched - start)
        dispatch_s.append(ready - dispatched)
        ready_s.append(time.perf_counter() - ready)
    commit, dirty = git_commit()
    return {"benchmark": "checkpoint_save_parts", "params": count_params(state.params),
            "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
            "first_finite_s": finite_s[0], "first_checksums_dispatch_s": dispatch_s[0],
            "finite_s": statistics.median(finite_s[1:]), "checksums_dispatch_s": statistics.median(dispatch_s[1:]),
            "checksums_ready_s": statistics.median(ready_s[1:]), "finite_all_s": finite_s,
            "checksums_dispatch_all_s": dispatch_s, "checksums_ready_all_s": ready_s,
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "git_commit": commit, "git_dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def summary(r: dict) -> str:
    if r["benchmark"] == "checkpoint_save_parts":
        return (f"{r['params'] / 1e6:,.1f}M params, state {r['state_bytes'] / 2**30:.2f} GiB | finiteness check "
                f"{1e3 * r['finite_s']:.0f} ms (save waits for it) | checksums dispatched in "
                f"{1e3 * r['checksums_dispatch_s']:.0f} ms, ready {r['checksums_ready_s']:.2f} s later "
                f"(medians of {len(r['finite_all_s']) - 1}; the first calls compile)")
    step = f"{1e3 * r['step_s']:.0f} ms"
    return (f"{r['optimizer']} | {r['params'] / 1e6:,.1f}M params, state {r['state_bytes'] / 2**30:.2f} GiB | "
            f"{r['device_count']} x {r['device_kind']} | batch {r['batch']} x seq {r['seq_len']}\n"
            f"  save() blocks {1e3 * r['save_s']:.0f} ms (median of {r['saves'] - 1}; the first, compiling, "
            f"{1e3 * r['first_save_s']:.0f} ms) | step {step}, the step after a save "
            f"{1e3 * r['step_after_save_s']:.0f} ms | checkpoint final after {r['write_s']:.2f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=None, help=f"recipe file (or FILE:ARG); default {DEFAULT_CONFIG}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key; repeatable")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 1; the recipe's with --smoke)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (the recipe's with --smoke)")
    p.add_argument("--saves", type=int, default=None, help="saves, the first untimed (default 4; 3 with --smoke)")
    p.add_argument("--every", type=int, default=3, help="steps from one save to the next (>= 2)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, removed after)")
    p.add_argument("--output", default=None, help="append the JSON record to this file")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_CONFIG} unless --config, 3 saves: seconds on CPU")
    p.add_argument("--parts", action="store_true",
                   help="time the finiteness check and the checksums of the initialised state instead (no training)")
    args = p.parse_args(argv)
    if args.every < 2:
        p.error("--every must be >= 2: a step without a save in flight is the reference")
    config = load_config(args.config or (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG))
    apply_overrides(config, args.set)
    if not args.smoke or args.batch is not None:
        config.train.global_batch_size = args.batch or 1
    if not args.smoke or args.seq_len is not None:
        config.train.seq_len = args.seq_len or 128
    config.optimizer.grad_accum_steps = 1
    saves = args.saves or (3 if args.smoke else 4)
    if saves < 2:
        p.error("--saves must be >= 2: the first save compiles, and is not counted")
    if args.parts:
        record = measure_parts(config, repeats=saves - 1)
    elif args.dir:
        record = measure(config, os.path.abspath(args.dir), saves=saves, every=args.every)
    else:
        with tempfile.TemporaryDirectory(prefix="checkpoint_save_") as tmp:
            record = measure(config, os.path.join(tmp, "checkpoints"), saves=saves, every=args.every)
    record["config"] = args.config or (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
    record["overrides"] = list(args.set)
    print(summary(record), flush=True)
    line = json.dumps(record)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
