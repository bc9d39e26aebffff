"""Checkpoints: the sharded train state, the Grain iterator state, the config and a little metadata, via Orbax.

Layout of one step, ``WORKDIR/checkpoints/<step>/`` (written by ``ocp.CheckpointManager``)::

    state/    the train-state pytree (OCDBT; every process writes its own shards)
    data/     per-process Grain iterator state, ``process_<i>-of-<n>.json``
    config/   the resolved config (JSON, primary host only)
    meta/     step, time, process count, versions and a checksum of every state leaf (JSON, primary host only)
    commit_success.txt, _CHECKPOINT_METADATA

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only once every item is
written; ``commit_success.txt`` is written just before the rename. A step counts as complete only if it has that
marker, so a torn or hand-copied directory is never chosen.

Zstd-compressed array chunks carry no checksum: a flipped byte restores silently as wrong numbers. So each save
records an order-independent 2x32-bit checksum of every leaf's bits, and restore recomputes it; a mismatch (or an
unreadable file) makes restore warn and fall back to the previous complete step. Once a step restores, the newer
ones it skipped (and torn ones) are renamed ``<step>.unreadable-<UTC time>`` so that those steps are saved again;
nothing is ever deleted. A step whose saved tree does not fit the state asked for (another model or optimizer
config) is no corruption: restore stops there with CheckpointMismatch.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

try:  # grain writes one iterator-state file per process; JSON below is the fallback.
    from grain.checkpoint import CheckpointRestore as _GrainRestore
    from grain.checkpoint import CheckpointSave as _GrainSave
except ImportError:  # pragma: no cover - grain without orbax support
    _GrainSave = _GrainRestore = None

__all__ = ["CheckpointError", "CheckpointMismatch", "Checkpointer", "find_checkpoint_dir", "restore_params_only"]

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # Orbax 0.12 writes it into a step dir right before finalising it
_MAX_ERR_CHARS = 400  # TensorStore errors embed the whole spec: keep log lines readable


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which step, where and why."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint holds another train state than this run's (model or optimizer config changed)."""


def _absolute(directory) -> epath.Path:
    """Orbax needs absolute paths; a relative local one is taken from the working directory."""
    path = os.fspath(directory)
    if "://" not in path:
        path = os.path.abspath(path)
    return epath.Path(path)


def find_checkpoint_dir(workdir) -> str:
    """Where a run keeps its checkpoints: ``WORKDIR/checkpoints``."""
    return str(_absolute(workdir) / "checkpoints")


# ----------------------------------------------------------------------------------------------------------------
# Leaf checksums and the finiteness check (one jitted pass over the state).

_K1, _K2, _K3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)


def _digestible(dtype) -> bool:
    """Whether `_as_uint32` can take this dtype (not complex, not sub-byte)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.bool_:
        return True
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits in (8, 16, 32, 64)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits in (8, 16, 32, 64)
    return False


def _as_uint32(x):
    """The bits of `x` as uint32 (64-bit types gain a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits == 32 or bits == 64:
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _flat_index(shape):
    """Row-major element index (mod 2**32) built from iotas, so it shards like the array it weighs."""
    idx, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride & 0xFFFFFFFF)
        stride *= shape[axis]
    return idx


def _leaf_digest(x):
    """(all finite, [s1, s2]): sums mod 2**32, so the result is exact whatever the sharding or reduction order."""
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    u = _as_uint32(x)
    i = _flat_index(u.shape)
    s1 = jnp.sum(u * ((i * _K1) | np.uint32(1)), dtype=jnp.uint32)  # odd weights: any one changed word shows
    h = u ^ (i * _K2)
    h = (h ^ (h >> 16)) * _K3
    s2 = jnp.sum(h ^ (h >> 13), dtype=jnp.uint32)
    return finite, jnp.stack([s1, s2])


@jax.jit
def _digest_leaves(leaves):
    outs = [_leaf_digest(x) for x in leaves]
    return jnp.stack([f for f, _ in outs]), jnp.stack([s for _, s in outs])


