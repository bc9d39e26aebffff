"""A jax.profiler trace of chosen training steps (`train.profile_steps`), written where TensorBoard's
profile plugin and XProf look: WORKDIR/profile/plugins/profile/<run>/<host>.xplane.pb.

    tensorboard --logdir WORKDIR      # the Profile tab; or: xprof --logdir WORKDIR/profile

The trace starts before the batch of the first traced step is fetched (input time shows) and stops once the
last traced step's state is computed. Only process 0 traces unless `train.profile_all_processes`: each host
then writes its own file into the same run folder. A `gs://` workdir is passed to the profiler as it is
(its C++ writer reaches Cloud Storage on TPU VMs).
"""

from __future__ import annotations

import logging

import jax
from etils import epath

from osp_jax import config as config_lib

log = logging.getLogger("osp_jax")


class StepProfiler:
    """Starts and stops one trace around the steps of `train.profile_steps`. `before(step)` before the
    step that takes the state from `step` to `step + 1` (batch included), `after(step, state)` once the
    state is at `step`. A context manager: leaving it stops a trace still open (an error mid-window)."""

    def __init__(self, train_config, workdir: str, start_step: int):
        window = config_lib.profile_window(train_config.profile_steps)
        self.directory = str(epath.Path(workdir) / "profile")
        self.start, self.stop = window or (None, None)
        self.active = False
        traced_here = jax.process_index() == 0 or train_config.profile_all_processes
        if window is None or not traced_here:
            self.start = self.stop = None
        elif start_step > self.start:
            # Resumed inside or past the window: its first steps would be a recompilation's, not the run's.
            log.info("train.profile_steps=%s: not traced, this run starts at step %d", train_config.profile_steps,
                     start_step)
            self.start = self.stop = None

    def before(self, step: int) -> None:
        if step == self.start:
            log.info("profiling steps %d-%d into %s", self.start + 1, self.stop, self.directory)
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.stop:
            jax.block_until_ready(state)  # the trace holds the last step's device work, finished
            self._stop()
            log.info("wrote the profile of steps %d-%d under %s", self.start + 1, self.stop, self.directory)

    def _stop(self) -> None:
        self.active = False
        jax.profiler.stop_trace()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self._stop()
