"""Per-leaf checksums and the finiteness check of a train state: jitted passes over its leaves, on the devices.

Hand-written because Orbax records no checksum: its zstd-compressed TensorStore chunks carry none, so a flipped byte
restores silently as wrong numbers. Each save records an order-independent 2 x 32-bit checksum of every leaf's bits
(`start`, resolved later by the meta item's writer); each restore recomputes it (`verify`).

Both are sums mod 2**32 of per-element terms, so the result is exact whatever the sharding, the number of processes
or the reduction order: a state saved on 256 chips checks out when restored on one.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from osp_jax.checkpoint.errors import CheckpointError

_K1, _K2, _K3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)

# Leaves read per jitted call: a pass holds a few uint32 copies of what it reads, so one call over a whole 1.4B
# tree doubled the memory of a params-only restore (9.0 -> 18.4 GB); batches bound that.
_BATCH_BYTES = 256 << 20


def leaf_name(path) -> str:
    """'params/w' for a NamedTuple field and a dict key alike (Orbax stores NamedTuples as dicts): the names the
    saved checksums and the mismatch messages use."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


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


def _leaf_sums(x):
    """[s1, s2]: two weighted sums mod 2**32 of the leaf's bits."""
    u = _as_uint32(x)
    i = _flat_index(u.shape)
    s1 = jnp.sum(u * ((i * _K1) | np.uint32(1)), dtype=jnp.uint32)  # odd weights: any one changed word shows
    h = u ^ (i * _K2)
    h = (h ^ (h >> 16)) * _K3
    s2 = jnp.sum(h ^ (h >> 13), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


@functools.lru_cache(maxsize=None)
def _pass(kind: str, out_sharding):
    """One jitted pass over a list of leaves: "finite" -> bool[n], "sums" -> uint32[n, 2]. The result is replicated
    (`out_sharding`) so that any thread can read it from this process's devices, with no collective."""
    per_leaf = {"finite": _all_finite, "sums": _leaf_sums}[kind]
    fn = lambda leaves: jnp.stack([per_leaf(x) for x in leaves])  # noqa: E731
    return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def _replicated(sharding):
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None


def _device_key(sharding) -> tuple[int, ...]:
    """Leaves with the same (ordered) devices can share one jit call."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        return tuple(d.id for d in mesh.devices.flat)
    return tuple(sorted(d.id for d in sharding.device_set))


def _batches(items) -> Iterator[list[tuple[str, Any]]]:
    """`items` (name, device array) of one device set, in batches of at most `_BATCH_BYTES` a device."""
    batch, size = [], 0
    for name, leaf in items:
        nbytes = leaf.size * leaf.dtype.itemsize // max(1, len(leaf.sharding.device_set))
        if batch and size + nbytes > _BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append((name, leaf))
        size += nbytes
    if batch:
        yield batch


def _dispatch(tree, kind: str, wanted) -> Iterator[tuple[list[str], Any]]:
    """Runs the `kind` pass over the leaves of `tree` that `wanted(dtype)` accepts, one batch at a time, and yields
    (names, result array) for each as soon as it is dispatched: a caller that reads each result before asking
    for the next holds one batch's working memory at a time."""
    groups: dict[tuple[int, ...], list[tuple[str, Any]]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not wanted(leaf.dtype):
            continue
        if isinstance(leaf, jax.Array):
            groups.setdefault(_device_key(leaf.sharding), []).append((leaf_name(path), leaf))
        else:  # host arrays go one at a time: memory stays at one leaf's copy
            yield [leaf_name(path)], _pass(kind, None)([jnp.asarray(leaf)])
    for items in groups.values():
        out_sharding = _replicated(items[0][1].sharding)
        for batch in _batches(items):
            yield [n for n, _ in batch], _pass(kind, out_sharding)([leaf for _, leaf in batch])


def _to_host(x) -> np.ndarray:
    """A pass's result on the host. Replicated results (the usual case) need no collective, so this is safe from
    any thread; anything else is gathered, which all processes must do together, on their main threads."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def nonfinite_leaves(tree) -> list[str]:
    """Names of the floating leaves of `tree` that hold a NaN or an infinity; waits for the answer."""
    floating = lambda dtype: jnp.issubdtype(dtype, jnp.inexact) and _digestible(dtype)  # noqa: E731
    return [name for names, flags in _dispatch(tree, "finite", floating)
            for name, ok in zip(names, _to_host(flags)) if not ok]


class Pending:
    """Checksums of a state, computing on its devices; `result()` waits for them ({leaf name: {"dtype", "bits"}})
    and may be called from any thread (Orbax's background save thread calls it)."""

    def __init__(self, parts, dtypes: dict[str, str]):
        # A result that is not replicated (a sharding other than NamedSharding, several processes) is gathered
        # now, on the caller's thread, where the collective is safe.
        self._parts = [(names, sums if sums.is_fully_addressable or sums.is_fully_replicated else _to_host(sums))
                       for names, sums in parts]
        self._dtypes = dtypes

    def result(self) -> dict[str, dict]:
        out = {}
        for names, sums in self._parts:
            host = sums if isinstance(sums, np.ndarray) else _to_host(sums)
            for name, bits in zip(names, host):
                out[name] = {"dtype": self._dtypes[name], "bits": [int(v) for v in bits]}
        return out


def _dtypes(tree) -> dict[str, str]:
    return {leaf_name(p): str(x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def start(tree) -> Pending:
    """Starts computing the checksums of `tree` on its devices and returns without waiting. All batches are
    dispatched at once (on CPU the 124M state's passes, in flight together, raised the peak memory by nothing
    measurable). Leaves of exotic dtypes (complex, sub-byte) are left out: still saved, just not checked."""
    return Pending(list(_dispatch(tree, "sums", _digestible)), _dtypes(tree))


def verify(tree, recorded: Mapping[str, Any] | None, step: int) -> None:
    """Raises CheckpointError if a restored leaf's bits differ from what was recorded at save time (leaves the
    record does not name pass)."""
    if not recorded:
        return
    bad, dtypes = [], _dtypes(tree)
    for names, sums in _dispatch(tree, "sums", _digestible):  # batch by batch: a restore's memory stays bounded
        for name, bits in zip(names, _to_host(sums)):
            want = recorded.get(name)
            # A leaf restored as another dtype (a deliberate cast) cannot be compared bit for bit.
            if want and want["dtype"] == dtypes[name] and want["bits"] != [int(v) for v in bits]:
                bad.append(name)
    if bad:
        raise CheckpointError(
            f"step {step}: data of {len(bad)} array(s) does not match the checksum recorded at save time "
            f"(first: {', '.join(bad[:5])}); the files are corrupt"
        )
