"""Falling back from a step that cannot be read, and setting it aside: the restore's state machine.

    candidates (complete steps, newest first) -> read each until one restores -> move the newer ones that did
    not (and unfinished saves) aside as ``<step>.unreadable-<UTC time>`` -> Orbax reloads its step list

Hand-written, because Orbax does the opposite of what a long run needs here: a CheckpointManager either ignores
an unreadable or unfinished step (so that step number counts as saved, and is never saved again) or deletes it
(`cleanup_tmp_directories`). Nothing here ever deletes: a step set aside can still be inspected or repaired.
A step whose saved tree does not fit the state asked for is no corruption: the fall-back stops there with
CheckpointMismatch.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from typing import Any, Callable

import jax
from etils import epath

from osp_jax.checkpoint import steps as steps_lib
from osp_jax.checkpoint.checksums import leaf_name
from osp_jax.checkpoint.errors import CheckpointError, CheckpointMismatch, describe
from osp_jax.checkpoint.multihost import all_processes_ok, same_on_all_processes

log = logging.getLogger("osp_jax.checkpoint")


def _stored_shape(x) -> tuple[int, ...]:
    """The shape Orbax stores for `x` (a typed PRNG key as its raw key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


def check_fits(saved_tree, target, step: int) -> None:
    """Raise CheckpointMismatch unless the saved leaves have the paths and shapes of `target`'s (dtypes may differ:
    a restore casts)."""
    saved = {leaf_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    want = {leaf_name(p): _stored_shape(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    if saved == want:
        return
    diffs = [f"{k}: saved {saved.get(k, 'absent')}, asked for {want.get(k, 'absent')}"
             for k in sorted(saved.keys() | want.keys()) if saved.get(k) != want.get(k)]
    raise CheckpointMismatch(
        f"step {step} holds another train state than the one asked for ({len(diffs)} leaves differ, first: "
        f"{'; '.join(diffs[:3])}): it was saved with another model or optimizer config (it is not corrupt)"
    )


def candidates(directory: epath.Path, step: int | None, *, warn_unfinished: bool = True) -> list[int]:
    """Complete steps to try, newest first, starting at `step` (or the latest). An asked-for `step` whose save never
    finished is warned about (unless the caller will set it aside, and say so then) and skipped."""
    complete = steps_lib.complete_steps(directory)
    if step is None:
        return complete[::-1]
    step = int(step)
    if step not in complete:
        if not steps_lib.has_unfinished(directory, step):
            raise CheckpointError(f"no checkpoint for step {step} in {directory}; complete steps: {complete}")
        if warn_unfinished or not steps_lib.step_path(directory, step).exists():
            log.warning("checkpoint step %d in %s is incomplete (its save never finished); falling back to the "
                        "previous complete step", step, directory)
    return [s for s in complete if s <= step][::-1]


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels and waits for the tasks still pending on it (as
    `asyncio.run` does)."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        # A read TensorStore finishes after the loop closed hands its result to a future nothing waits for any more
        # (it was cancelled above): drop it rather than raise "Event loop is closed" in TensorStore's thread.
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingEventLoop()


@contextlib.contextmanager
def failed_reads_drained():
    """Orbax runs each read in a fresh event loop and closes it as soon as one array fails, with the reads of the
    other arrays still running: TensorStore then hands each result to the closed loop, and Python prints one
    "Event loop is closed" traceback per array (dozens after a good fall-back, reading like a crash), while those
    orphaned reads keep filling memory next to the fall-back's own. Inside this block the loops Orbax makes
    cancel and wait for their pending reads before closing. The policy is process-wide while the block lasts;
    loops made meanwhile elsewhere only gain that clean-up. (Event-loop policies are deprecated from Python 3.14,
    to go in 3.16: by then Orbax's loop should do this itself.)"""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def try_steps(directory: epath.Path, steps: list[int], read_one: Callable[[int], Any], *,
              collective: bool = True) -> tuple[int, Any, dict[int, str]]:
    """`read_one(step)` on each of `steps` until one succeeds; returns (that step, its result, {step that failed
    before it: why}). Raises CheckpointError if none does, and at once (older steps untried) CheckpointMismatch
    if a step does not fit.

    collective: all processes run this together and must agree on each outcome (False: a process-local read).
    """
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}")
    agree = all_processes_ok if collective else bool
    failed: dict[int, str] = {}
    with failed_reads_drained():
        for step in steps:
            step = same_on_all_processes(step) if collective else step
            result = err = None
            try:
                result = read_one(step)
            except Exception as e:  # noqa: BLE001 - any other failure to read means "corrupt or unreadable"
                err = e
            # Every process moves on to the same next step, or none does.
            if agree(err is None):
                return step, result, failed
            mismatch = isinstance(err, CheckpointMismatch)
            if not agree(not mismatch):
                raise err if mismatch else CheckpointMismatch(f"step {step}: another process found it does not fit")
            failed[step] = describe(err or CheckpointError(f"step {step}: another process could not read its part"))
            log.debug("full error for step %d", step, exc_info=err)
    raise CheckpointError(f"no checkpoint in {directory} could be restored; tried "
                          + "; ".join(f"step {s}: {why}" for s, why in failed.items()))


def report_fallback(directory: epath.Path, failed: dict[int, str], restored: int) -> None:
    """One warning line per step that could not be read, for a read that moves nothing (`restore_params_only`)."""
    for step, why in failed.items():
        log.warning("checkpoint at step %d (%s) is corrupt or unreadable: %s; falling back to step %d",
                    step, steps_lib.step_path(directory, step), why, restored)


def set_aside(directory: epath.Path, failed: dict[int, str], restored: int, upto: int | None, reload) -> None:
    """Renames the step directories that failed to read, and those of unfinished saves newer than `restored` (up
    to `upto`), to ``<step>.unreadable-<UTC time>``, one warning line each saying what was found and done; then
    `reload()`s Orbax's step list, so that those steps are saved again instead of being taken as done."""
    limit = float("inf") if upto is None else int(upto)
    unfinished = [s for s in steps_lib.unfinished_steps(directory) if restored < s <= limit]
    found = {s: f"is corrupt or unreadable ({why}): falling back to step {restored}, and" for s, why in failed.items()}
    found.update({s: "is incomplete (its save never finished):" for s in unfinished if s not in found})
    if all_processes_ok(not found):
        return
    if jax.process_index() == 0:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for s in sorted(found):
            path = steps_lib.step_path(directory, s)
            aside = path.parent / f"{path.name}.unreadable-{stamp}"
            path.rename(aside)
            log.warning("checkpoint step %d (%s) %s moved it aside to %s (kept, not deleted), so that step %d is "
                        "trained and saved again", s, path, found[s], aside, s)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("osp_jax.checkpoint: unreadable steps moved aside")
    reload()
