"""Checkpoints: the sharded train state, the Grain iterator state, the config and a little metadata, via Orbax.

Layout of one step, ``WORKDIR/checkpoints/<step>/`` (written by ``ocp.CheckpointManager``)::

    state/    the train-state pytree (OCDBT; every process writes its own shards)
    data/     per-process Grain iterator state, ``process_<i>-of-<n>.json``
    config/   the resolved config (JSON, primary host only)
    meta/     step, time, process count, versions and a checksum of every state leaf (JSON, primary host only)
    commit_success.txt, _CHECKPOINT_METADATA

Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it at the end (on gs://, into ``<step>``
directly), with ``commit_success.txt`` last; a step counts as complete only by Orbax's commit-file finalisation
check (`steps`), so a torn or partly copied directory is never chosen. Each save checks that the state is finite
before writing anything and records a checksum of every leaf, which a restore recomputes (`checksums`): a
mismatch or an unreadable file makes the restore fall back to the previous complete step, and the newer ones it
skipped (and unfinished saves) are renamed ``<step>.unreadable-<UTC time>`` so that those steps are saved again;
nothing is ever deleted (`recovery`). A step whose saved tree does not fit the state asked for (another model or
optimizer config) is no corruption: restore stops there with CheckpointMismatch.

Modules: `checkpointer` (the Checkpointer), `steps` (steps on disk), `checksums`, `recovery` (fall-back and
set-aside), `metadata` (the JSON items), `iterator_state` (Grain's handler), `multihost` (agreement between
processes), `params_only` (parameters without a mesh), `errors`.
"""
from osp_jax.checkpoint.checkpointer import Checkpointer
from osp_jax.checkpoint.errors import CheckpointError, CheckpointMismatch
from osp_jax.checkpoint.multihost import agreed_latest_step, all_processes_ok, make_shared_directory
from osp_jax.checkpoint.params_only import restore_params_only
from osp_jax.checkpoint.steps import find_checkpoint_dir

__all__ = ["CheckpointError", "CheckpointMismatch", "Checkpointer", "agreed_latest_step", "all_processes_ok",
           "find_checkpoint_dir", "make_shared_directory", "restore_params_only"]
