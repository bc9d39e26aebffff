"""Agreement between the processes of a job about checkpoints: every process takes the same branch around each
collective, or one process stuck in a collective waits forever for the others.

Hand-written: Orbax synchronises its own saves and restores, but not the decisions around them (is this one
shared directory, which step is the newest, did every process read its part).
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from osp_jax.checkpoint.errors import CheckpointError
from osp_jax.checkpoint.steps import uncached

if TYPE_CHECKING:
    from osp_jax.checkpoint.checkpointer import Checkpointer

log = logging.getLogger("osp_jax.checkpoint")


def all_processes_ok(ok: bool) -> bool:
    """True if every process got `ok`; all processes must take the same branch around collectives."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def same_on_all_processes(value: int) -> int:
    """Process 0's value everywhere, so every process restores the same step."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def _agree(directory, action, what: str) -> None:
    """Runs `action` here; raises CheckpointError on every process if it failed on any."""
    try:
        action()
        error = None
    except OSError as e:
        error = e
    if not all_processes_ok(error is None):
        raise CheckpointError(f"{directory}: {what} failed " + (f"here: {error}" if error else
                                                                "on another process (its log says why)"))


def make_shared_directory(directory, wait_s: float = 10.0) -> None:
    """Makes `directory`; with several processes, raises CheckpointError (on every process: none is left
    waiting in a collective) unless every process could make it and it is one directory they all see
    (process 0 writes a file there; every other process must find it within `wait_s`). A workdir on
    each host's own disk would otherwise save each process's part of a checkpoint on its own host, and
    a resume would find different steps on different hosts (and hang in a collective)."""
    path = epath.Path(directory)
    if jax.process_count() == 1:
        path.mkdir(parents=True, exist_ok=True)
        return
    from jax.experimental import multihost_utils

    _agree(directory, lambda: path.mkdir(parents=True, exist_ok=True), "making the directory")
    nonce = same_on_all_processes(int.from_bytes(os.urandom(6), "little"))
    probe = path / f".shared-check-{nonce}"

    def write():
        if jax.process_index() == 0:
            probe.write_text("osp_jax: written by process 0 to check that every process sees this directory\n")

    _agree(directory, write, "writing a file in it")  # also the barrier: the others look only after it is written
    deadline = time.monotonic() + wait_s
    while not (seen := uncached(probe).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    blind = np.flatnonzero(multihost_utils.process_allgather(np.asarray([int(seen)], np.int32)).reshape(-1) == 0)
    if jax.process_index() == 0:
        try:
            probe.unlink()
        except OSError as e:  # harmless: a uniquely named file
            log.warning("could not remove %s: %s", probe, e)
    if blind.size:
        raise CheckpointError(f"{directory} is not one shared directory: process(es) {blind.tolist()} cannot see "
                              "a file process 0 wrote there; mount the same storage at the same path on every host")


def agreed_latest_step(checkpointer: "Checkpointer") -> int | None:
    """The newest complete step, the same on every process, or CheckpointError naming what each saw."""
    if jax.process_count() == 1:
        return checkpointer.latest_step()
    from jax.experimental import multihost_utils

    try:
        latest = checkpointer.latest_step()
        mine = -1 if latest is None else latest
    except OSError as e:  # raised here alone, the others would wait in the gather below
        log.error("listing %s failed: %s", checkpointer.directory, e)
        mine = -2
    seen = multihost_utils.process_allgather(np.asarray([mine], np.int64)).reshape(-1)
    if -2 in seen.tolist():
        raise CheckpointError(f"listing {checkpointer.directory} failed on process(es) "
                              f"{np.flatnonzero(seen == -2).tolist()} (their logs say why)")
    if len(set(seen.tolist())) > 1:
        raise CheckpointError(f"the processes see different newest checkpoints in {checkpointer.directory} "
                              f"({dict(enumerate(int(s) for s in seen))}; -1: none): is it one shared directory?")
    return latest
