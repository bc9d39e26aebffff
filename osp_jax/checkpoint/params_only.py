"""`restore_params_only`: a checkpoint's parameters as numpy arrays, for evaluation and export, without a mesh."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from osp_jax.checkpoint import checksums, recovery
from osp_jax.checkpoint import steps as steps_lib
from osp_jax.checkpoint.errors import CheckpointError


def _cpu():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: any local device will do
        return jax.local_devices()[0]


def _read_params(step_dir: epath.Path, device):
    """The `params` subtree of the state saved in `step_dir`, onto `device` (Orbax partial restore)."""
    tree = steps_lib.saved_tree(step_dir)
    if "params" not in tree:
        raise CheckpointError(f"{step_dir}: the saved state has no 'params' entry (it has {sorted(tree)})")
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                     tree["params"])}
    # The handler itself, not ocp.Checkpointer: that one ends with a barrier over all processes.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    finally:
        handler.close()


def restore_params_only(workdir, step: int | None = None) -> tuple[int, Any, dict | None]:
    """(step, params as numpy arrays, config) from WORKDIR's checkpoints, on CPU, without a mesh.

    Reads only the `params` subtree of the saved state, whatever mesh wrote it. Process-local: safe to call
    from one process of a multi-process job. Falls back to the previous complete step, with a warning, if the
    chosen one is unreadable; it moves nothing aside (a read-only load: the training run does that).
    """
    directory = epath.Path(steps_lib.find_checkpoint_dir(workdir))
    device = _cpu()
    json_handler = ocp.JsonCheckpointHandler()

    def read_json(step_dir: epath.Path, item: str):
        return json_handler.restore(step_dir / item) if steps_lib.uncached(step_dir / item).exists() else None

    def read_one(s: int):
        step_dir = steps_lib.step_path(directory, s)
        if not steps_lib.uncached(step_dir / "state").exists():
            raise CheckpointError(f"step {s}: no 'state' item in {step_dir}")
        restored = _read_params(step_dir, device)
        meta = read_json(step_dir, "meta") or {}
        checksums.verify(restored, meta.get("checksums"), s)
        return jax.tree.map(np.asarray, restored["params"]), read_json(step_dir, "config")

    candidates = recovery.candidates(directory, step)
    s, (params, config), failed = recovery.try_steps(directory, candidates, read_one, collective=False)
    recovery.report_fallback(directory, failed, s)
    return s, params, config
