"""The data-iterator state of every process, saved with the step by Grain's own checkpoint handler.

Grain writes one file per process, ``data/process_<i>-of-<n>.json``. The adapter below is the only hand-written
part: Grain's handler json-dumps a DatasetIterator's state as is (numpy scalars break it) and takes only bytes
from any other iterator, so every iterator's state goes through it as JSON bytes. Without Grain's handler, one
JSON item stores the state, which is right only for a single process.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from osp_jax.checkpoint.steps import step_path, uncached

try:
    from grain.checkpoint import CheckpointRestore as _GrainRestore
    from grain.checkpoint import CheckpointSave as _GrainSave
except ImportError:  # pragma: no cover - grain without orbax support
    _GrainSave = _GrainRestore = None

log = logging.getLogger("osp_jax.checkpoint")


def _json_default(obj):
    """numpy scalars and arrays in iterator states (grain recommends np.int64 counters)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"data-iterator state holds a {type(obj).__name__}, which JSON cannot store")


class StateAdapter:
    """Presents any iterator with get_state()/set_state() (dict or bytes state) to Grain's checkpoint handler."""

    def __init__(self, iterator):
        self._it = iterator

    def get_state(self) -> bytes:
        state = self._it.get_state()
        if isinstance(state, (bytes, bytearray)):
            return json.dumps({"bytes": bytes(state).decode()}).encode()
        return json.dumps({"json": state}, default=_json_default).encode()

    def set_state(self, state: bytes) -> None:
        wrapped = json.loads(state)
        self._it.set_state(wrapped["bytes"].encode() if "bytes" in wrapped else wrapped["json"])

    def start_prefetch(self) -> None:
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()


def save_args(iterator) -> ocp.args.CheckpointArgs:
    """The `data` item's save arguments for `iterator`."""
    if _GrainSave is not None:
        return _GrainSave(StateAdapter(iterator))
    return ocp.args.JsonSave({"state": StateAdapter(iterator).get_state().decode()})


def _layout_differs(step: int, meta: Mapping[str, Any], data_shards: list[int] | None) -> bool:
    """Whether the saved iterator states belong to another process count or data-shard layout (warned about)."""
    saved = meta.get("process_count")
    if saved is not None and int(saved) != jax.process_count():
        log.warning(
            "checkpoint step %d holds data-iterator state for %s processes but this job has %d; "
            "the iterator is left as it is (each process's position in the data cannot be mapped)",
            step, saved, jax.process_count(),
        )
        return True
    # Before data_shards were saved, each process read the shard of its own index.
    layout = meta.get("data_shards", list(range(int(saved))) if saved is not None else None)
    if data_shards is not None and layout is not None and list(layout) != list(data_shards):
        log.warning("checkpoint step %d holds data-iterator states for the processes' data shards %s, but "
                    "this job's are %s (another mesh): the iterator is left as it is, so processes that "
                    "share rows stay in step", step, list(layout), list(data_shards))
        return True
    return False


def restore(manager: ocp.CheckpointManager, step: int, meta: Mapping[str, Any], iterator,
            data_shards: list[int] | None) -> None:
    """Sets `iterator` to its state saved at `step`, if that step has one for this job's layout of data shards."""
    data_dir = uncached(step_path(manager.directory, step) / "data")
    if not data_dir.exists():
        log.info("checkpoint step %d has no data-iterator state; the iterator is left as it is", step)
        return
    if _layout_differs(step, meta, data_shards):
        return
    if any(p.name.startswith("process_") for p in data_dir.iterdir()):
        manager.restore(step, args=ocp.args.Composite(data=_GrainRestore(StateAdapter(iterator))))
    else:  # written by the JSON fallback
        state = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data["state"]
        StateAdapter(iterator).set_state(state.encode())
