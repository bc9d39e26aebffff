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

from osp_jax.checkpoint.errors import CheckpointMismatch
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


# The config key that lets a resume start the data again where it cannot go on from the saved position.
RESTART_KEY = "train.allow_data_restart"


def _read_saved_state(data_dir, process: int, process_count: int) -> dict:
    """The state process `process` of `process_count` saved, as Grain's handler wrote it (named, not listed)."""
    path = data_dir / f"process_{process}-of-{process_count}.json"
    return json.loads(uncached(path).read_text())["json"]  # StateAdapter's wrapping of a dict state


def _refuse_or_restart(step: int, why: str, iterator, allow_restart: bool | None) -> None:
    """Raises CheckpointMismatch naming RESTART_KEY, unless a restart is allowed: then warns and starts the
    iterator again from the beginning of its data."""
    if not allow_restart:
        raise CheckpointMismatch(f"checkpoint step {step}: {why}; set {RESTART_KEY}=True to start the data "
                                 "again from its beginning instead")
    log.warning("checkpoint step %d: %s; the data starts again from its beginning (%s)", step, why, RESTART_KEY)
    if hasattr(iterator, "restart"):
        iterator.restart()


def _identity_changes(step: int, saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str | None:
    """What differs between the data a position was saved on and this run's (`identity`: the keys of
    `train.seed`, `data.path` and the data's content, "data.content"), as the reason to refuse it; None if
    nothing that moves the data differs. A moved data.path with the same content is only logged."""
    if current is None:
        return None
    if saved is None:
        log.info("checkpoint step %d records no data identity (saved before it was recorded): the data position is "
                 "applied without checking train.seed and data.path", step)
        return None
    changed = [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in current
               if key != "data.content" and saved.get(key) != current.get(key)]
    if saved.get("data.content") == current.get("data.content"):
        if changed == [f"data.path {saved.get('data.path')!r} -> {current.get('data.path')!r}"]:
            log.warning("checkpoint step %d: %s, the same content (tokenizer and train shards): the data position "
                        "goes on there", step, changed[0])
            return None
        return ", ".join(changed) or None
    old, new = saved.get("data.content") or {}, current.get("data.content") or {}
    what = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new.keys() | old.keys()) if old.get(k) != new.get(k)]
    changed.append(f"the content of data.path={current.get('data.path')!r} ({'; '.join(what)})")
    return ", ".join(changed)


def restore(manager: ocp.CheckpointManager, step: int, meta: Mapping[str, Any], iterator,
            data_shards: list[int] | None, identity: Mapping[str, Any] | None = None,
            allow_restart: bool | None = True) -> None:
    """Sets `iterator` to the data position saved at `step`, if it belongs to this run's data (`identity`,
    against the one `meta` records). On the layout of data shards that saved it, from this process's own state; on
    another (another process count or mesh), through `iterator.set_state_from` where the iterator can map it
    (osp_jax.data.streams), reading the states of the processes that held its part. Where the data differs, or
    the position cannot be mapped, refuses (CheckpointMismatch naming RESTART_KEY) unless `allow_restart`, which
    starts the data again (the library default, for any iterator)."""
    data_dir = uncached(step_path(manager.directory, step) / "data")
    if not data_dir.exists():
        log.info("checkpoint step %d has no data-iterator state; the iterator is left as it is", step)
        return
    changed = _identity_changes(step, meta.get("data"), identity)
    if changed:
        _refuse_or_restart(step, f"its data position belongs to other data than this run's: {changed}", iterator,
                           allow_restart)
        return
    saved = meta.get("process_count")
    # Before data_shards were saved, each process read the shard of its own index.
    layout = list(meta.get("data_shards", range(int(saved)) if saved is not None else []))
    same_count = saved is None or int(saved) == jax.process_count()
    if same_count and (data_shards is None or not layout or layout == list(data_shards)):
        _restore_own(manager, step, data_dir, iterator, allow_restart)
        return
    if same_count:
        where = (f"its data position was saved by processes reading data shards {layout}, but this job's are "
                 f"{list(data_shards)} (another mesh)")
    else:
        where = f"its data position was saved by {saved} processes, but this job has {jax.process_count()}"
    if not hasattr(iterator, "set_state_from"):
        _refuse_or_restart(step, f"{where}, and this input cannot map a position between layouts", iterator,
                           allow_restart)
        return
    from osp_jax.data.pipeline import PipelineError  # the data's own refusals (no import of it at load time)

    try:
        iterator.set_state_from(layout, lambda i: _read_saved_state(data_dir, i, int(saved)))
    except PipelineError as e:
        _refuse_or_restart(step, f"{where}: {e}", iterator, allow_restart)
        return
    log.info("checkpoint step %d: the data position of %s processes (data shards %s) goes on in this job's %d",
             step, saved, layout, jax.process_count())


def _restore_own(manager, step: int, data_dir, iterator, allow_restart: bool | None) -> None:
    """This process's own saved state, read by Grain's handler (or the JSON item the fallback wrote)."""
    from osp_jax.data.pipeline import PipelineError

    try:
        if any(p.name.startswith("process_") for p in data_dir.iterdir()):
            manager.restore(step, args=ocp.args.Composite(data=_GrainRestore(StateAdapter(iterator))))
        else:  # written by the JSON fallback
            state = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data["state"]
            StateAdapter(iterator).set_state(state.encode())
    except PipelineError as e:  # e.g. another data.worker_count: a position grain cannot map
        _refuse_or_restart(step, str(e), iterator, allow_restart)