def _to_host(x) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path) -> str:
    """'params/w' for both a NamedTuple field and a dict key: Orbax stores NamedTuples as dicts."""
    return "/".join(_key_name(k) for k in path)


def _device_key(sharding) -> tuple[int, ...]:
    """Leaves with the same (ordered) devices can share one jit call."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        return tuple(d.id for d in mesh.devices.flat)
    return tuple(sorted(d.id for d in sharding.device_set))


def _digest_tree(tree) -> dict[str, tuple[bool, dict | None]]:
    """{leaf path: (all finite, {"dtype", "bits": [s1, s2]} or None)}, one jit call per group of devices."""
    groups: dict[tuple[int, ...], list[tuple[str, Any]]] = {}
    out: dict[str, tuple[bool, dict | None]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _digestible(np.dtype(leaf.dtype) if not isinstance(leaf, jax.Array) else leaf.dtype):
            out[_path_str(path)] = (True, None)  # exotic dtype: still saved, just not checked
            continue
        if not isinstance(leaf, jax.Array):
            # Host arrays (a params-only restore on CPU) go one at a time: memory stays at one leaf's copy.
            finite, sums = _digest_leaves([jnp.asarray(leaf)])
            out[_path_str(path)] = (bool(finite[0]), {"dtype": str(leaf.dtype), "bits": [int(v) for v in sums[0]]})
            continue
        groups.setdefault(_device_key(leaf.sharding), []).append((_path_str(path), leaf))
    for items in groups.values():
        for batch in _by_size(items, _DIGEST_BATCH_BYTES):
            finite, sums = _digest_leaves([leaf for _, leaf in batch])
            finite, sums = _to_host(finite), _to_host(sums)
            for j, (name, leaf) in enumerate(batch):
                out[name] = (bool(finite[j]), {"dtype": str(leaf.dtype), "bits": [int(v) for v in sums[j]]})
    return out


# Leaves digested per call: the pass holds a few uint32 copies of what it reads, so one call over a
# whole 1.4B tree doubled the memory of a params-only restore (9.0 -> 18.4 GB); batches bound that.
_DIGEST_BATCH_BYTES = 256 << 20


def _by_size(items, limit: int):
    batch, size = [], 0
    for name, leaf in items:
        nbytes = leaf.size * leaf.dtype.itemsize // max(1, len(leaf.sharding.device_set))
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append((name, leaf))
        size += nbytes
    if batch:
        yield batch


def _verify(tree, checksums: Mapping[str, Any] | None, step: int) -> None:
    """Raise CheckpointError if a restored leaf's bits differ from what was saved (leaves unknown to meta pass)."""
    if not checksums:
        return
    bad = []
    for name, (_, digest) in _digest_tree(tree).items():
        want = checksums.get(name)
        # A leaf restored as another dtype (a deliberate cast) cannot be compared bit for bit.
        if digest and want and want["dtype"] == digest["dtype"] and want["bits"] != digest["bits"]:
            bad.append(name)
    if bad:
        raise CheckpointError(
            f"step {step}: data of {len(bad)} array(s) does not match the checksum recorded at save time "
            f"(first: {', '.join(bad[:5])}); the files are corrupt"
        )


