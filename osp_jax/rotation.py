"""QuaRot-style rotation (Ashkboos et al. 2024), folded into the weights of the plain Llama.

The function is unchanged in exact arithmetic; what changes is what the quantisers see: the residual
stream, the keys and the values are spread by orthogonal rotations, so one loud channel no longer sets
every other channel's scale.

1. **Norm gains folded** (`fold_norms`): each RMSNorm's gain g multiplies the rows of the kernels that
   read the norm's output (q/k/v after attn_norm, gate/up after mlp_norm, the LM head after final_norm),
   W' = diag(g) W, and the gain becomes 1. SSNorm's one scalar and a per-channel gain fold alike. A
   norm without a gain, x / rms(x), commutes with any orthogonal Q, since rms(x Q) = rms(x).
2. **Residual stream rotated** (`rotate_residual`) by Q = diag(s) H, s a seeded random sign per channel
   and H `quant.hadamard_matrix(dim)` (Sylvester-Hadamard, Kronecker with a fixed orthogonal factor
   when dim is not a power of two): whatever writes the stream is multiplied by Q on its output side
   (embedding rows E Q, attention output W_o Q, down projection W_down Q), whatever reads it by Q^T on
   its input side (Q^T W for q/k/v, gate/up and the LM head). Every layer then works on x Q.
3. **Values rotated per head** (`rotate_values`): v's kernel by Hd (Hadamard over head_dim) on its
   output side, o's kernel by Hd^T for each head on its input side. Queries and keys are rotated online
   after RoPE (`quant.QuantSpec.rotate_qk_heads`), and the FFN hidden state online before the down
   projection (`quant.rotate_ffn` with `QuantSpec.hadamard_ffn`): both are `osp_jax.ptq`'s to switch on.

Parameters are the plain Llama that `quant.fold_embproj` gives (no EmbProj, untied head), in either
layer layout (one scanned `layers` stack or `layers_<i>`); the folding runs in float64 on host.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from osp_jax import quant as quant_lib
from osp_jax import roles

# Which kernels read each norm's output (their input axis is the norm's channel axis).
NORM_READERS = {roles.ATTN_NORM: (roles.ATTN_Q, roles.ATTN_K, roles.ATTN_V),
                roles.MLP_NORM: (roles.MLP_GATE, roles.MLP_UP),
                roles.FINAL_NORM: (roles.LM_HEAD,)}
# What reads the residual stream (input side: Q^T W) and what writes it (output side: W Q).
READS_RESIDUAL = (roles.ATTN_Q, roles.ATTN_K, roles.ATTN_V, roles.MLP_GATE, roles.MLP_UP, roles.LM_HEAD)
WRITES_RESIDUAL = (roles.EMBEDDING, roles.ATTN_O, roles.MLP_DOWN)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """Q = diag(s) H (float64, orthonormal): H = quant.hadamard_matrix(n), s random signs from `seed`."""
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=n)
    return signs[:, None] * quant_lib.hadamard_matrix(n)


def _nodes(params: Mapping):
    """(holder, key) of the root and of every layer subtree: `params` itself, then `params['layers']`
    (scanned) or each `params['layers_<i>']`."""
    yield params, None
    for key, value in params.items():
        if key == "layers" or key.startswith("layers_"):
            yield value, key


def _holder(node: Mapping, role: roles.Role) -> dict | None:
    """The dict in `node` (the root or one layer subtree) holding `role`'s leaf, or None."""
    for k in role.key[:-1]:
        node = node.get(k) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) and role.key[-1] in node else None


def _role_leaves(params: Mapping, wanted):
    """(holder, leaf key, role) of every leaf of `params` whose role is in `wanted`."""
    for node, layer_key in _nodes(params):
        for role in wanted:
            holder = _holder(node, role) if role.per_layer == (layer_key is not None) else None
            if holder is not None:
                yield holder, role.key[-1], role


