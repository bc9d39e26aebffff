"""Round-to-nearest fake quantisation (quantise, then dequantise, in float32) of weights, activations, KV.

The paper's W4A4KV4 setting, as evaluate.py runs it:

- **Weights**: symmetric, one scale per output channel (reduced over the input axes; the scanned
  `layers` axis is independent), levels -(2^(b-1)-1) .. 2^(b-1)-1. Optionally a per-channel MSE
  search over clip ratios (`CLIP_GRID`, 1.0 down to 0.5), which never does worse than no clip as 1.0
  is on the grid. Every linear kernel is quantised, the LM head included; the token embedding is a
  lookup, not a matmul, and stays in full precision. Norm scales are not quantised.
- **Activations**: the input of every linear layer (q/k/v, o, gate/up, down, LM head), asymmetric per
  token: min/max over the token's feature axes, widened to include 0 so zero is exact, an integer
  zero point and levels 0 .. 2^b-1.
- **Keys and values**: asymmetric per token and head, in groups of 128 along head_dim (the whole
  head_dim if smaller); keys after RoPE.
- **FFN Hadamard** (the paper's "+FFN Had"): the SwiGLU hidden state is rotated online, h' = h @ H,
  and the down projection offline, W' = H^T W, so the full-precision function is unchanged; then
  h' is activation-quantised and W' weight-quantised. H is orthonormal of size ffn_dim: writing
  ffn_dim = 2^k * m with m odd, H = S ⊗ Q, S the normalised Sylvester-Hadamard matrix of size 2^k
  and Q a fixed random orthogonal m x m matrix (QR of a seed-0 Gaussian; Q = [1] when m = 1). It is
  applied in its Kronecker form, (ffn_dim) * (2^k + m) multiply-adds a token instead of ffn_dim^2.

- **Per-head q/k rotation** (`QuantSpec.rotate_qk_heads`, QuaRot's): queries and keys rotated over
  head_dim by the same H after RoPE, online, so q.k is unchanged and the keys are quantised rotated.
  The rest of QuaRot (norm folding, residual and value rotations) is folded into the weights by
  osp_jax.rotation; osp_jax.ptq puts the pieces together, and GPTQ (osp_jax.gptq) rounds to the
  weight grid here (`weight_scale`, `round_sym`).

A bit width of 16 means no quantisation of that kind: the op is skipped, exactly the identity.

EmbProj is multiplied into the embedding and LM head first (`fold_embproj`), and the head untied,
so what is quantised is the plain Llama that export writes.

    spec = QuantSpec(a_bits=4, kv_bits=4, hadamard_ffn=True)
    params, model_cfg = fold_embproj(params, model_cfg)
    params = quantize_weights(rotate_ffn(params), bits=4, clip_search=True)
    logits = Transformer(model_cfg, quant=spec).apply({"params": params}, tokens)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from osp_jax import roles

NO_QUANT = 16            # a bit width of 16 means "leave this in full precision"
MIN_BITS = 2
CLIP_GRID = tuple(float(r) for r in np.linspace(1.0, 0.5, 11))  # weight clip ratios tried by the MSE search
KV_GROUP = 128


class Bits(NamedTuple):
    """Bit widths of weights, activations and the KV cache (16 = not quantised)."""

    w: int
    a: int
    kv: int

    def __str__(self) -> str:
        return f"W{self.w}A{self.a}KV{self.kv}"


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= NO_QUANT:
        raise ValueError(f"{what}={bits!r}: expected an integer in {MIN_BITS}..{NO_QUANT} ({NO_QUANT} = no quantisation)")
    return int(bits)


def parse_bits(text: str) -> Bits:
    """'4,4,4' -> Bits(4, 4, 4); a clear ValueError for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    hint = f"expected three integers W,A,KV in {MIN_BITS}..{NO_QUANT} ({NO_QUANT} = no quantisation), e.g. 4,4,4"
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--bits={text!r}: {hint}")
    values = [int(p) for p in parts]
    for name, v in zip(("weight", "activation", "kv"), values):
        if not MIN_BITS <= v <= NO_QUANT:
            raise ValueError(f"--bits={text!r}: {name} bits {v} out of range; {hint}")
    return Bits(*values)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What the model fake-quantises at run time (weights are quantised beforehand, see quantize_weights).

    Passed as `Transformer(config, quant=spec)`; None (the default) leaves the model untouched.
    """

    a_bits: int = NO_QUANT
    kv_bits: int = NO_QUANT
    hadamard_ffn: bool = False
    kv_group: int = KV_GROUP
    # QuaRot's per-head rotation of queries and keys after RoPE (a Hadamard over head_dim, online: it
    # cancels in q.k), so the keys are quantised rotated; values are rotated offline (osp_jax.rotation).
    rotate_qk_heads: bool = False

    def __post_init__(self):
        check_bits(self.a_bits, "QuantSpec.a_bits")
        check_bits(self.kv_bits, "QuantSpec.kv_bits")
        if self.kv_group < 1:
            raise ValueError(f"QuantSpec.kv_group={self.kv_group!r}: expected a positive integer")


# ----------------------------------------------------------------------------------------------------
# Quantisers: float32 in, same dtype out.


def _axes(axes, ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,))))


def fake_quant_asym(x: jax.Array, bits: int, axes=-1) -> jax.Array:
    """Asymmetric RTN over `axes` (one scale and integer zero point per slice); 2^bits levels."""
    if bits >= NO_QUANT:
        return x
    axes = _axes(axes, x.ndim)
    x32 = x.astype(jnp.float32)
    levels = 2.0 ** bits - 1
    lo = jnp.minimum(jnp.min(x32, axis=axes, keepdims=True), 0.0)  # include 0: it stays exact
    hi = jnp.maximum(jnp.max(x32, axis=axes, keepdims=True), 0.0)
    scale = (hi - lo) / levels
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero slice: q = 0 gives it back exactly
    zero = jnp.round(-lo / scale)
    q = jnp.clip(jnp.round(x32 / scale) + zero, 0.0, levels)
    return ((q - zero) * scale).astype(x.dtype)


def sym_scale(x: jax.Array, bits: int, axes=-1, clip_ratio=1.0) -> jax.Array:
    """The symmetric grid's step over `axes` (kept as size-1 axes): clip_ratio * max|x| / (2^(bits-1) - 1),
    1 for an all-zero slice (q = 0 gives it back exactly)."""
    axes = _axes(axes, x.ndim)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) * clip_ratio / (2.0 ** (bits - 1) - 1)
    return jnp.where(scale > 0, scale, 1.0)


def round_sym(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """x rounded to the symmetric grid of step `scale` (broadcastable), levels -(2^(b-1)-1) .. 2^(b-1)-1,
    computed in float32 (float64 for float64 input)."""
    qmax = 2.0 ** (bits - 1) - 1
    x_c = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32, or float64 where jax has it enabled
    return (jnp.clip(jnp.round(x_c / scale), -qmax, qmax) * scale).astype(x.dtype)


def fake_quant_sym(x: jax.Array, bits: int, axes=-1, clip_ratio=1.0) -> jax.Array:
    """Symmetric RTN over `axes`: scale = clip_ratio * max|x| / (2^(bits-1) - 1); 2^bits - 1 levels.

    `clip_ratio` may be an array broadcastable to the per-slice scale (one ratio a channel).
    """
    if bits >= NO_QUANT:
        return x
    return round_sym(x, sym_scale(x, bits, axes, clip_ratio), bits)


def weight_scale(w: jax.Array, bits: int, in_axes, clip_search: bool = False,
                 grid: tuple[float, ...] = CLIP_GRID) -> jax.Array:
    """The per-output-channel step of `quantize_weight` (`in_axes` kept as size-1 axes): GPTQ rounds to
    the same grid. With `clip_search`, each channel's clip ratio of `grid` with the least squared
    error (ties keep the larger ratio)."""
    in_axes = _axes(in_axes, w.ndim)
    if not clip_search:
        return sym_scale(w, bits, in_axes)
    w32 = w.astype(jnp.float32)
    best, best_err = None, None
    for ratio in sorted(grid, reverse=True):
        scale = sym_scale(w32, bits, in_axes, ratio)
        err = jnp.sum((round_sym(w32, scale, bits) - w32) ** 2, axis=in_axes, keepdims=True)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = jnp.where(better, scale, best), jnp.where(better, err, best_err)
    return best


def quantize_weight(w: jax.Array, bits: int, in_axes, clip_search: bool = False,
                    grid: tuple[float, ...] = CLIP_GRID) -> jax.Array:
    """Per-output-channel symmetric RTN of a kernel; `in_axes` are reduced, every other axis keeps its
    own scales (`weight_scale`, optionally clip-searched)."""
    if bits >= NO_QUANT:
        return w
    return round_sym(w, weight_scale(w, bits, in_axes, clip_search, grid), bits)


def check_kv_head_dim(head_dim: int, kv_bits: int, group: int = KV_GROUP) -> None:
    """ValueError unless keys and values of `head_dim` can be quantised at `kv_bits`: in groups of `group`
    along head_dim (the whole head when it is smaller), so a larger head_dim must be a multiple of it.
    (QuaRot's per-head Hadamard takes any head_dim: hadamard_matrix has a factor for its odd part.)"""
    g = min(group, head_dim)
    if kv_bits < NO_QUANT and head_dim % g:
        raise ValueError(f"keys and values are quantised in groups of {group} along head_dim, and this model's "
                         f"head_dim {head_dim} is not a multiple of {g}; evaluate it with KV bits {NO_QUANT}")


def quantize_kv(x: jax.Array, bits: int, group: int = KV_GROUP) -> jax.Array:
    """Keys or values (batch, seq, kv_heads, head_dim): asymmetric RTN in groups of `group` along head_dim."""
    if bits >= NO_QUANT:
        return x
    hd = x.shape[-1]
    g = min(group, hd)
    check_kv_head_dim(hd, bits, group)
    grouped = x.reshape(*x.shape[:-1], hd // g, g)
    return fake_quant_asym(grouped, bits, -1).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# Model hooks (called from osp_jax.model only when a QuantSpec is given).


def activations(x: jax.Array, spec: QuantSpec, feature_axes=-1) -> jax.Array:
    """Input of a linear layer: asymmetric per token over its feature axes."""
    return fake_quant_asym(x, spec.a_bits, feature_axes)


def kv(x: jax.Array, spec: QuantSpec) -> jax.Array:
    return quantize_kv(x, spec.kv_bits, spec.kv_group)


def qk_heads(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Queries or keys (batch, seq, heads, head_dim) after RoPE: Hadamard-rotated over head_dim when
    `spec.rotate_qk_heads` (both sides of q.k alike, so the scores are unchanged)."""
    return hadamard_transform(x) if spec.rotate_qk_heads else x


def ffn_hidden(h: jax.Array, spec: QuantSpec) -> jax.Array:
    """Input of the down projection: optionally Hadamard-rotated (down kernel rotated by rotate_ffn), then quantised."""
    if spec.hadamard_ffn:
        h = hadamard_transform(h)
    return activations(h, spec)


# ----------------------------------------------------------------------------------------------------
# Hadamard rotation.


def _split_pow2(n: int) -> tuple[int, int]:
    """n = 2^k * m with m odd -> (2^k, m)."""
    if n < 1:
        raise ValueError(f"Hadamard size {n}: expected a positive integer")
    p = n & -n
    return p, n // p


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
    """Normalised Sylvester-Hadamard matrix of size n (a power of two); entries +-1/sqrt(n)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@functools.lru_cache(maxsize=None)
def _odd_orthogonal(m: int) -> np.ndarray:
    """A fixed random orthogonal m x m matrix (identity for m = 1): QR of a seed-0 Gaussian, signs fixed."""
    if m == 1:
        return np.ones((1, 1))
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((m, m)))
    return q * np.sign(np.diag(r))


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal (n, n) matrix H used for the FFN rotation (float64; see the module doc)."""
    p, m = _split_pow2(n)
    return np.kron(_sylvester(p), _odd_orthogonal(m))


def hadamard_transform(x, axis: int = -1):
    """x @ H along `axis`, through H's Kronecker factors; float32 (or float64 for numpy float64 input)."""
    n = x.shape[axis]
    p, m = _split_pow2(n)
    xp = np if isinstance(x, np.ndarray) else jnp
    dtype = np.float64 if (xp is np and x.dtype == np.float64) else np.float32
    s, q = _sylvester(p).astype(dtype), _odd_orthogonal(m).astype(dtype)
    moved = xp.moveaxis(x, axis, -1).astype(dtype)
    blocks = moved.reshape(*moved.shape[:-1], p, m)
    # Two contractions, each a matmul: NumPy's einsum of all three at once runs as one naive loop
    # (70 s for a 124M model's down-projections, against well under a second this way).
    kw = {"optimize": True} if xp is np else {}
    out = xp.einsum("...ib,bj->...ij", xp.einsum("...ab,ai->...ib", blocks, s, **kw), q, **kw)
    out = out.reshape(moved.shape)
    return xp.moveaxis(out, -1, axis).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Parameter trees (plain nested dicts of arrays, as restore_params_only returns them).


def _rebuild(tree, fn, prefix=()):
    """A new nested dict with fn(path, leaf) at every leaf."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = _rebuild(v, fn, prefix + (k,))
        else:
            out[k] = fn(prefix + (k,), v)
    return out


def weight_in_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """Input axes of the kernel at `path` (reduced by per-output-channel scales), or None if the leaf
    is not quantised (embedding table, norm scales): its role's (osp_jax.roles). The scanned `layers`
    axis is never reduced. A matrix without a role is an error naming it."""
    return roles.quant_in_axes(roles.require(path, ndim), ndim)


@functools.partial(jax.jit, static_argnames=("bits", "in_axes", "clip_search"))
def _quantize_leaf(w, bits, in_axes, clip_search):
    return quantize_weight(w, bits, in_axes, clip_search)


def quantize_weights(params, bits: int, clip_search: bool = False):
    """Every linear kernel fake-quantised per output channel (see `weight_in_axes`); other leaves as given."""
    bits = check_bits(bits, "weight bits")
    if bits >= NO_QUANT:
        return params

    def fn(path, w):
        axes = weight_in_axes(path, np.ndim(w))
        return w if axes is None else _quantize_leaf(jnp.asarray(w), bits, axes, bool(clip_search))

    return _rebuild(params, fn)


def rotate_ffn(params):
    """Down-projection kernels (..., ffn, dim) replaced by H^T W: pairs with QuantSpec(hadamard_ffn=True)."""
    def fn(path, w):
        if roles.find(path) is not roles.MLP_DOWN:
            return w
        w64 = np.asarray(w, np.float64)
        # H^T W = (W^T H)^T: the transform runs along the ffn axis.
        return hadamard_transform(w64, axis=-2).astype(np.asarray(w).dtype)

    return _rebuild(params, fn)


def fold_embproj(params, model_config) -> tuple[Any, Any]:
    """(params, model config) of the same function as a plain Llama: EmbProj multiplied into the
    embedding table and LM head (in float64, `roles.folded`, as export does), and the head untied."""
    c = model_config.copy_and_resolve_references()
    dtype = np.asarray(params["embed"]["embedding"]).dtype
    out = {k: v for k, v in params.items() if k not in ("embed_proj", "head_proj")}
    out["embed"] = {"embedding": roles.folded(params, c, roles.EMBEDDING, dtype)}
    out["lm_head"] = {"kernel": np.ascontiguousarray(roles.folded(params, c, roles.LM_HEAD, dtype).T)}
    c.embed_proj = False
    c.tie_embeddings = False
    return out, c
