"""One causal attention function with three backends: plain XLA, cuDNN flash (GPU), splash (TPU).

Shapes: q (batch, seq, heads, head_dim); k, v (batch, seq, kv_heads, head_dim) with kv_heads
dividing heads (grouped-query attention). `segment_ids` (batch, seq) keeps attention inside one
document of a packed window; None attends over the whole window.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BACKENDS = ("xla", "cudnn", "splash")
# The accelerator kernel `auto` picks on each platform, and so the platforms each kernel runs on.
PLATFORM_KERNELS = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


# cuDNN's fused attention takes half-precision inputs only (fp8 aside).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def pick_backend(name: str = "auto", platform: str | None = None, dtype=None) -> str:
    """`auto` picks splash on TPU, cuDNN on GPU and XLA elsewhere; on a GPU, XLA too when the inputs'
    `dtype` is one cuDNN does not take (a float32 model such as configs/tiny.py)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"attention backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
        return name
    platform = platform or jax.default_backend()
    backend = PLATFORM_KERNELS.get(platform, "xla")
    if backend == "cudnn" and dtype is not None and jnp.dtype(dtype) not in CUDNN_DTYPES:
        return "xla"
    return backend


def runnable_here(name: str, platform: str | None = None) -> bool:
    """Whether backend `name` (or auto) runs on `platform` (default: JAX's): a kernel only where it was
    written for, XLA and auto anywhere."""
    platform = platform or jax.default_backend()
    return name not in PLATFORM_KERNELS.values() or PLATFORM_KERNELS.get(platform) == name


def attention(q, k, v, segment_ids=None, *, backend: str = "auto", max_segments: int = 0):
    """Causal softmax attention; returns (batch, seq, heads, head_dim) in q's dtype.

    `max_segments` only matters to cuDNN (see `cudnn_attention`); 0 keeps the dense document mask.
    The XLA and splash backends ignore it.
    """
    backend = pick_backend(backend, dtype=q.dtype)
    if backend == "cudnn" and q.dtype not in CUDNN_DTYPES:
        raise ValueError(f"the cuDNN attention backend takes bfloat16 or float16 inputs, not {q.dtype}: "
                         "set model.attention='auto' or 'xla', or model.dtype='bfloat16'")
    if backend == "xla":
        return xla_attention(q, k, v, segment_ids)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, max_segments=max_segments)
    return splash_attention(q, k, v, segment_ids)


def _mask(seq: int, segment_ids):
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]
    if segment_ids is None:
        return causal
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same_doc


