"""Muon: momentum orthogonalised by Newton–Schulz, as optax transforms.

Muon keeps a momentum of the gradient and replaces each matrix of it by (nearly) the orthogonal factor
of its polar decomposition, so every direction of the update gets the same step size. The OSP paper
trains every hidden matrix with it; embeddings, the LM head and norm scales stay on AdamW (the routing
lives in optim.py).

What this module adds over `optax.contrib.muon`:
- Parameters stored as scanned stacks (`(layers, dim, heads, head_dim)` and friends) are read as
  batches of matrices through `MuonDimensionNumbers`, inferred for osp_jax's own tree.
- Orthogonalisation is batched: all matrices of one shape, whatever leaf they come from, form one
  stack and go through one Newton–Schulz loop.
- The paper's optimizer parallelism: each stack is split a whole matrix per device over the mesh axes
  `shard_axis` (`op`, and in the recipes the axes that split the momentum), moved there and back with
  the fewest bytes (osp_jax/orthogonalize.py).
- Newton–Schulz methods beyond the paper's quintic: Polar Express and Gram Newton–Schulz
  (osp_jax/newton_schulz.py).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osp_jax.newton_schulz import (DEFAULT_NS_COEFFS, NS_EPS, NS_METHODS, _normalize, method_coeffs,
                                   newton_schulz, newton_schulz_reference)
from osp_jax.orthogonalize import orthogonalize_stacks

from osp_jax import roles

# optax's own spec, so a tree written for `optax.contrib.muon` works here unchanged.
MuonDimensionNumbers = optax.contrib.MuonDimensionNumbers

SCALE_MODES = ("rms", "shape")

# A pytree of MuonDimensionNumbers / None matching the params, one MuonDimensionNumbers for every
# leaf, a callable params -> such a pytree, or None (infer_dimension_numbers).
DimensionNumbersOrFn = Any


# ------------------------------------------------------------------------------------------------
# Dimension numbers: which axes of a leaf form the matrix
# ------------------------------------------------------------------------------------------------


def infer_dimension_numbers(params) -> Any:
    """Dimension numbers for osp_jax's parameter tree (docs/CONTRACTS.md), from its roles table.

    A leaf with a role (osp_jax.roles) gets that role's matrix: attention kernels keep heads as
    separate axes, so `attn/{q,k,v}` map `dim -> (heads, head_dim)` and `attn/o` maps
    `(heads, head_dim) -> dim`; the others are `(fan_in, fan_out)`; leading axes (the scanned `layers`
    axis) are a batch of independent matrices. Norm scales, and leaves with fewer than two axes, get
    None: they are not matrices. Takes arrays or `jax.ShapeDtypeStruct`s; `optax.MaskedNode` subtrees
    are kept as they are.

    Any other leaf (someone else's tree) is read as `(..., fan_in, fan_out)`; one of three or more
    axes outside a `layers` stack with a warning: someone else's multi-head kernel
    `(dim, heads, head_dim)` or convolution `(h, w, in, out)` spans more than its last two axes and
    needs explicit `MuonDimensionNumbers`.
    """

    def rule(path, leaf):
        ndim = len(leaf.shape)
        role = roles.find(path)
        if role is not None and (role.rank is None or ndim >= role.rank):
            axes = roles.muon_axes(role, ndim)
            return None if axes is None or ndim < 2 else MuonDimensionNumbers(*axes)
        if ndim < 2:
            return None
        if ndim >= 3 and "layers" not in roles.path_names(path):
            warnings.warn(
                f"Muon reads leaf '{roles.path_str(path)}' of shape {tuple(leaf.shape)} as "
                f"{math.prod(leaf.shape[:-2])} independent {leaf.shape[-2]} x {leaf.shape[-1]} matrices "
                "(its last two axes). If its matrix spans other axes (a multi-head attention kernel, a "
                "convolution), pass dimension_numbers= with a MuonDimensionNumbers for it.", stacklevel=2)
        return MuonDimensionNumbers(reduction_axis=ndim - 2, output_axis=ndim - 1)

    return jax.tree_util.tree_map_with_path(rule, params)


def _is_dims_leaf(x) -> bool:
    return x is None or isinstance(x, MuonDimensionNumbers)


def _resolve_dimension_numbers(dimension_numbers: DimensionNumbersOrFn, updates) -> Any:
    if dimension_numbers is None:
        return infer_dimension_numbers(updates)
    if isinstance(dimension_numbers, MuonDimensionNumbers):
        return jax.tree.map(lambda _: dimension_numbers, updates)
    if callable(dimension_numbers):
        return dimension_numbers(updates)  # only shapes matter, and params may not be passed
    return dimension_numbers


def _as_axes(axes, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(operator.index(a) % ndim for a in axes)


class _MatrixView(NamedTuple):
    """How one leaf is read as a (batch, fan_in, fan_out) stack of matrices, and back."""

    perm: tuple[int, ...]  # moves the axes to (batch..., reduction..., output...)
    permuted_shape: tuple[int, ...]
    batch: int
    fan_in: int
    fan_out: int

    @classmethod
    def of(cls, path, shape: tuple[int, ...], dims) -> _MatrixView:
        ndim = len(shape)
        if dims is None or ndim < 2:
            raise ValueError(
                f"Muon leaf '{roles.path_str(path)}' has shape {shape} and dimension numbers {dims}: Muon "
                "needs a matrix (rank >= 2 with dimension numbers). Route this leaf to AdamW instead.")
        reduction, output = _as_axes(dims.reduction_axis, ndim), _as_axes(dims.output_axis, ndim)
        if not reduction or not output or set(reduction) & set(output):
            raise ValueError(f"Muon leaf '{roles.path_str(path)}' with shape {shape}: reduction axes "
                             f"{reduction} and output axes {output} must be non-empty and disjoint.")
        batch = tuple(a for a in range(ndim) if a not in reduction and a not in output)
        perm = batch + reduction + output

        def size(axes):
            return math.prod(shape[a] for a in axes)

        return cls(perm, tuple(shape[a] for a in perm), size(batch), size(reduction), size(output))

    def to_stack(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.perm).reshape(self.batch, self.fan_in, self.fan_out)

    def from_stack(self, stack: jax.Array) -> jax.Array:
        return jnp.transpose(stack.reshape(self.permuted_shape), np.argsort(self.perm))


def _matrix_leaves(updates, dimension_numbers: DimensionNumbersOrFn):
    """Flattens `updates` against its dimension numbers into `(treedef, leaves, views)`.

    `views[i]` is None where `leaves[i]` is an `optax.MaskedNode`: a leaf another transform owns,
    to pass through untouched.
    """
    dims_tree = _resolve_dimension_numbers(dimension_numbers, updates)
    flat_dims, treedef = jax.tree_util.tree_flatten_with_path(dims_tree, is_leaf=_is_dims_leaf)
    try:
        leaves = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
        raise ValueError(f"Muon dimension_numbers do not match the updates tree: {e}") from None
    views = [None if isinstance(leaf, optax.MaskedNode) else _MatrixView.of(path, leaf.shape, dims)
             for (path, dims), leaf in zip(flat_dims, leaves)]
    return treedef, leaves, views


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------


class ScaleByMuonState(NamedTuple):
    """Muon's state: a step count and the momentum (same tree as the params)."""

    count: jax.Array  # shape (), int32
    mu: optax.Updates


def scale_by_muon(beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs=None, mu_dtype=None,
                  dimension_numbers: DimensionNumbersOrFn = None, shard_axis="op",
                  mesh=None, ns_method: str = "quintic") -> optax.GradientTransformation:
    """Momentum, then every matrix of it replaced by its Newton–Schulz orthogonalisation.

    The momentum is the EMA `mu = beta mu + (1 - beta) g`; with Nesterov the look-ahead
    `beta mu + (1 - beta) g` is orthogonalised instead. There is no bias correction: Newton–Schulz
    normalises its input, so only the direction of the momentum matters.

    Args:
        beta: momentum decay.
        nesterov: orthogonalise the Nesterov look-ahead rather than the momentum itself.
        ns_steps: Newton–Schulz iterations.
        ns_coeffs: for `ns_method="quintic"`: one (a, b, c) triple, or `ns_steps` triples (a per-step
            schedule); None is the OSP paper's (`DEFAULT_NS_COEFFS`).
        mu_dtype: dtype of the momentum (None: that of the params).
        dimension_numbers: which axes of each leaf are the matrix. None infers them for osp_jax's
            tree (`infer_dimension_numbers`); else one `MuonDimensionNumbers` for every leaf, a pytree
            of them matching the params, or a callable params -> such a pytree. All other axes are a
            batch of independent matrices. A leaf with None (or rank < 2) is an error: route it to
            another optimizer.
        shard_axis: mesh axis (or tuple of axes) that splits the orthogonalisation work.
        mesh: the mesh to split over; None takes the ambient `jax.set_mesh` mesh at trace time.
        ns_method: the Newton–Schulz method, one of `NS_METHODS` (osp_jax/newton_schulz.py):
            "quintic" (the paper's), "polar_express" or "gram".

    Returns:
        An `optax.GradientTransformation`. Leaves arriving as `optax.MaskedNode` (from `optax.masked`
        or `optax.multi_transform`) pass through.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    try:  # a static step count checks the method and its coefficients now, not at the first update
        method_coeffs(ns_method, operator.index(ns_steps), ns_coeffs)
    except TypeError:  # a traced one (inject_hyperparams) is checked by newton_schulz
        pass

    def orthogonalize(stack, *steps):  # stacks arrive normalised (below); a traced step count as an operand
        return newton_schulz(stack, steps=steps[0] if steps else ns_steps, coeffs=ns_coeffs,
                             normalize=False, method=ns_method)

    def init_fn(params):
        return ScaleByMuonState(count=jnp.zeros([], jnp.int32),
                                mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        if nesterov:
            direction = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
        else:
            direction = mu

        treedef, leaves, views = _matrix_leaves(direction, dimension_numbers)
        active = [i for i, view in enumerate(views) if view is not None]
        # Normalised (float32) and cast to Newton–Schulz's bfloat16 before the stacking, so the
        # grouping's concatenations and transposes move half the bytes; the same numbers as
        # newton_schulz(x) would compute from x itself.
        stacks = [_normalize(views[i].to_stack(leaves[i]), NS_EPS) for i in active]
        traced = () if isinstance(ns_steps, (int, np.integer)) else (jnp.asarray(ns_steps),)
        for i, stack in zip(active, orthogonalize_stacks(stacks, orthogonalize, mesh, shard_axis, traced)):
            leaves[i] = views[i].from_stack(stack)
        # Keep the incoming dtypes: wrappers such as optax.MultiSteps need the tree type unchanged.
        new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), treedef.unflatten(leaves), updates)
        return new_updates, ScaleByMuonState(count=optax.safe_increment(state.count),
                                             mu=optax.tree.cast(mu, mu_dtype))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(scale_mode: str = "rms", rms_scale: float = 0.2,
                   dimension_numbers: DimensionNumbersOrFn = None) -> optax.GradientTransformation:
    """Rescales each orthogonalised matrix by a factor of its (fan_in, fan_out).

    An orthogonalised update has RMS `1 / sqrt(max(fan_in, fan_out))`, so its size depends on the
    matrix shape. `"rms"` multiplies by `rms_scale * sqrt(max(fan_in, fan_out))`, so every matrix
    moves with RMS `rms_scale`; 0.2 matches AdamW's, which lets AdamW's learning rate and weight decay
    carry over (Liu et al. 2025, as in the OSP paper). `"shape"` is Keller Jordan's
    `sqrt(max(1, fan_out / fan_in))`.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r}: expected one of {SCALE_MODES}.")

    def factor(view: _MatrixView):
        if scale_mode == "rms":
            return rms_scale * math.sqrt(max(view.fan_in, view.fan_out))
        return math.sqrt(max(1.0, view.fan_out / view.fan_in))

    def update_fn(updates, state, params=None):
        del params
        treedef, leaves, views = _matrix_leaves(updates, dimension_numbers)
        leaves = [x if view is None else (x * factor(view)).astype(x.dtype) for x, view in zip(leaves, views)]
        return treedef.unflatten(leaves), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, beta: float = 0.95, nesterov: bool = True,
         ns_steps: int = 5, weight_decay: float = 0.0, weight_decay_mask=None, rms_scale: float = 0.2,
         scale_mode: str = "rms", dimension_numbers: DimensionNumbersOrFn = None, shard_axis="op",
         mesh=None, mu_dtype=None, ns_coeffs=None, ns_method: str = "quintic") -> optax.GradientTransformation:
    """The complete Muon update of the OSP paper, for the Muon leaves.

    `scale_by_muon` -> `scale_by_shape` -> decoupled weight decay -> learning rate. Route the
    embedding, the LM head and the norm scales to AdamW with `optax.multi_transform`.

    Args:
        learning_rate: a float or an optax schedule.
        beta, nesterov, ns_steps, ns_coeffs, mu_dtype, dimension_numbers, shard_axis, mesh, ns_method:
            see `scale_by_muon`.
        weight_decay: decoupled weight decay, multiplied by the learning rate as in AdamW. `update`
            needs `params` unless it is a Python 0.
        weight_decay_mask: optional mask (or callable returning one) for the weight decay, as in optax.
        rms_scale, scale_mode: see `scale_by_shape`.

    Returns:
        An `optax.GradientTransformation`. Under `optax.inject_hyperparams`, every number becomes a
        traced hyperparameter (so Newton–Schulz runs as a rolled loop; `ns_method="gram"` needs it
        static) and every callable a schedule: pass
        `static_args=("ns_steps", "dimension_numbers", "weight_decay_mask")` to keep them static.
    """
    transforms = [
        scale_by_muon(beta=beta, nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                      mu_dtype=mu_dtype, dimension_numbers=dimension_numbers, shard_axis=shard_axis,
                      mesh=mesh, ns_method=ns_method),
        scale_by_shape(scale_mode=scale_mode, rms_scale=rms_scale, dimension_numbers=dimension_numbers),
    ]
    # The decay is always a link, so that a weight decay of 0 or not keeps the state's tree (a
    # checkpoint saved with one resumes with the other). A Python 0 makes it a stateless identity,
    # shaped like add_decayed_weights' empty state, which needs no params; a traced weight decay
    # (inject_hyperparams) is always applied: it may be scheduled away from 0.
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        decay = optax.identity() if weight_decay_mask is None else optax.masked(optax.identity(), weight_decay_mask)
    else:
        decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
    transforms += [decay, optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*transforms)


__all__ = [
    "DEFAULT_NS_COEFFS",
    "NS_METHODS",
    "MuonDimensionNumbers",
    "ScaleByMuonState",
    "infer_dimension_numbers",
    "muon",
    "newton_schulz",
    "newton_schulz_reference",
    "orthogonalize_stacks",
    "scale_by_muon",
    "scale_by_shape",
]
