"""`python -m osp_jax.train --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

The train loop, read top to bottom: each step feeds a global batch to the jitted pure step of step.py,
then logs, evaluates, measures outliers and saves when due. The run it trains (mesh, data, state fresh or
restored, jitted functions, checkpointer, metrics writer) is built once by run_setup.py. Re-running the
same command with the same workdir resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from osp_jax import cli
from osp_jax import config as config_lib
from osp_jax import metrics as metrics_lib
from osp_jax import run_setup, sharding
# Names that moved to the modules named for what they do, still imported from here by tests,
# benchmarks/ and experiments/.
from osp_jax.partitioning import (abstract_batch, abstract_state, check_mesh_fits, jit_train_step,  # noqa: F401
                                  lower_train_step, on_mesh, state_shardings, to_global)
from osp_jax.preemption import PreemptionNotice
from osp_jax.resume import STATE_SHAPE, check_resume_config, restore_state  # noqa: F401
from osp_jax.run_setup import DataError, Run, check_attention_backend, make_data  # noqa: F401

log = logging.getLogger("osp_jax")
PROG = "osp_jax.train"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


# ---------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the last logged metrics."""
    # This module's make_data, looked up at each call, so that a caller (a test) can feed its own batches.
    run, state = run_setup.set_up(config, workdir, make_data_fn=make_data)
    t = config.train
    step = run.start_step
    finite = _FiniteCheck(t.max_bad_steps)
    last, last_step = {}, None  # the last logged record, and its step
    with on_mesh(run.mesh), contextlib.ExitStack() as cleanup:
        # On leaving, last first and each even if one before it raised: stop a trace left open, wait (it
        # re-raises a failed asynchronous save), close the checkpointer, then the writer (telling W&B
        # whether the run failed), then put SIGTERM's handler back, then release the workdir.
        cleanup.callback(run.lock.release)
        notice = cleanup.enter_context(PreemptionNotice(every=t.log_every))
        cleanup.enter_context(run.writer)
        cleanup.callback(run.checkpointer.close)
        cleanup.callback(run.checkpointer.wait)
        cleanup.enter_context(run.profiler)
        while step < t.steps:
            if notice.reached(step):
                log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                _save(run, step, state, force=True)
                run.checkpointer.wait()
                notice.stopped = True
                break
            run.profiler.before(step)
            batch = to_global(next(run.train_iter), run.batch_sharding, t.global_batch_size)
            if step == run.start_step:
                if run.is_main:
                    log.info("compiling the train step (the first step waits for it)")
                started = time.perf_counter()
            state, device_metrics = run.step_fn(state, batch)
            step += 1
            finite.push(step, device_metrics)
            if step == run.start_step + 1:
                jax.block_until_ready(device_metrics)
                if run.is_main:  # a persistent compilation cache hit shows here as a short first step
                    log.info("compiled the train step in %.1f s (the first step's wall time)",
                             time.perf_counter() - started)
                run.throughput.start(step)  # exclude compilation from throughput
            run.profiler.after(step, state)
            if _due(t.log_every, step, t.steps):
                finite.check()
                last, last_step = _log_step(run, step, state, device_metrics, finite.skipped), step
                run.throughput.start(step)  # eval/outlier time is not training time
            if run.checkpointer.should_save(step) or step == t.steps:
                finite.check()  # never save a state we have not checked
                _save(run, step, state, force=step == t.steps)
    if last and run.is_main:
        _log_end(run, step, last, last_step, stopped=notice.stopped)
    return last


def _due(every: int, step: int, last_step: int) -> bool:
    """Whether a task done every `every` steps (0: never) is due after `step`; the last step has them all."""
    return bool(every) and (step % every == 0 or step == last_step)


class _FiniteCheck:
    """Reads each step's skip flag one step late, so that the host does not wait for the step it has just
    dispatched; raises TrainingError after `max_bad_steps` non-finite steps in a row."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.pending = None  # (step, device metrics) not read yet
        self.skipped = 0     # steps skipped so far in this run

    def push(self, step: int, device_metrics: dict) -> None:
        self.check()
        self.pending = (step, device_metrics)

    def check(self) -> None:
        """Reads the pending step's flag, if one is pending."""
        if self.pending is None:
            return
        (step, m), self.pending = self.pending, None
        skipped, bad = int(m["skipped"]), int(m["bad_steps"])
        if skipped:
            log.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s): update skipped",
                        step, float(m["loss"]), float(m["grad_norm"]))
        if bad >= self.max_bad_steps:
            raise TrainingError(f"{bad} consecutive steps had non-finite loss or gradients (last at step {step}); "
                                f"stopping (train.max_bad_steps={self.max_bad_steps}). The last checkpoint holds "
                                "finite state.")
        self.skipped += skipped