def xla_attention(q, k, v, segment_ids=None):
    """The reference: exact softmax attention in float32, written with einsums."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)  # group query heads by the key/value head they share
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    mask = _mask(s, segment_ids)[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)


def packed_segments(segment_ids, max_segments: int):
    """Describes each row's documents as cuDNN's packed (ragged) layout wants them.

    A segment is a run of equal ids; a new one starts wherever the id differs from the previous
    position's (padding, id 0, is just one more segment: it attends to itself, causally, and its
    outputs stay finite). Returns, for `segment_ids` (batch, seq):

      seqlen  (batch, max_segments) int32: the length of each segment, in order; -1 past the last.
      offsets (batch, max_segments + 1) int32: where each segment starts within its row; -1 past the
              last (so the final column is always -1: jax's `_fix_seqlen_offsets` fills it with the
              end of the whole batch when it flattens the rows).
      count   (batch,) int32: the number of segments in each row. A row with more than
              `max_segments` is described only up to its first `max_segments` segments, which
              cuDNN must not be given: the caller checks `count` (see `cudnn_attention`).

    Pure jnp and jittable (`max_segments` static), so it runs and is tested on any backend.
    """
    ids = jnp.asarray(segment_ids)
    starts = jnp.concatenate([jnp.ones_like(ids[:, :1], dtype=bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    index = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1      # each position's segment, 0-based
    count = index[:, -1] + 1
    slots = jnp.arange(max_segments, dtype=jnp.int32)
    lengths = jnp.sum(index[:, :, None] == slots, axis=1, dtype=jnp.int32)  # (batch, max_segments)
    begins = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths        # exclusive prefix sum
    present = slots < count[:, None]
    seqlen = jnp.where(present, lengths, -1)
    offsets = jnp.where(present, begins, -1)
    offsets = jnp.concatenate([offsets, jnp.full_like(offsets[:, :1], -1)], axis=1)
    return seqlen, offsets, count


def cudnn_attention(q, k, v, segment_ids=None, *, implementation: str = "cudnn", max_segments: int = 0):
    """cuDNN flash attention (GPU only).

    Causality stays the kernel's own mask type, so cuDNN skips the blocks above the diagonal. The
    document boundaries of a packed window reach cuDNN one of two ways:

    - dense (`max_segments=0`, or any `implementation` but "cudnn"): a (batch, 1, seq, seq) mask
      through `jax.nn.dot_product_attention`, which cuDNN reads as a bias over every unskipped block:
      slow (a profile on an H100 measured ~200 TFLOP/s, and 9% of a train step against no mask).
    - packed (`max_segments=M > 0`): each row's documents as cuDNN's ragged layout, per-row segment
      lengths and offsets (`packed_segments`), so every document is its own causal sequence and no
      mask is read. M is static: cuDNN's softmax statistics become (batch * M, heads, seq) float32
      (M times the dense path's) and its grid covers batch * M sequences, so M should be near the
      most documents a window holds, not far above it. A batch in which some row has more than M
      segments runs the dense path instead (`jax.lax.cond`: both paths are compiled, one runs).
      The packed layout needs a Hopper GPU and cuDNN >= 9.6; elsewhere the dense path runs.

    `implementation="xla"` runs the dense call on any backend (how the mask handling is tested).
    """
    if segment_ids is None:
        return _cudnn_causal(q, k, v, implementation=implementation)
    dense = functools.partial(_cudnn_dense, implementation=implementation)
    if implementation != "cudnn" or max_segments <= 0 or not _packed_layout_supported():
        return dense(q, k, v, segment_ids)
    seqlen, offsets, count = packed_segments(segment_ids, max_segments)
    seqlen, offsets = _batch_sharded(seqlen), _batch_sharded(offsets)
    # max_segments=1: one segment per row has no boundary to mask, and plain causal attention is the
    # packed layout (jax treats a single segment per row as no packing at all).
    packed = _cudnn_causal if max_segments == 1 else _cudnn_packed
    too_many = lambda q, k, v, *_: dense(q, k, v, segment_ids)
    return jax.lax.cond(count.max() > max_segments, too_many, packed, q, k, v, seqlen, offsets)


def _cudnn_dense(q, k, v, segment_ids, *, implementation: str):
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def _cudnn_causal(q, k, v, *_, implementation: str = "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _cudnn_packed(q, k, v, seqlen, offsets):
    """cuDNN's packed layout through jax's private cuDNN SDPA API (`jax.nn.dot_product_attention`
    wraps the same function but exposes no segment offsets)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    h, kv = q.shape[2], k.shape[2]
    if kv != h:
        # jax's `_fix_seqlen_offsets` turns both the query and the key/value offsets into element
        # strides with the *query's* heads x head_dim, which misplaces key/value segments when
        # kv_heads < heads; so give cuDNN one key/value head per query head.
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    return dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                 kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                 mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


@functools.lru_cache(maxsize=None)
def _packed_layout_supported() -> bool:
    """jax's packed cuDNN layout needs compute capability >= 9.0 (Hopper) and cuDNN >= 9.6."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        capability = tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
        return capability >= (9, 0) and check_cudnn_version() >= 90600
    except (RuntimeError, AttributeError, ImportError):  # no GPU, no cuDNN, or jax moved the API
        return False


def _batch_sharded(x):
    """Splits a (batch, ...) array's batch as the ambient rules split activations' "batch" axis.

    cuDNN's custom partitioning hands each device its local query rows together with the segment
    lengths/offsets *as they are sharded*, so these must be split over the batch exactly like q.
    """
    mesh = _partitioned_mesh()
    if mesh is None:
        return x
    batch_axes = _dividing(mesh, _mesh_spec(("batch",), mesh)[0], x.shape[0])
    return jax.lax.with_sharding_constraint(x, P(batch_axes, *(None,) * (x.ndim - 1)))


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False):
    """Pallas splash attention (TPU). `interpret=True` runs the kernel in Pallas' interpreter (any backend).

    Mosaic kernels cannot be partitioned by XLA, so under a mesh of more than one device the kernel
    runs inside `jax.shard_map`: batch and heads split as the ambient logical-axis rules split the
    "batch" and "heads" activation axes, each device attending over its own examples and heads.
    """
    mesh = _partitioned_mesh()
    if mesh is None:
        return _splash_local(q, k, v, segment_ids, interpret=interpret)
    b, _, h, _ = q.shape
    kv = k.shape[2]
    batch_axes, _, head_axes, _ = _mesh_spec(("batch", "length", "heads", "head_dim"), mesh)
    batch_axes = _dividing(mesh, batch_axes, b)
    head_axes = _dividing(mesh, head_axes, h, kv)
    qkv_spec = P(batch_axes, None, head_axes, None)
    seg_spec = P(batch_axes, None)
    local = functools.partial(_splash_local, interpret=interpret)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                             out_specs=qkv_spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


def _mesh_spec(logical_axes, mesh):
    """Mesh axes for logical activation axes under the ambient flax rules (unknown names: replicated)."""
    from flax import linen as nn

    spec = nn.logical_to_mesh_axes(logical_axes)
    names = set(mesh.axis_names)

    def keep(entry):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if a in names)
        return axes or None

    return tuple(keep(e) for e in spec)


def _partitioned_mesh():
    """The ambient mesh when arrays may be split over it: None for no mesh, one device, or inside
    shard_map (where arrays are already per device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def _dividing(mesh, axes, *sizes):
    """`axes` if their combined size divides every one of `sizes`, else None (replicated)."""
    n = math.prod(dict(mesh.shape)[a] for a in axes or ())
    return None if any(size % n for size in sizes) else axes


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    """Splash on one device's arrays: (batch, seq, heads, head_dim), kv_heads dividing heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, d = q.shape
    kv = k.shape[2]
    block = min(128, s)  # the kernel's default tile, or the whole sequence when it is shorter
    if s % block:
        raise ValueError(f"splash attention needs the sequence length ({s}) to be a multiple of {block}; "
                         "use attention='xla' or pad the sequence")
    blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(h)])
    # MQA (one key/value head) has its own kernel; the MHA kernel handles GQA (kv_heads dividing heads).
    make = sk.make_splash_mqa if kv == 1 and h > 1 else sk.make_splash_mha
    kernel = make(mask=mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    # splash wants (heads, seq, head_dim) per example and pre-scaled queries.
    q_t = jnp.swapaxes(q, 1, 2) * jnp.asarray(d ** -0.5, q.dtype)
    k_t, v_t = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if kv == 1 and h > 1:
        k_t, v_t = k_t[:, 0], v_t[:, 0]
    if segment_ids is None:
        out = jax.vmap(kernel)(q_t, k_t, v_t)
    else:
        seg = jax.vmap(lambda ids: sk.SegmentIds(q=ids, kv=ids))(segment_ids)
        out = jax.vmap(functools.partial(_call_with_segments, kernel))(q_t, k_t, v_t, seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _call_with_segments(kernel, q, k, v, segment_ids):
    return kernel(q, k, v, segment_ids=segment_ids)
