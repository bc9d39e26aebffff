"""GPTQ (Frantar et al. 2022): weights rounded one input column at a time, the rounding error of each
column pushed onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

For a kernel W (in, out) that computes y = x W, and its inputs X (tokens, in), GPTQ minimises
||X W - X Q||^2 over Q on the grid, column by column of W^T, with H = X^T X:

- the grid is RTN's (`quant.weight_scale`: symmetric, one step per output channel, from the whole W
  before any update, optionally clip-searched), so GPTQ and RTN differ only in how they round;
- dampening: percdamp (0.01) x mean(diag H) added to the diagonal; an input never seen (H_ii = 0)
  gets H_ii = 1 and its weights zeroed;
- act order (optional): columns in decreasing order of H_ii;
- the upper Cholesky factor U of H^-1 (H^-1 = U^T U, float64 on host) gives each column's update:
  err = (w_i - q_i) / U_ii, and W[:, j] -= err U_ij for j > i; done for a block of 128 columns at a
  time and pushed onto the rest of W in one matmul per block (the "lazy batch" update).

`quantize_params` runs it through the model as GPTQ does: layer by layer on calibration sequences, the
inputs of layer i taken from layers 0..i-1 already quantised, and inside a layer in forward order
(q/k/v from one Hessian, then o, then gate/up, then down), each Hessian from the inputs as they are
with the kernels before it already quantised; last the LM head, on the final norm's output.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg

from osp_jax import quant as quant_lib
from osp_jax import roles
from osp_jax.model import Block, Dense, RMSNorm, relayout_layers
from osp_jax.step import token_weights, window_layout

PERCDAMP = 0.01
BLOCK_SIZE = 128
# A layer's kernels in the order GPTQ quantises them: each group shares one input, hence one Hessian.
GROUPS = ((roles.ATTN_Q, roles.ATTN_K, roles.ATTN_V), (roles.ATTN_O,), (roles.MLP_GATE, roles.MLP_UP),
          (roles.MLP_DOWN,))


# ----------------------------------------------------------------------------------------------------
# One matrix.


def inverse_hessian_factor(h: np.ndarray, percdamp: float = PERCDAMP) -> np.ndarray:
    """U, upper triangular with U^T U = (H + damp I)^-1, in float64; an input never seen (H_ii = 0)
    has its H_ii taken as 1 first.

    With P the order-reversing permutation and P H P = M M^T (lower Cholesky), U = P M^-1 P: one
    Cholesky and one triangular inverse, without forming H^-1."""
    h = np.array(h, np.float64)
    diag = np.einsum("ii->i", h)  # a view: writes go to h
    diag[diag == 0] = 1.0
    diag += percdamp * np.mean(diag)
    try:
        m = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
    except np.linalg.LinAlgError:
        raise ValueError("GPTQ: the dampened Hessian is not positive definite (non-finite calibration "
                         "activations?)") from None
    m_inv = scipy.linalg.solve_triangular(m, np.eye(len(m)), lower=True)
    return np.ascontiguousarray(m_inv[::-1, ::-1])


class HessianFactor(NamedTuple):
    """What GPTQ needs of one Hessian, shared by the kernels that read the same input (q/k/v, gate/up)."""

    order: np.ndarray  # the column order: decreasing H_ii with act order, else 0..n-1
    u: np.ndarray      # inverse_hessian_factor of H in that order
    dead: np.ndarray   # inputs never seen (H_ii = 0): their weights are zeroed


def hessian_factor(h, *, act_order: bool = False, percdamp: float = PERCDAMP) -> HessianFactor:
    h = np.asarray(h, np.float64)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    return HessianFactor(order, inverse_hessian_factor(h[np.ix_(order, order)], percdamp), np.diag(h) == 0)


@functools.partial(jax.jit, static_argnames=("bits", "block_size"))
def _gptq_columns(w, u, scale, bits: int, block_size: int):
    """GPTQ's loop over the columns of w (rows = output channels), in blocks of `block_size`; u is the
    upper Cholesky factor of H^-1, zero below its diagonal (so updates never reach finished columns)."""
    rows, cols = w.shape
    hi = jax.lax.Precision.HIGHEST

    def column(i, carry):
        w1, q1, err1, u1 = carry
        col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        q = quant_lib.round_sym(col, scale, bits)
        err = (col - q) / u1[i, i]
        w1 = w1 - err[:, None] * u1[i][None, :]  # column i becomes q; the ones before it are untouched
        q1 = jax.lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
        err1 = jax.lax.dynamic_update_index_in_dim(err1, err, i, axis=1)
        return w1, q1, err1, u1

    def block(b, carry):
        w, q = carry
        start = b * block_size
        w1 = jax.lax.dynamic_slice_in_dim(w, start, block_size, axis=1)
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block_size, axis=0)  # (block, cols)
        u1 = jax.lax.dynamic_slice_in_dim(u_rows, start, block_size, axis=1)
        zeros = jnp.zeros_like(w1)
        _, q1, err1, _ = jax.lax.fori_loop(0, block_size, column, (w1, zeros, zeros, u1))
        # The block's error onto every later column at once (u is zero before the block; the block's
        # own columns are overwritten by q1 and never read again).
        w = w - jnp.matmul(err1, u_rows, precision=hi)
        return w, jax.lax.dynamic_update_slice_in_dim(q, q1, start, axis=1)

    return jax.lax.fori_loop(0, cols // block_size, block, (w, jnp.zeros_like(w)))[1]


def quantize_matrix(w, h, bits: int, *, scale=None, act_order: bool = False, percdamp: float = PERCDAMP,
                    block_size: int = BLOCK_SIZE, clip_search: bool = False, dtype=np.float32) -> np.ndarray:
    """GPTQ of a kernel w (in, out), as the model multiplies x @ w, against H = sum of x^T x (in, in)
    over its calibration inputs (or its `hessian_factor`, whose act order and dampening then hold):
    the (in, out) kernel on RTN's per-output-channel grid (`scale` (out,) if given, else
    `quant.weight_scale`). The column loop runs in `dtype` (float64 only under `jax.enable_x64`, for
    checks against a reference)."""
    w = np.asarray(w, dtype)
    n_in, n_out = w.shape
    f = h if isinstance(h, HessianFactor) else hessian_factor(h, act_order=act_order, percdamp=percdamp)
    if f.u.shape != (n_in, n_in):
        raise ValueError(f"GPTQ: Hessian of shape {f.u.shape} for a kernel of {n_in} inputs")
    if scale is None:
        scale = quant_lib.weight_scale(jnp.asarray(w), bits, 0, clip_search)
    scale = np.asarray(scale, dtype).reshape(n_out)
    wt = w.T.copy()  # (out, in): GPTQ walks the input columns
    wt[:, f.dead] = 0.0
    wt = wt[:, f.order]
    pad = -n_in % block_size
    wt = np.pad(wt, ((0, 0), (0, pad)))
    u = np.pad(f.u, ((0, pad), (0, pad)))
    u[np.arange(n_in, n_in + pad), np.arange(n_in, n_in + pad)] = 1.0  # padded columns: 0, alone
    q = np.asarray(_gptq_columns(jnp.asarray(wt), jnp.asarray(u.astype(dtype)), jnp.asarray(scale), bits=bits,
                                 block_size=block_size))[:, :n_in]
    return np.ascontiguousarray(q[:, np.argsort(f.order)].T)


def output_error(w, q, h) -> float:
    """||X W - X Q||^2 = tr((W - Q)^T H (W - Q)) for kernels (in, out) and H = X^T X, in float64."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


