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
- The paper's optimizer parallelism: each stack is split over the mesh axis `op`, so every device
  orthogonalises about 1/op of the matrices instead of all of them.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from osp_jax import roles

# optax's own spec, so a tree written for `optax.contrib.muon` works here unchanged.
MuonDimensionNumbers = optax.contrib.MuonDimensionNumbers

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # guards the normalisation of an all-zero matrix
SCALE_MODES = ("rms", "shape")

# A pytree of MuonDimensionNumbers / None matching the params, one MuonDimensionNumbers for every
# leaf, a callable params -> such a pytree, or None (infer_dimension_numbers).
DimensionNumbersOrFn = Any


# ------------------------------------------------------------------------------------------------
# Newton–Schulz
# ------------------------------------------------------------------------------------------------


def _bf16_matmul(a: jax.Array, b: jax.Array, out=jnp.float32) -> jax.Array:
    """bfloat16 operands, float32 accumulation (tensor-core speed without losing the sum); the result
    is rounded to `out` as the matmul writes it."""
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=out)


def _quintic_step(x: jax.Array, a, b, c) -> jax.Array:
    """One step `x <- a x + b (x x^T) x + c (x x^T)^2 x` on a wide (m, n) matrix (or a stack of them),
    computed as `(a I + b G + c G^2) x` with `G = x x^T`.

    Only (m, m) work happens outside the matmuls: folding `a x` into the small polynomial lets the
    last, largest matmul write the next bfloat16 iterate directly, instead of writing (m, n) float32
    sums that an element-wise pass re-reads with `x` to add `a x` and round. Sums stay float32 inside
    each matmul. The iterate is stored in bfloat16 between steps: keeping it in float32 made the 1.4B
    train step need 13 GiB more temporaries (XLA's estimate), which put OSP's peak memory above
    AdamW's; the iteration is self-correcting, so the rounding does not accumulate.
    """
    m = x.shape[-2]
    gram = _bf16_matmul(x, jnp.swapaxes(x, -1, -2))  # (..., m, m): the smaller side, as x is wide
    poly = b * gram + c * _bf16_matmul(gram, gram) + a * jnp.eye(m, dtype=jnp.float32)
    return _bf16_matmul(poly, x, out=jnp.bfloat16)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / ||x||_F` per matrix, computed in float32, stored in bfloat16: Newton–Schulz's first iterate.

    The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1]."""
    x = x.astype(jnp.float32)
    return (x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)).astype(jnp.bfloat16)


def _coefficient_schedule(coeffs, steps: int) -> list[tuple[float, float, float]]:
    """`steps` (a, b, c) triples, from one triple or from a per-step schedule."""
    table = np.asarray(coeffs, dtype=np.float64)
    if table.shape == (3,):
        return [tuple(table.tolist())] * steps
    if table.shape == (steps, 3):
        return [tuple(row) for row in table.tolist()]
    raise ValueError(f"newton_schulz: coeffs must be one (a, b, c) triple or {steps} triples (one per "
                     f"step), got an array of shape {table.shape}.")


def newton_schulz(x: jax.Array, steps: int = 5, coeffs=DEFAULT_NS_COEFFS, eps: float = NS_EPS,
                  normalize: bool = True) -> jax.Array:
    """Approximately orthogonalises `x` (`U S V^T -> U V^T`) by a quintic Newton–Schulz iteration.

    The default coefficients (Keller Jordan's) raise small singular values fast instead of converging
    exactly: outputs have singular values of roughly 0.7 to 1.2, which trains as well as the exact
    polar factor at a fraction of the cost of an SVD.

    Args:
        x: a matrix, or a stack of matrices with leading batch axes (each orthogonalised alone).
        steps: number of iterations. May be a traced scalar (as under `optax.inject_hyperparams`);
            the loop is then a `fori_loop` and `coeffs` must be a single triple.
        coeffs: one `(a, b, c)` triple for every step, or a sequence of `steps` triples.
        eps: guards the normalisation of an all-zero matrix (which stays zero).
        normalize: False when `x` is already each matrix divided by its Frobenius norm (as
            `scale_by_muon` does before stacking, in bfloat16, to move half the bytes).

    Returns:
        An array of the shape and dtype of `x`.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz: expected a matrix or a stack of matrices, got shape {x.shape}.")
    dtype = x.dtype
    # The iteration only needs the smaller Gram matrix: run on the wide orientation, flip back after.
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = _normalize(x, eps) if normalize else x.astype(jnp.bfloat16)

    try:
        steps = operator.index(steps)
    except TypeError:  # a traced step count: the same iteration, rolled
        if np.shape(coeffs) != (3,):
            raise ValueError("newton_schulz: a per-step coefficient schedule needs a static `steps`, "
                             f"got {steps!r}.") from None
        a, b, c = coeffs
        x = jax.lax.fori_loop(0, steps, lambda _, y: _quintic_step(y, a, b, c), x)
    else:
        for a, b, c in _coefficient_schedule(coeffs, steps):
            x = _quintic_step(x, a, b, c)

    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(dtype)


def newton_schulz_reference(x, steps: int = 5, coeffs=DEFAULT_NS_COEFFS) -> np.ndarray:
    """The same iteration in float64 NumPy, as the papers write it (`x <- a x + b (x x^T) x +
    c (x x^T)^2 x`, from `x / ||x||_F`, on the wide orientation): the reference that tests and
    `benchmarks/muon.py --accuracy` hold `newton_schulz` to. One matrix, one (a, b, c) triple."""
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / np.linalg.norm(x)
    a, b, c = coeffs
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


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
# Batched, sharded orthogonalisation
# ------------------------------------------------------------------------------------------------


def _resolve_mesh(mesh):
    """The mesh to split over: the one given, else the ambient `jax.set_mesh` one, else None."""
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()  # read at trace time, inside the caller's jit
    return None if ambient.empty else ambient


def _shard_count(mesh, shard_axis) -> int:
    if mesh is None or shard_axis is None:
        return 1
    axes = (shard_axis,) if isinstance(shard_axis, str) else tuple(shard_axis)
    sizes = dict(mesh.shape)
    if not all(a in sizes for a in axes):
        return 1
    return math.prod(sizes[a] for a in axes)


def _reshard(x: jax.Array, mesh, spec: P) -> jax.Array:
    # Auto axes take a hint the partitioner propagates; Explicit axes need an actual reshard.
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def orthogonalize_stacks(stacks: Sequence[jax.Array], orthogonalize: Callable[[jax.Array], jax.Array],
                         mesh=None, shard_axis="op") -> list[jax.Array]:
    """Applies `orthogonalize` to (batch, m, n) stacks, one batched call per matrix shape.

    Same-shaped matrices from all stacks are concatenated; a tall matrix joins the group of its
    transpose, as Newton–Schulz commutes with transposition. With a mesh whose `shard_axis` spans
    n > 1 devices, each group is zero-padded to a multiple of n and split over that axis, so every
    device orthogonalises about 1/n of the matrices. A stack that goes alone comes back unconstrained,
    so the partitioner moves it straight to its parameter's own sharding (gathering it to replicated
    first cost 27% more temporary memory on the 124M step with op=2, fsdp=4); a concatenated group is
    made whole along its stack axis before it is cut into its members (a partitioner bug, below).
    Without such a mesh the same code runs unsplit.
    """
    mesh = _resolve_mesh(mesh)
    shards = _shard_count(mesh, shard_axis)
    if shard_axis is not None and not isinstance(shard_axis, str):
        shard_axis = tuple(shard_axis)

    tall = [s.shape[1] > s.shape[2] for s in stacks]
    wide = [jnp.swapaxes(s, 1, 2) if t else s for s, t in zip(stacks, tall)]
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(wide):
        groups.setdefault((s.shape[1:], jnp.dtype(s.dtype)), []).append(i)

    out: list[jax.Array] = [None] * len(stacks)
    # Explicit mesh axes put shardings in the types: operands of one concatenation must agree, a slice
    # must divide its axis's split, and each result must come back as its input was sharded.
    explicit = mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)

    def run(members):
        sizes = [wide[i].shape[0] for i in members]
        inputs = [_reshard(wide[i], mesh, P()) if explicit else wide[i] for i in members]
        group = jnp.concatenate(inputs, axis=0) if len(members) > 1 else inputs[0]
        padding = -group.shape[0] % shards
        if shards > 1:
            group = jnp.pad(group, ((0, padding), (0, 0), (0, 0)))  # zeros stay zero under NS
            group = _reshard(group, mesh, P(shard_axis, None, None))
        group = orthogonalize(group)
        if explicit:
            group = _reshard(group, mesh, P())
        elif shards > 1 and len(members) > 1:
            # Whole along the stack axis before it is cut into its members (the matrix axes left free).
            # Cut while split over the shards, XLA's partitioner can emit a slice past the end of a
            # shard (its verifier: "limit index ... must be less than or equal to dimension size"): seen
            # on tp=2 meshes (dp=4 or fsdp=4 with 3 layers, dp=2 x fsdp=2 with 1), jax 0.10.2 / Shardy.
            group = jax.lax.with_sharding_constraint(
                group, NamedSharding(mesh, P(None, P.UNCONSTRAINED, P.UNCONSTRAINED)))
        parts = jnp.split(group[:sum(sizes)], np.cumsum(sizes)[:-1].tolist(), axis=0)
        for i, part in zip(members, parts):
            part = jnp.swapaxes(part, 1, 2) if tall[i] else part
            out[i] = _reshard(part, mesh, jax.typeof(stacks[i]).sharding.spec) if explicit else part

    for members in groups.values():
        # A stack that splits evenly over the shards (scanned layers, usually) goes alone: moving it
        # from its parameter's sharding to the op split is one collective, where a concatenation of
        # differently sharded stacks made the partitioner replicate every one of them first
        # ("involuntary full rematerialization" on fsdp x op meshes). The rest are concatenated.
        alone = [i for i in members if shards > 1 and wide[i].shape[0] % shards == 0]
        for i in alone:
            run([i])
        rest = [i for i in members if i not in alone]
        if rest:
            run(rest)
    return out


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------


class ScaleByMuonState(NamedTuple):
    """Muon's state: a step count and the momentum (same tree as the params)."""

    count: jax.Array  # shape (), int32
    mu: optax.Updates


def scale_by_muon(beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs=DEFAULT_NS_COEFFS, mu_dtype=None,
                  dimension_numbers: DimensionNumbersOrFn = None, shard_axis="op",
                  mesh=None) -> optax.GradientTransformation:
    """Momentum, then every matrix of it replaced by its Newton–Schulz orthogonalisation.

    The momentum is the EMA `mu = beta mu + (1 - beta) g`; with Nesterov the look-ahead
    `beta mu + (1 - beta) g` is orthogonalised instead. There is no bias correction: Newton–Schulz
    normalises its input, so only the direction of the momentum matters.

    Args:
        beta: momentum decay.
        nesterov: orthogonalise the Nesterov look-ahead rather than the momentum itself.
        ns_steps: Newton–Schulz iterations.
        ns_coeffs: one (a, b, c) triple, or `ns_steps` triples (a per-step schedule).
        mu_dtype: dtype of the momentum (None: that of the params).
        dimension_numbers: which axes of each leaf are the matrix. None infers them for osp_jax's
            tree (`infer_dimension_numbers`); else one `MuonDimensionNumbers` for every leaf, a pytree
            of them matching the params, or a callable params -> such a pytree. All other axes are a
            batch of independent matrices. A leaf with None (or rank < 2) is an error: route it to
            another optimizer.
        shard_axis: mesh axis (or tuple of axes) that splits the orthogonalisation work.
        mesh: the mesh to split over; None takes the ambient `jax.set_mesh` mesh at trace time.

    Returns:
        An `optax.GradientTransformation`. Leaves arriving as `optax.MaskedNode` (from `optax.masked`
        or `optax.multi_transform`) pass through.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def orthogonalize(stack):  # stacks arrive normalised (below)
        return newton_schulz(stack, steps=ns_steps, coeffs=ns_coeffs, normalize=False)

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
        for i, stack in zip(active, orthogonalize_stacks(stacks, orthogonalize, mesh, shard_axis)):
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
         mesh=None, mu_dtype=None, ns_coeffs=DEFAULT_NS_COEFFS) -> optax.GradientTransformation:
    """The complete Muon update of the OSP paper, for the Muon leaves.

    `scale_by_muon` -> `scale_by_shape` -> decoupled weight decay -> learning rate. Route the
    embedding, the LM head and the norm scales to AdamW with `optax.multi_transform`.

    Args:
        learning_rate: a float or an optax schedule.
        beta, nesterov, ns_steps, ns_coeffs, mu_dtype, dimension_numbers, shard_axis, mesh: see
            `scale_by_muon`.
        weight_decay: decoupled weight decay, multiplied by the learning rate as in AdamW. `update`
            needs `params` unless it is a Python 0.
        weight_decay_mask: optional mask (or callable returning one) for the weight decay, as in optax.
        rms_scale, scale_mode: see `scale_by_shape`.

    Returns:
        An `optax.GradientTransformation`. Under `optax.inject_hyperparams`, every number becomes a
        traced hyperparameter (so Newton–Schulz runs as a rolled loop) and every callable a schedule:
        pass `static_args=("ns_steps", "dimension_numbers", "weight_decay_mask")` to keep them static.
    """
    transforms = [
        scale_by_muon(beta=beta, nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                      mu_dtype=mu_dtype, dimension_numbers=dimension_numbers, shard_axis=shard_axis,
                      mesh=mesh),
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
