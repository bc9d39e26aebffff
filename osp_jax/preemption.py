"""Preemption notices: when the train loop saves a checkpoint and stops for a SIGTERM.

A scheduler that is about to take the machines sends SIGTERM first (a TPU VM's maintenance event, GKE,
SLURM's `--signal=TERM@300`). The loop asks `PreemptionNotice.reached(step)` before each step; on True
it saves that step and exits 0. Every process must answer the same at the same step, or they would
save different steps (or one would wait in a collective for ever). Three ways, picked once:

- **one process**: a Python SIGTERM handler sets a flag, read before each step.
- **several processes, jax's preemption service** (`jax.distributed`'s default): jax's own SIGTERM
  notifier tells the coordination service, which tells every process; each step asks
  `multihost_utils.reached_preemption_sync_point(step)`, a local check (about 15 us, no device
  collective), which turns True on every process at the same step, the first one after all heard.
- **several processes without it** (`jax_enable_preemption_service=False`): the Python flag, agreed
  by a tiny all-gather every `every` steps (the train loop's `log_every`, where it syncs anyway).
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _preemption_service_running() -> bool:
    """True where `jax.distributed.initialize` started jax's preemption sync manager."""
    try:
        from jax._src import distributed
    except ImportError:  # a jax that moved it: fall back to the all-gather
        return False
    state = distributed.global_state
    return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionNotice:
    """Use as a context manager around the train loop.

    On leaving, the SIGTERM handler it replaced (if it set one) is put back, so a script that trains
    several runs in one process stays killable between and after them; a notice that came after the
    loop's last check (the loop ended without stopping for it) is delivered again to that handler.
    """

    def __init__(self, every: int = 1):
        self.every = max(int(every), 1)
        self.flag = False          # this process received SIGTERM (Python-handler modes)
        self.stopped = False       # the loop saved and stopped for the notice
        self._previous = None
        self._installed = False
        if jax.process_count() == 1:
            self.mode = "signal"
        elif _preemption_service_running():
            self.mode = "service"
        else:
            self.mode = "allgather"

    def __enter__(self) -> "PreemptionNotice":
        if self.mode == "service":
            return self  # jax's notifier owns SIGTERM; a Python handler would hide it from jax
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
            log.warning("not on the main thread: SIGTERM will not be caught by the train loop")
        return self

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        self._installed = False
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        if self.flag and not self.stopped:
            log.warning("SIGTERM arrived after the last step; passing it on")
            signal.raise_signal(signal.SIGTERM)

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop. Call it before every step, with the same step on every
        process (the service counts on it)."""
        if self.mode == "signal":
            return self.flag
        if self.mode == "service":
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        if step % self.every:
            return False
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))