# ----------------------------------------------------------------------------------------------------
# Through the model, layer by layer.


def calibration_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model config the calibration forward passes run: float32, exact XLA attention, no remat."""
    c = model_config.copy_and_resolve_references()
    c.dtype, c.param_dtype, c.attention, c.remat, c.loss_chunk = "float32", "float32", "xla", "none", 0
    return c


def _dense_inputs(model_config, spec, layer_params, x, positions, segment_ids):
    """(block output, {(module, ...): input}) of one Block, every Dense's input as it multiplies it
    (after the quant hooks: the online rotations of `spec`)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Dense) and context.method_name == "__call__":
            seen[tuple(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out, _ = Block(model_config, quant=spec).apply({"params": layer_params}, x, positions, segment_ids)
    return out, seen


def _hessian(x, weights):
    """sum over tokens of weight * x^T x, features = every axis after (batch, seq)."""
    flat = x.reshape(-1, int(np.prod(x.shape[2:]))).astype(jnp.float32)
    return jnp.matmul((flat * weights.reshape(-1, 1)).T, flat, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=8)
def _layer_fns(model_json: str, spec: quant_lib.QuantSpec):
    """Jitted (hessian of one module's input, block forward) for a model config (as JSON) and spec."""
    c = ml_collections.ConfigDict(json.loads(model_json))

    @functools.partial(jax.jit, static_argnames=("module",))
    def hessian(layer_params, x, positions, segment_ids, weights, module):
        return _hessian(_dense_inputs(c, spec, layer_params, x, positions, segment_ids)[1][module], weights)

    @jax.jit
    def forward(layer_params, x, positions, segment_ids):
        return _dense_inputs(c, spec, layer_params, x, positions, segment_ids)[0]

    @jax.jit
    def head_hessian(scale, x, weights):
        return _hessian(RMSNorm(c.norm_scale, c.norm_eps, name="final_norm").apply({"params": {"scale": scale}}, x),
                        weights)

    return hessian, forward, head_hessian


def _node(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def quantize_params(params: Mapping, model_config: ml_collections.ConfigDict, bits: int,
                    calibration: Sequence[Mapping], *, spec: quant_lib.QuantSpec | None = None,
                    pack_mask: bool = True, act_order: bool = False, clip_search: bool = False,
                    percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE, report: dict | None = None) -> dict:
    """Every linear kernel of the plain Llama `params` (EmbProj folded, untied head; either layer
    layout) quantised by GPTQ at `bits`, calibrated on `calibration` (host batches: inputs, segment_ids,
    positions, as the data pipeline gives them; padding (segment id 0) does not count). `spec` holds
    the online rotations the calibration passes apply (its bit widths are ignored: activations stay in
    full precision, as in GPTQ and QuaRot). `report`, if given, gets {kernel path: (GPTQ's, RTN's
    ||X W - X Q||^2)} from the same inputs."""
    if not calibration:
        raise ValueError("GPTQ needs calibration batches; got none")
    bits = quant_lib.check_bits(bits, "weight bits")
    if bits >= quant_lib.NO_QUANT:  # as quant.quantize_weights: 16 bits is no quantisation
        return params
    c = calibration_config(model_config)
    spec = quant_lib.QuantSpec(hadamard_ffn=spec.hadamard_ffn, rotate_qk_heads=spec.rotate_qk_heads) if spec \
        else quant_lib.QuantSpec()
    hessian, forward, head_hessian = _layer_fns(json.dumps(c.to_dict(), sort_keys=True), spec)
    out = jax.tree.map(np.asarray, relayout_layers(dict(params), False, c.layers))

    def quantize(path, holder, key, role, hessian_and_factor):
        h, factor = hessian_and_factor
        w = np.asarray(holder[key], np.float32)
        in_axes, _ = role.matrix_axes(w.ndim)
        w2 = w.reshape(int(np.prod(w.shape[:len(in_axes)])), -1)
        scale = np.asarray(quant_lib.weight_scale(jnp.asarray(w2), bits, 0, clip_search))
        q2 = quantize_matrix(w2, factor, bits, scale=scale, block_size=block_size)
        if report is not None:
            rtn = np.asarray(quant_lib.round_sym(jnp.asarray(w2), jnp.asarray(scale), bits))
            report[roles.path_str(path)] = (output_error(w2, q2, h), output_error(w2, rtn, h))
        holder[key] = q2.reshape(w.shape)

    batches = []
    for b in calibration:
        layout = window_layout(b, pack_mask)
        positions = layout["positions"]
        if positions is None:
            positions = np.broadcast_to(np.arange(b["inputs"].shape[1]), b["inputs"].shape)
        batches.append((np.asarray(positions), layout["segment_ids"], np.asarray(token_weights(b))))
    table = np.asarray(roles.leaf(out, roles.EMBEDDING), np.float32)
    xs = [table[np.asarray(b["inputs"])] for b in calibration]
    for i in range(c.layers):
        layer = out[f"layers_{i}"]
        for group in GROUPS:
            module = group[0].key[:-1]
            h = sum(np.asarray(hessian(layer, x, *b, module=module), np.float64) for x, b in zip(xs, batches))
            h = (h, hessian_factor(h, act_order=act_order, percdamp=percdamp))  # one factor for the group
            for role in group:
                quantize((f"layers_{i}",) + role.key, _node(layer, role.key[:-1]), role.key[-1], role, h)
        xs = [np.asarray(forward(layer, x, *b[:2])) for x, b in zip(xs, batches)]
    scale = np.asarray(roles.leaf(out, roles.FINAL_NORM))
    h = sum(np.asarray(head_hessian(scale, x, b[2]), np.float64) for x, b in zip(xs, batches))
    h = (h, hessian_factor(h, act_order=act_order, percdamp=percdamp))
    quantize(roles.LM_HEAD.key, out["lm_head"], "kernel", roles.LM_HEAD, h)
    if "layers" in params:
        out = jax.tree.map(np.asarray, relayout_layers(out, True, c.layers))
    return out