def _copy(tree):
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _apply_on_axis(m: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """w with `axis` replaced by m @ (that axis): out[..., i, ...] = sum_j m[i, j] w[..., j, ...]."""
    return np.moveaxis(np.tensordot(m, w, axes=([1], [axis])), 0, axis)


def _in_axis(role: roles.Role, ndim: int) -> int:
    (axis,) = role.matrix_axes(ndim)[0]
    return axis


def fold_norms(params: Mapping) -> dict:
    """`params` with every norm gain multiplied into the rows of the kernels that read it, the gains
    set to 1: the same function (exact up to float rounding)."""
    out = _copy(params)
    for node, layer_key in _nodes(out):
        for norm, readers in NORM_READERS.items():
            gains = _holder(node, norm) if norm.per_layer == (layer_key is not None) else None
            if gains is None:
                continue
            g = np.asarray(gains[norm.key[-1]], np.float64)
            for role in readers:
                holder, key = _holder(node, role), role.key[-1]
                w = np.asarray(holder[key])
                # A gain (stack...,) or (stack..., dim) lines up with the kernel's (stack..., dim, out...)
                # from the left: a scalar a layer broadcasts over dim, a per-channel gain scales its rows.
                holder[key] = (w.astype(np.float64) * g.reshape(g.shape + (1,) * (w.ndim - g.ndim))).astype(w.dtype)
            gains[norm.key[-1]] = np.ones_like(np.asarray(gains[norm.key[-1]]))
    return out


def rotate_residual(params: Mapping, q: np.ndarray) -> dict:
    """`params` with the residual stream rotated by the orthogonal `q` (dim, dim): writers W Q, readers
    Q^T W. Exact only once the norm gains are folded (`fold_norms`)."""
    out = _copy(params)
    for holder, key, role in _role_leaves(out, WRITES_RESIDUAL):
        w = np.asarray(holder[key])
        holder[key] = (w.astype(np.float64) @ q).astype(w.dtype)
    for holder, key, role in _role_leaves(out, READS_RESIDUAL):
        w = np.asarray(holder[key])
        holder[key] = _apply_on_axis(q.T, w.astype(np.float64), _in_axis(role, w.ndim)).astype(w.dtype)
    return out


def rotate_values(params: Mapping) -> dict:
    """`params` with each head's values rotated by Hd = quant.hadamard_matrix(head_dim): v's kernel
    (embed, kv_heads, head_dim) times Hd, o's kernel (heads, head_dim, embed) by Hd^T per head. A query
    head reads the value head its group shares; all heads share Hd, so grouped-query attention is alike."""
    out = _copy(params)
    for holder, key, role in _role_leaves(out, (roles.ATTN_V, roles.ATTN_O)):
        w = np.asarray(holder[key])
        w64 = w.astype(np.float64)
        if role is roles.ATTN_V:
            hd = quant_lib.hadamard_matrix(w.shape[-1])
            holder[key] = (w64 @ hd).astype(w.dtype)
        else:
            hd = quant_lib.hadamard_matrix(w.shape[-2])
            holder[key] = _apply_on_axis(hd.T, w64, w.ndim - 2).astype(w.dtype)
    return out


def rotate(params: Mapping, seed: int = 0) -> dict:
    """Norms folded, residual stream rotated by `random_hadamard(dim, seed)`, values rotated per head:
    the offline part of QuaRot. Pair it with QuantSpec(rotate_qk_heads=True, hadamard_ffn=True) and
    `quant.rotate_ffn` for the online part."""
    if "embed_proj" in params or "head_proj" in params or "lm_head" not in params:
        raise ValueError("rotation.rotate: expected the plain Llama of quant.fold_embproj (EmbProj folded, "
                         f"untied LM head); got top-level keys {sorted(params)}")
    dim = np.shape(roles.leaf(params, roles.EMBEDDING))[-1]
    return rotate_values(rotate_residual(fold_norms(params), random_hadamard(dim, seed)))