def _state_tree(step_dir: epath.Path):
    """The saved state's tree, leaves Orbax's ArrayMetadata (shape, dtype): its structure, no array read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(step_dir / "state").tree
    finally:
        handler.close()


def _stored_shape(x) -> tuple[int, ...]:
    """The shape Orbax stores for `x` (a typed PRNG key as its raw key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(x.shape)


def _check_fits(saved_tree, target, step: int) -> None:
    """Raise CheckpointMismatch unless the saved leaves have the paths and shapes of `target`'s (dtypes may differ:
    a restore casts)."""
    saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    want = {_path_str(p): _stored_shape(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    if saved == want:
        return
    diffs = [f"{k}: saved {saved.get(k, 'absent')}, asked for {want.get(k, 'absent')}"
             for k in sorted(saved.keys() | want.keys()) if saved.get(k) != want.get(k)]
    raise CheckpointMismatch(
        f"step {step} holds another train state than the one asked for ({len(diffs)} leaves differ, first: "
        f"{'; '.join(diffs[:3])}): it was saved with another model or optimizer config (it is not corrupt)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Steps on disk.


def _complete_steps(directory: epath.Path) -> list[int]:
    """Finalised steps, ascending: a ``<digits>`` directory holding Orbax's commit marker."""
    if not directory.exists():
        return []
    steps = []
    for p in directory.iterdir():
        if p.name.isdigit() and p.is_dir() and (p / COMMIT_MARKER).exists():
            steps.append(int(p.name))
    return sorted(steps)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > _MAX_ERR_CHARS:
        text = text[:_MAX_ERR_CHARS] + " ..."
    return f"{type(err).__name__}: {text}"


def all_processes_ok(ok: bool) -> bool:
    """True if every process got `ok`; all processes must take the same branch around collectives."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def _same_on_all_processes(value: int) -> int:
    """Process 0's value everywhere, so every process restores the same step."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def make_shared_directory(directory: str, wait_s: float = 10.0) -> None:
    """Makes `directory`; with several processes, raises CheckpointError (on every process: none is left
    waiting in a collective) unless every process could make it and it is one directory they all see
    (process 0 writes a file there; every other process must find it within `wait_s`). A workdir on
    each host's own disk would otherwise save each process's part of a checkpoint on its own host, and
    a resume would find different steps on different hosts (and hang in a collective)."""
    if jax.process_count() == 1:
        os.makedirs(directory, exist_ok=True)
        return
    import time

    from jax.experimental import multihost_utils

    def agree(action, what: str) -> None:
        try:
            action()
            error = None
        except OSError as e:
            error = e
        if not all_processes_ok(error is None):
            raise CheckpointError(f"{directory}: {what} failed " + (f"here: {error}" if error else
                                                                    "on another process (its log says why)"))

    agree(lambda: os.makedirs(directory, exist_ok=True), "making the directory")
    nonce = _same_on_all_processes(int.from_bytes(os.urandom(6), "little"))
    probe = os.path.join(directory, f".shared-check-{nonce}")

    def write():
        if jax.process_index() == 0:
            with open(probe, "w") as f:
                f.write("osp_jax: written by process 0 to check that every process sees this directory\n")

    agree(write, "writing a file in it")  # also the barrier: the others look only after it is written
    deadline = time.monotonic() + wait_s
    while not (seen := os.path.exists(probe)) and time.monotonic() < deadline:
        time.sleep(0.5)
    blind = np.flatnonzero(multihost_utils.process_allgather(np.asarray([int(seen)], np.int32)).reshape(-1) == 0)
    if jax.process_index() == 0:
        try:
            os.remove(probe)
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


def _candidates(directory: epath.Path, step: int | None) -> list[int]:
    """Complete steps to try, newest first, starting at `step` (or the latest)."""
    steps = _complete_steps(directory)
    if step is None:
        return steps[::-1]
    step = int(step)
    if step not in steps:
        torn = directory.exists() and any(
            p.name == str(step) or p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in directory.iterdir()
        )
        if not torn:
            raise CheckpointError(f"no checkpoint for step {step} in {directory}; complete steps: {steps}")
        log.warning(
            "checkpoint step %d in %s is incomplete (no %s: the save was interrupted); "
            "falling back to the previous complete step",
            step, directory, COMMIT_MARKER,
        )
    return [s for s in steps if s <= step][::-1]


def _try_steps(directory: epath.Path, candidates: list[int], read_one, collective: bool = True) -> tuple[int, Any]:
    """`read_one(step)` on each candidate until one succeeds; warn about every failure; never delete anything.
    A CheckpointMismatch (the step does not fit) is no corruption: it is raised at once, older steps untried.

    collective: all processes run this together and must agree on each outcome (False: a process-local read).
    """
    if not candidates:
        raise CheckpointError(f"no complete checkpoint in {directory}")
    agree = all_processes_ok if collective else bool
    tried = []
    for i, step in enumerate(candidates):
        step = _same_on_all_processes(step) if collective else step
        result = err = None
        try:
            result = read_one(step)
        except Exception as e:  # noqa: BLE001 - any other failure to read means "corrupt or unreadable"
            err = e
        # Every process moves on to the same next step, or none does.
        if agree(err is None):
            return step, result
        mismatch = isinstance(err, CheckpointMismatch)
        if not agree(not mismatch):
            raise err if mismatch else CheckpointMismatch(f"step {step}: another process found it does not fit")
        err = err or CheckpointError(f"step {step}: another process could not read its part")
        tried.append(f"step {step}: {_short(err)}")
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
        log.warning(
            "checkpoint at step %d (%s) is corrupt or unreadable: %s; %s",
            step, directory / str(step), _short(err),
            f"falling back to step {nxt}" if nxt is not None else "no earlier complete checkpoint to fall back to",
        )
        log.debug("full error for step %d", step, exc_info=err)
    raise CheckpointError(f"no checkpoint in {directory} could be restored; tried " + "; ".join(tried))


# ----------------------------------------------------------------------------------------------------------------
# JSON and iterator-state helpers.


def _jsonable(obj):
    """A config as plain JSON values (ConfigDicts, tuples, numpy scalars...); anything else becomes its repr."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("osp_jax")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a checkout)
        import osp_jax

        return str(getattr(osp_jax, "__version__", "unknown"))


def _json_default(obj):
    """numpy scalars and arrays in iterator states (grain recommends np.int64 counters)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"data-iterator state holds a {type(obj).__name__}, which JSON cannot store")


class _StateAdapter:
    """Presents any iterator with get_state()/set_state() (dict or bytes state) to grain's checkpoint handler.

    Grain's handler json-dumps a DatasetIterator's state as is (numpy scalars break it) and needs bytes from
    anything else; this wrapper gives it bytes for every iterator, one JSON file per process.
    """

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


# ----------------------------------------------------------------------------------------------------------------


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
        self.directory = _absolute(directory)
        self.save_every, self.keep = int(save_every), int(keep)
        # Each process's data shard (sharding.data_shards), if the caller says: saved with the iterator
        # states, which a resume restores only onto the same layout.
        self.data_shards: list[int] | None = None
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=self.save_every,
            # Every `save_every` steps or on a preemption signal; no extra save at a fresh run's first step.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(self.save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # -- saving ------------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True every `save_every` steps (or on preemption) unless `step` is not newer than the last save."""
        return bool(self._mngr.should_save(int(step)))

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None, force: bool = False) -> bool:
        """Save `state` (and iterator state, config) at `step`; returns whether a save was started.

        Raises CheckpointError, writing nothing, if a floating leaf of `state` is NaN or infinite. With
        async_save the call returns once arrays are on the host; `wait()` blocks until the write is final.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        if step in self._mngr.all_steps():  # e.g. a forced final save right after a periodic one
            log.info("checkpoint for step %d already saved; not saving it again", step)
            return False
        if (self.directory / str(step)).exists():
            log.warning("a directory for step %d already exists in %s; not overwriting it", step, self.directory)
            return False
        digests = _digest_tree(state)
        bad = [name for name, (finite, _) in digests.items() if not finite]
        if bad:
            raise CheckpointError(
                f"refusing to save step {step}: {len(bad)} leaf(s) of the train state hold NaN or Inf "
                f"(first: {', '.join(bad[:5])}); nothing was written to {self.directory}"
            )
        meta = {
            "step": step,
            "time": time.time(),
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "process_count": jax.process_count(),
            **({"data_shards": list(self.data_shards)} if self.data_shards is not None else {}),
            "device_count": jax.device_count(),
            "osp_jax_version": _version(),
            "jax_version": jax.__version__,
            "orbax_version": ocp.__version__,
            "checksums": {name: d for name, (_, d) in digests.items() if d is not None},
        }
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(_jsonable(config))
        if data_iterator is not None:
            if _GrainSave is not None:
                items["data"] = _GrainSave(_StateAdapter(data_iterator))
            else:  # one JSON for everyone: only right when there is one process
                items["data"] = ocp.args.JsonSave({"state": _StateAdapter(data_iterator).get_state().decode()})
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until any in-flight asynchronous save is final (re-raises its error, if it failed)."""
        self._mngr.wait_until_finished()

    # -- listing -----------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (an in-flight save appears once it is final)."""
        return _complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- restoring ---------------------------------------------------------------------------------------------

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None) -> tuple[int, Any]:
        """Restore `step` (default: latest) onto the shardings of `abstract_state`; returns (step, state).

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set, or a function of the step
        tried and its saved tree (`state_metadata`, read once) that returns one; the mesh may differ from the one that saved. A corrupt or unreadable step is
        reported and skipped for the previous complete one; once one restores, the newer steps skipped (and
        torn ones) are moved aside (`_set_aside`). A step whose saved leaves do not have the paths and shapes
        asked for raises CheckpointMismatch, as does the function for a step it refuses.
        """
        self.wait()

        def read_one(s: int):
            restored = err = None
            try:
                saved = self.state_metadata(s)
                target = abstract_state(s, saved) if callable(abstract_state) else abstract_state
                _check_fits(saved, target, s)
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
                restored = self._mngr.restore(s, args=args)
            except Exception as e:  # noqa: BLE001 - re-raised below once every process knows
                err = e
            if not all_processes_ok(err is None):
                raise err or CheckpointError(f"step {s}: another process could not read its part")
            meta = restored.meta or {}
            _verify(restored.state, meta.get("checksums"), s)
            if data_iterator is not None:
                self._restore_data(s, meta, data_iterator)
            return restored.state

        candidates = _candidates(self.directory, step)
        restored_step, state = _try_steps(self.directory, candidates, read_one)
        self._set_aside([s for s in candidates if s > restored_step], restored_step, step)
        return restored_step, state

    def _set_aside(self, skipped: list[int], restored: int, upto: int | None) -> None:
        """Renames the `skipped` step directories, and torn ones (no commit marker) newer than `restored` (up
        to `upto`), to ``<step>.unreadable-<UTC time>``, logging each, then reloads Orbax's step list: those
        steps are saved again instead of being taken as done. Nothing is deleted."""
        limit = float("inf") if upto is None else int(upto)
        torn = [int(p.name) for p in self.directory.iterdir()
                if p.name.isdigit() and restored < int(p.name) <= limit and not (p / COMMIT_MARKER).exists()]
        self._move_aside(sorted(set(skipped) | set(torn)))

    def set_aside_torn(self, newer_than: int = -1) -> None:
        """Moves aside the torn step directories (no commit marker: saves that never finished) newer than
        `newer_than`, as restore does for those newer than the step it restores: a run with nothing to restore
        would otherwise never save those steps (Orbax lists them as done)."""
        self._set_aside([], newer_than, None)

    def _move_aside(self, steps: list[int]) -> None:
        """Renames each step directory in `steps` to ``<step>.unreadable-<UTC time>`` (process 0, logged),
        then reloads Orbax's step list."""
        if all_processes_ok(not steps):
            return
        if jax.process_index() == 0:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            for s in steps:
                aside = self.directory / f"{s}.unreadable-{stamp}"
                (self.directory / str(s)).rename(aside)
                log.warning("checkpoint step %d is unreadable or incomplete; moved it aside to %s (kept, not deleted) "
                            "so that step %d is saved again", s, aside, s)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("osp_jax.checkpoint: unreadable steps moved aside")
        self._mngr.reload()

    def _restore_data(self, step: int, meta: Mapping[str, Any], data_iterator) -> None:
        data_dir = self.directory / str(step) / "data"
        if not data_dir.exists():
            log.info("checkpoint step %d has no data-iterator state; the iterator is left as it is", step)
            return
        saved = meta.get("process_count")
        if saved is not None and int(saved) != jax.process_count():
            log.warning(
                "checkpoint step %d holds data-iterator state for %s processes but this job has %d; "
                "the iterator is left as it is (each process's position in the data cannot be mapped)",
                step, saved, jax.process_count(),
            )
            return
        # Before data_shards were saved, each process read the shard of its own index.
        layout = meta.get("data_shards", list(range(int(saved))) if saved is not None else None)
        if self.data_shards is not None and layout is not None and list(layout) != list(self.data_shards):
            log.warning("checkpoint step %d holds data-iterator states for the processes' data shards %s, but "
                        "this job's are %s (another mesh): the iterator is left as it is, so processes that "
                        "share rows stay in step", step, list(layout), list(self.data_shards))
            return
        if any(p.name.startswith("process_") for p in data_dir.iterdir()):
            self._mngr.restore(step, args=ocp.args.Composite(data=_GrainRestore(_StateAdapter(data_iterator))))
        else:  # written by the JSON fallback
            state = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data["state"]
            _StateAdapter(data_iterator).set_state(state.encode())

    def state_metadata(self, step: int):
        """The state saved at `step`: a tree of Orbax ArrayMetadata (shape, dtype); no array is read."""
        return _state_tree(self.directory / str(int(step)))

    def read_config(self, step: int | None = None) -> dict | None:
        """The config saved with `step` (default: latest complete), or None if there is none.

        Raises CheckpointError if the config item is there but cannot be read.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None or not (self.directory / str(step) / "config").exists():
            return None
        try:
            return dict(self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
        except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt or unreadable"
            raise CheckpointError(f"step {step}: the config saved in {self.directory / str(step) / 'config'} "
                                  f"cannot be read ({_short(e)})") from e

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


# ----------------------------------------------------------------------------------------------------------------


def restore_params_only(workdir, step: int | None = None) -> tuple[int, Any, dict | None]:
    """(step, params as numpy arrays, config) from WORKDIR's checkpoints, on CPU, without a mesh.

    Reads only the `params` subtree of the saved state (Orbax partial restore), whatever mesh wrote it.
    Process-local: safe to call from one process of a multi-process job. Falls back to the previous
    complete step, with a warning, if the chosen one is unreadable.
    """
    directory = epath.Path(find_checkpoint_dir(workdir))
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: any local device will do
        cpu = jax.local_devices()[0]
    json_handler = ocp.JsonCheckpointHandler()

    def read_json(step_dir: epath.Path, item: str):
        return json_handler.restore(step_dir / item) if (step_dir / item).exists() else None

    def read_one(s: int):
        step_dir = directory / str(s)
        if not (step_dir / "state").exists():
            raise CheckpointError(f"step {s}: no 'state' item in {step_dir}")
        tree = _state_tree(step_dir)
        if "params" not in tree:
            raise CheckpointError(f"step {s}: the saved state has no 'params' entry (it has {sorted(tree)})")
        target = {
            "params": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(cpu)),
                tree["params"],
            )
        }
        # The handler itself, not ocp.Checkpointer: that one ends with a barrier over all processes.
        handler = ocp.PyTreeCheckpointHandler()
        try:
            restored = handler.restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                ),
            )
        finally:
            handler.close()
        meta = read_json(step_dir, "meta") or {}
        _verify(restored, meta.get("checksums"), s)
        return jax.tree.map(np.asarray, restored["params"]), read_json(step_dir, "config")

    s, (params, config) = _try_steps(directory, _candidates(directory, step), read_one, collective=False)
    return s, params, config
