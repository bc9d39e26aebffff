"""One causal attention function with three backends: plain XLA, cuDNN flash (GPU), splash (TPU).

Shapes: q (batch, seq, heads, head_dim); k, v (batch, seq, kv_heads, head_dim) with kv_heads
dividing heads (grouped-query attention). `segment_ids` (batch, seq) keeps attention inside one
document of a packed window; None attends over the whole window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def cudnn_attention(q, k, v, segment_ids=None):
    """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU only)."""
    mask = None if segment_ids is None else _mask(q.shape[1], segment_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=segment_ids is None,
                                        implementation="cudnn")


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False):
    """Pallas splash attention (TPU). `interpret=True` runs the kernel in Pallas' interpreter."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, d = q.shape
    kv = k.shape[2]
    mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(h)])
    make = sk.make_splash_mha if kv == h else sk.make_splash_mqa_single_device
    kernel = make(mask=mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    # splash wants (heads, seq, head_dim) per example and pre-scaled queries.
    q_t = jnp.swapaxes(q, 1, 2) * (d ** -0.5)
    k_t, v_t = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if kv != h:
        if kv != 1:
            raise NotImplementedError("splash GQA with 1 < kv_heads < heads: use attention='xla'")
        k_t, v_t = k_t[:, 0], v_t[:, 0]
    if segment_ids is None:
        out = jax.vmap(kernel)(q_t, k_t, v_t)
    else:
        seg = jax.vmap(lambda ids: sk.SegmentIds(q=ids, kv=ids))(segment_ids)
        out = jax.vmap(functools.partial(_call_with_segments, kernel))(q_t, k_t, v_t, seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _call_with_segments(kernel, q, k, v, segment_ids):
    return kernel(q, k, v, segment_ids=segment_ids)
