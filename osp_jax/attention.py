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


def pick_backend(name: str = "auto", platform: str | None = None) -> str:
    """`auto` picks splash on TPU, cuDNN on GPU and XLA elsewhere."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"attention backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
        return name
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def attention(q, k, v, segment_ids=None, *, backend: str = "auto"):
    """Causal softmax attention; returns (batch, seq, heads, head_dim) in q's dtype."""
    backend = pick_backend(backend)
    if backend == "xla":
        return xla_attention(q, k, v, segment_ids)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
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


def cudnn_attention(q, k, v, segment_ids=None, *, implementation: str = "cudnn"):
    """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU only).

    Causality stays the kernel's own mask type, so cuDNN skips the blocks above the diagonal; only
    the document boundaries of a packed window travel as a (batch, 1, seq, seq) mask.
    `implementation="xla"` runs the same call on any backend (how the mask handling is tested).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False):
    """Pallas splash attention (TPU). `interpret=True` runs the kernel in Pallas' interpreter (any backend).

    Mosaic kernels cannot be partitioned by XLA, so under a mesh of more than one device the kernel
    runs inside `jax.shard_map`: batch and heads split as the ambient logical-axis rules split the
    "batch" and "heads" activation axes, each device attending over its own examples and heads.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:  # one device, or already inside shard_map
        return _splash_local(q, k, v, segment_ids, interpret=interpret)
    b, _, h, _ = q.shape
    kv = k.shape[2]
    batch_axes, _, head_axes, _ = _mesh_spec(("batch", "length", "heads", "head_dim"), mesh)
    if b % _axes_size(mesh, batch_axes):
        batch_axes = None
    if h % _axes_size(mesh, head_axes) or kv % _axes_size(mesh, head_axes):
        head_axes = None
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


def _axes_size(mesh, axes) -> int:
    return math.prod(dict(mesh.shape)[a] for a in axes or ())


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