def _log_step(run: Run, step: int, state, device_metrics: dict, skipped: int) -> dict:
    """The record of `step`: its metrics, the schedules' values, throughput, and the validation loss and
    outlier statistics where due; written to the metrics files and, on process 0, printed."""
    t = run.config.train
    record = {k: float(v) for k, v in device_metrics.items() if k != "bad_steps"}
    # The rates the step's update applied: the schedules read the train state's step, step - 1 before this
    # step (optim.schedules_at). A skipped step (record["skipped"]) applied none.
    record.update({name: float(fn(step - 1)) for name, fn in run.schedules.items()})
    if step > run.start_step + 1:
        record.update(run.throughput.measure(step))
    else:  # the first step after a start is mostly compilation
        record.update({"tokens_per_sec": None, "mfu": None, "eta_seconds": None})
    record["skipped_steps"] = skipped
    record["tokens"] = step * run.tokens_per_step
    if _due(t.eval_every, step, t.steps):
        record["val_loss"] = _evaluate(run.eval_fn, state.params, run.val_batches)
    if _due(t.outlier_every, step, t.steps):
        record.update({k: np.asarray(v) for k, v in run.outlier_fn(state.params, run.val_batches[0]).items()})
    run.writer.write(step, record)
    if run.is_main:
        print(metrics_lib.progress_line(step, t.steps, record), flush=True)
    return record


def _evaluate(eval_fn, params, batches) -> float:
    """Mean loss per target token over the fixed validation batches."""
    total, tokens = 0.0, 0.0
    for b in batches:
        out = eval_fn(params, b)
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return total / max(tokens, 1.0)


def _save(run: Run, step: int, state, *, force: bool) -> None:
    run.checkpointer.save(step, state, data_iterator=run.ckpt_iter, config=run.config.to_dict(), force=force)


def _log_end(run: Run, step: int, last: dict, last_step: int, *, stopped: bool) -> None:
    logged = f"loss {last['loss']:.4f}" + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
    where = run.checkpointer.directory
    if stopped:
        log.info("stopped by SIGTERM at step %d, saved; last logged at step %d: %s; checkpoints in %s", step,
                 last_step, logged, where)
    else:
        log.info("done at step %d: %s; checkpoints in %s", step, logged, where)


# ---------------------------------------------------------------- CLI
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config(), e.g. configs/tiny.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, not TPU/SLURM).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our own INFO lines; libraries (Orbax, Grain, JAX) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    try:
        recipe = _CONFIG.value
        if recipe is not None:
            recipe.keys()  # the file is loaded lazily, on first use
    except OSError as e:  # the recipe file: missing, or failing as it loads
        cli.die(PROG, f"config error: --config cannot be loaded: {cli.one_line(cli.root_cause(e))}")
    if recipe is None or _WORKDIR.value is None:
        cli.die(PROG, "both --config=FILE and --workdir=DIR are required, e.g. "
                "python -m osp_jax.train --config=configs/tiny.py --workdir=runs/tiny")
    try:
        sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    except ValueError as e:  # an address without the process count and id
        cli.die(PROG, f"config error: {e}")
    from osp_jax.checkpoint import CheckpointError, CheckpointMismatch

    try:
        config = config_lib.validate(_CONFIG.value)
        train(config, _WORKDIR.value)
    except (config_lib.ConfigError, sharding.MeshError, CheckpointMismatch) as e:
        cli.die(PROG, f"config error: {e}")
    except DataError as e:
        cli.die(PROG, f"data error: {e}")
    except cli.UserError as e:  # an unreadable workdir file (cli.read_json), an unwritable workdir; an unusable
        cli.die(PROG, f"error: {e}")  # compilation cache or W&B
    except TrainingError as e:  # the data or the settings make the loss diverge: the user's to change
        cli.die(PROG, f"training error: {cli.one_line(e)}")
    except (FileNotFoundError, CheckpointError) as e:
        cli.die(PROG, f"{type(e).__name__}: {e}", code=1)
    except ValueError as e:  # anything else refused by a check; the traceback kept at debug level
        log.debug("traceback", exc_info=True)
        cli.die(PROG, f"{type(e).__name__}: {e}", code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser(PROG))
