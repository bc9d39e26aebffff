"""`Checkpointer`: periodic, asynchronous saves of the train state with its data-iterator state, and restores onto
any mesh, over one `ocp.CheckpointManager`.

Orbax does the saving, the save schedule (`should_save`), retention (`max_to_keep`), the step names and the
finalisation; this class adds what a long run needs on top: a NaN never saved, checksums verified on restore, a
fall-back from an unreadable step that keeps it (`recovery`), and the processes agreeing at every branch.
"""
from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp

from osp_jax.checkpoint import checksums, iterator_state, recovery
from osp_jax.checkpoint import steps as steps_lib
from osp_jax.checkpoint.errors import CheckpointError, describe
from osp_jax.checkpoint.metadata import MetaRestore, MetaSave, jsonable, meta_fields
from osp_jax.checkpoint.multihost import all_processes_ok, same_on_all_processes

log = logging.getLogger("osp_jax.checkpoint")


class Checkpointer:
    """Periodic, optionally asynchronous checkpoints of a sharded train state plus data-iterator state.

    All processes must call every method (saves and restores are collective); only the primary host writes
    the JSON items, every process writes its own array shards and iterator state.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        if int(save_every) < 1:
            raise ValueError(f"checkpoint save_every={save_every!r}: expected an integer >= 1")
        if int(keep) < 1:
            raise ValueError(f"checkpoint keep={keep!r}: expected an integer >= 1")
        self.directory = steps_lib.absolute(directory)
        self.save_every, self.keep = int(save_every), int(keep)
        # Each process's data shard (sharding.data_shards), if the caller says: saved with the iterator
        # states, which a resume restores only onto the same layout.
        self.data_shards: list[int] | None = None
        # What the data position belongs to (train.seed, data.path, the data's content), saved in `meta` and
        # checked on restore; and whether a position that cannot be applied starts the data again (True: the
        # library's default) or is refused (iterator_state.restore).
        self.data_identity: dict | None = None
        self.allow_data_restart: bool = True
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            # Every `save_every` steps or on a preemption signal; no extra save at a fresh run's first step.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(self.save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            enable_async_checkpointing=bool(async_save),
            step_name_format=steps_lib.NAME_FORMAT,  # which steps are complete: steps.COMMIT_RULE
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # -- saving ------------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True every `save_every` steps (or on preemption) unless `step` is not newer than the last save, or its
        directory holds an unfinished save (which `save` will not overwrite: `set_aside_torn` moves it)."""
        step = int(step)
        # The storage is asked only when Orbax says yes: once every `save_every` steps, not every step.
        return bool(self._mngr.should_save(step)) and not self._step_dir_exists(step)

    def _step_dir_exists(self, step: int) -> bool:
        """Process 0's answer on every process: where a save writes in place (gs://), a process that looked later
        would see the directory process 0 has just begun, skip the save, and leave the others waiting for it."""
        return bool(same_on_all_processes(int(steps_lib.uncached(steps_lib.step_path(self.directory, step)).exists())))

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None, force: bool = False) -> bool:
        """Save `state` (and iterator state, config) at `step`; returns whether a save was started.

        Raises CheckpointError, writing nothing, if a floating leaf of `state` is NaN or infinite. With
        async_save the call returns once the finiteness check is done and Orbax holds the arrays; the checksums
        and the writes finish in the background, and `wait()` blocks until the step is final.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._mngr.all_steps():  # saved by this manager (a forced final save after a periodic one)
            log.info("checkpoint for step %d already saved; not saving it again", step)
            return False
        if self._step_dir_exists(step):
            log.warning("a directory for step %d already exists in %s; not overwriting it", step, self.directory)
            return False
        # Finiteness is checked before anything is written (a non-finite state must never become a checkpoint);
        # the checksums, a costlier pass, are left computing for the meta item to wait for in the background.
        bad = checksums.nonfinite_leaves(state)
        if bad:
            raise CheckpointError(
                f"refusing to save step {step}: {len(bad)} leaf(s) of the train state hold NaN or Inf "
                f"(first: {', '.join(bad[:5])}); nothing was written to {self.directory}"
            )
        meta = MetaSave(meta_fields(step, self.data_shards, self.data_identity), checksums.start(state))
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": meta}
        if config is not None:
            items["config"] = ocp.args.JsonSave(jsonable(config))
        if data_iterator is not None:
            items["data"] = iterator_state.save_args(data_iterator)
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until any in-flight asynchronous save is final (re-raises its error, if it failed)."""
        self._mngr.wait_until_finished()

    # -- listing -----------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (an in-flight save appears once it is final). Read from the storage
        each time, not from the manager's own list: other processes and runs write there too."""
        return steps_lib.complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- restoring ---------------------------------------------------------------------------------------------

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None) -> tuple[int, Any]:
        """Restore `step` (default: latest) onto the shardings of `abstract_state`; returns (step, state).

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set, or a function of the step
        tried and its saved tree (`state_metadata`, read once) that returns one; the mesh may differ from the
        one that saved. A corrupt or unreadable step is skipped for the previous complete one; once one
        restores, the newer steps skipped (and unfinished saves) are moved aside, one warning line each
        (`recovery.set_aside`). A step whose saved leaves do not have the paths and shapes asked for raises
        CheckpointMismatch, as does the function for a step it refuses.
        """
        self.wait()

        def read_one(s: int):
            restored = err = None
            try:
                saved = self.state_metadata(s)
                target = abstract_state(s, saved) if callable(abstract_state) else abstract_state
                recovery.check_fits(saved, target, s)
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=MetaRestore())
                restored = self._mngr.restore(s, args=args)
            except Exception as e:  # noqa: BLE001 - re-raised below once every process knows
                err = e
            if not all_processes_ok(err is None):
                raise err or CheckpointError(f"step {s}: another process could not read its part")
            meta = restored.meta or {}
            checksums.verify(restored.state, meta.get("checksums"), s)
            if data_iterator is not None:
                iterator_state.restore(self._mngr, s, meta, data_iterator, self.data_shards, self.data_identity,
                                       self.allow_data_restart)
            return restored.state

        candidates = recovery.candidates(self.directory, step, warn_unfinished=False)
        restored_step, state, failed = recovery.try_steps(self.directory, candidates, read_one)
        recovery.set_aside(self.directory, failed, restored_step, step, self._mngr.reload)
        return restored_step, state

    def set_aside_torn(self, newer_than: int = -1) -> None:
        """Moves aside the unfinished saves (no commit: saves that never finished) newer than `newer_than`, as
        restore does for those newer than the step it restores, so that those steps are saved again."""
        recovery.set_aside(self.directory, {}, newer_than, None, self._mngr.reload)

    def state_metadata(self, step: int):
        """The state saved at `step`: a tree of Orbax ArrayMetadata (shape, dtype); no array is read."""
        return steps_lib.saved_tree(steps_lib.step_path(self.directory, step))

    def read_config(self, step: int | None = None) -> dict | None:
        """The config saved with `step` (default: latest complete), or None if there is none.

        Raises CheckpointError if the config item is there but cannot be read.
        """
        step = self.latest_step() if step is None else int(step)
        item = None if step is None else steps_lib.step_path(self.directory, step) / "config"
        if item is None or not steps_lib.uncached(item).exists():
            return None
        try:
            return dict(self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
        except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt or unreadable"
            raise CheckpointError(f"step {step}: the config saved in {item} cannot be read ({describe(e)})") from e

    def close(self) -> None:
        """Finish in-flight saves and release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
