"""Orthogonalising stacks of matrices in batches, split a whole matrix per device over the mesh.

Muon's momentum lives in its parameters' layout: each matrix cut into blocks over `fsdp` (and `tp`),
replicated over `op` and `dp`. Newton–Schulz needs whole matrices. The least a step can move, per
device, to give each device of the Newton–Schulz axes (`op`, `fsdp`, `tp`: optim.NS_SHARD_AXES) its
1/N of the matrices, whole:
  1. each device keeps its op-replica's share of the matrices (a local slice, nothing moved);
  2. one all-to-all over the axes that cut the matrices (fsdp, tp) assembles them: each device sends
     its block of every matrix to the device that orthogonalises it;
  3. Newton–Schulz, on 1/N of the matrices;
  4. the same all-to-all back: every device holds its block of its op-replica's share;
  5. one all-gather over the axes the parameters are replicated on (op) completes the update.
The partitioner does not find this itself: asked to move a stack from the parameters' split to a
split by matrix, XLA gathered whole stacks and sliced them (1.2 to 9 times these bytes on the 124M's
meshes, with "Involuntary full rematerialization" on fsdp x op and tp meshes; docs/benchmarks.md). So
the move is written out with collectives. The parameters' layout is the partitioner's to choose, and
an optax transform is never told it: the orthogonalisation is a `custom_partitioning` op, and when XLA
partitions the step, its callback learns each stack's sharding and writes the collectives for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _resolve_mesh(mesh):
    """The mesh to split over: the one given, else the ambient `jax.set_mesh` one, else None."""
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()  # read at trace time, inside the caller's jit
    return None if ambient.empty else ambient


def split_axes(mesh, shard_axis) -> tuple[str, ...]:
    """The axes of `shard_axis` (a name or a tuple of names) that `mesh` has with more than one device,
    in the mesh's order: the Newton–Schulz axes."""
    if mesh is None or shard_axis is None:
        return ()
    wanted = {shard_axis} if isinstance(shard_axis, str) else set(shard_axis)
    return tuple(a for a, n in dict(mesh.shape).items() if a in wanted and n > 1)


def _stack(parts: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _unstack(group: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
    return jnp.split(group[:sum(sizes)], np.cumsum(sizes)[:-1].tolist(), axis=0)


def _orthogonalize_whole(stacks, orthogonalize, args):
    """One device's view: same-shaped stacks concatenated, orthogonalised in one call, cut apart."""
    return tuple(_unstack(orthogonalize(_stack(stacks), *args), [s.shape[0] for s in stacks]))


# ------------------------------------------------------------------------------------------------
# The plan: from the stacks' shardings to per-device code with the collectives
# ------------------------------------------------------------------------------------------------


def _dim_axes(spec, dim: int) -> tuple[str, ...]:
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


class _Member(NamedTuple):
    rows: tuple[str, ...]  # mesh axes splitting the matrix rows, as given
    cols: tuple[str, ...]
    transpose: bool  # a square stack read transposed to match the group's layout


class _Plan(NamedTuple):
    """How one shape group moves: rows split over `x_axes`, columns over `y_axes` (the layout the
    all-to-all assembles from), `r_axes` replicating it (each takes a slice of the stack there)."""

    x_axes: tuple[str, ...]
    y_axes: tuple[str, ...]
    r_axes: tuple[str, ...]
    members: tuple[_Member, ...]
    specs: tuple[P, ...]  # each stack's sharding, as it comes and goes
    sizes: dict


def _prefix(a: tuple, b: tuple) -> bool:
    return b[:len(a)] == a


def _supported_spec(spec, shape, axes: tuple[str, ...], sizes: dict) -> P:
    """A stack's sharding, trimmed to what the plan handles: the stack axis whole, the matrix axes split
    only over Newton–Schulz axes that divide them. Anything trimmed the partitioner moves first."""
    dims = [()]
    for dim in (1, 2):
        kept = tuple(a for a in _dim_axes(spec, dim) if a in axes)
        dims.append(kept if shape[dim] % math.prod(sizes[a] for a in kept) == 0 else ())
    return P(*(d or None for d in dims))


def make_plan(mesh, axes: tuple[str, ...], shapes, specs) -> _Plan:
    """The plan for stacks of wide (or square) (B_i, m, n) `shapes` with shardings `specs` over `mesh`.

    The layout the group is assembled from is the one (rows, cols) that covers the most bytes: a
    stack split over a prefix of its axes takes the rest by a local slice; a square stack may be read
    transposed, since Newton–Schulz commutes with transposition. A stack that fits neither way is
    moved to that layout by the partitioner (correct; only its bytes are not minimal)."""
    sizes = dict(mesh.shape)
    specs = [_supported_spec(s, shape, axes, sizes) for s, shape in zip(specs, shapes)]
    layouts = [(_dim_axes(s, 1), _dim_axes(s, 2)) for s in specs]

    def orientations(i):
        rows, cols = layouts[i]
        square = shapes[i][1] == shapes[i][2]
        return [(rows, cols, False)] + ([(cols, rows, True)] if square else [])

    def fits(i, x_axes, y_axes):
        return next(((r, c, t) for r, c, t in orientations(i) if _prefix(r, x_axes) and _prefix(c, y_axes)), None)

    candidates = {(r, c) for i in range(len(shapes)) for r, c, _ in orientations(i)}
    covered = {xy: sum(math.prod(shapes[i]) for i in range(len(shapes)) if fits(i, *xy)) for xy in candidates}
    x_axes, y_axes = max(sorted(candidates), key=lambda xy: covered[xy])
    members = []
    for i in range(len(shapes)):
        fit = fits(i, x_axes, y_axes)
        if fit is None:  # the partitioner moves this stack to the group's layout first
            specs[i], fit = P(None, x_axes or None, y_axes or None), (x_axes, y_axes, False)
        members.append(_Member(*fit))
    r_axes = tuple(a for a in axes if a not in x_axes + y_axes)
    return _Plan(x_axes, y_axes, r_axes, tuple(members), tuple(specs), sizes)


def _count(plan: _Plan, names) -> int:
    return math.prod(plan.sizes[a] for a in names)


def _local_slice(x: jax.Array, dim: int, names: tuple[str, ...], sizes: dict) -> jax.Array:
    """This device's part of `x` along `dim` when it is split over `names` (nothing moved)."""
    if not names:
        return x
    size = x.shape[dim] // math.prod(sizes[a] for a in names)
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(names) * size, size, axis=dim)


def _gather_matrices(plan: _Plan, blocks: jax.Array) -> jax.Array:
    """(A * k, m/X, n/Y) blocks -> (k, m, n) whole matrices: chunk j of k matrices goes to device j of
    the all-to-all axes, which receives every device's block of them."""
    nx, ny = _count(plan, plan.x_axes), _count(plan, plan.y_axes)
    k, bm, bn = blocks.shape[0] // (nx * ny), blocks.shape[1], blocks.shape[2]
    got = jax.lax.all_to_all(blocks.reshape(nx * ny, k, bm, bn), plan.x_axes + plan.y_axes, 0, 0)
    return got.reshape(nx, ny, k, bm, bn).transpose(2, 0, 3, 1, 4).reshape(k, nx * bm, ny * bn)


def _scatter_matrices(plan: _Plan, whole: jax.Array) -> jax.Array:
    """The inverse of `_gather_matrices`."""
    nx, ny = _count(plan, plan.x_axes), _count(plan, plan.y_axes)
    k, m, n = whole.shape
    blocks = whole.reshape(k, nx, m // nx, ny, n // ny).transpose(1, 3, 0, 2, 4)
    got = jax.lax.all_to_all(blocks.reshape(nx * ny, k, m // nx, n // ny), plan.x_axes + plan.y_axes, 0, 0)
    return got.reshape(nx * ny * k, m // nx, n // ny)


def _local_program(plan: _Plan, orthogonalize, blocks, args):
    """What each device runs: its blocks of every stack in, its blocks of every update out."""
    parts = []
    for m, block in zip(plan.members, blocks):
        block = jnp.swapaxes(block, 1, 2) if m.transpose else block
        block = _local_slice(block, 1, plan.x_axes[len(m.rows):], plan.sizes)
        parts.append(_local_slice(block, 2, plan.y_axes[len(m.cols):], plan.sizes))
    group = _stack(parts)
    count = group.shape[0]
    shards = _count(plan, plan.x_axes + plan.y_axes + plan.r_axes)
    group = jnp.pad(group, ((0, -count % shards), (0, 0), (0, 0)))  # zeros stay zero under NS
    group = _local_slice(group, 0, plan.r_axes, plan.sizes)  # this op-replica's share
    if plan.x_axes or plan.y_axes:
        group = _scatter_matrices(plan, orthogonalize(_gather_matrices(plan, group), *args))
    else:
        group = orthogonalize(group, *args)
    if plan.r_axes:
        group = jax.lax.all_gather(group, plan.r_axes, axis=0, tiled=True)
    out = []
    for m, part in zip(plan.members, _unstack(group, [p.shape[0] for p in parts])):
        if plan.x_axes[len(m.rows):]:
            part = jax.lax.all_gather(part, plan.x_axes[len(m.rows):], axis=1, tiled=True)
        if plan.y_axes[len(m.cols):]:
            part = jax.lax.all_gather(part, plan.y_axes[len(m.cols):], axis=2, tiled=True)
        out.append(jnp.swapaxes(part, 1, 2) if m.transpose else part)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------


def _spec(sharding) -> P:
    """A stack's PartitionSpec. A sharding that is not a NamedSharding (the step was jitted without
    shardings on a mesh) is read as replicated: the partitioner replicates it first, if it is not."""
    return sharding.spec if isinstance(sharding, NamedSharding) else P()


def _concrete_mesh(given, mesh, sharding):
    """The mesh the callback runs on. A step jitted on an ambient mesh without shardings tells the
    callback none: the trace-time `mesh` (abstract there) over the step's devices stands in."""
    if not given.empty:
        return given
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    devices = np.asarray(sharding._device_assignment).reshape(mesh.axis_sizes)
    return jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


def _split_op(orthogonalize: Callable, axes: tuple[str, ...], count: int, mesh):
    """A custom-partitioned `(*stacks, *args) -> stacks` for `count` stacks of `mesh`."""

    @custom_partitioning
    def op(*operands):
        return _orthogonalize_whole(operands[:count], orthogonalize, operands[count:])

    def partition(given, arg_shapes, result_shapes):
        where = _concrete_mesh(given, mesh, arg_shapes[0].sharding)
        shapes = [s.shape for s in arg_shapes[:count]]
        plan = make_plan(where, axes, shapes, [_spec(s.sharding) for s in arg_shapes[:count]])
        shardings = tuple(NamedSharding(where, spec) for spec in plan.specs)
        replicated = tuple(NamedSharding(where, P()) for _ in arg_shapes[count:])

        def lower(*operands):
            return _local_program(plan, orthogonalize, operands[:count], operands[count:])

        return where, lower, shardings, shardings + replicated

    def infer(mesh, arg_shapes, result_shapes):  # GSPMD's propagation (Shardy reads the rule below)
        return tuple(s.sharding for s in arg_shapes[:count])

    def rule(mesh, operand_types, result_types):
        stacks = [f"b{i} m{i} n{i}" for i in range(count)]
        return ", ".join(stacks + [""] * (len(operand_types) - count)) + " -> " + ", ".join(stacks)

    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return op


def orthogonalize_stacks(stacks: Sequence[jax.Array], orthogonalize: Callable[..., jax.Array],
                         mesh=None, shard_axis="op", args: Sequence[jax.Array] = ()) -> list[jax.Array]:
    """Applies `orthogonalize` to (batch, m, n) stacks, one batched call per matrix shape.

    Same-shaped matrices from all stacks form one group; a tall matrix joins the group of its
    transpose, as Newton–Schulz commutes with transposition. With a mesh whose `shard_axis` (a name
    or a tuple of names) spans N > 1 devices, each group is padded with zero matrices to a multiple of
    N and every device orthogonalises 1/N of it, whole, moved there and back as the module docstring
    says; each result comes back in its stack's own sharding. Without such a mesh (or on one device)
    the same code runs unsplit.

    `orthogonalize(group, *args)`: `args` are arrays it needs that are not constants (a traced
    Newton–Schulz step count), passed in rather than closed over.
    """
    mesh = _resolve_mesh(mesh)
    axes = split_axes(mesh, shard_axis)
    tall = [s.shape[1] > s.shape[2] for s in stacks]
    wide = [jnp.swapaxes(s, 1, 2) if t else s for s, t in zip(stacks, tall)]
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(wide):
        groups.setdefault((s.shape[1:], jnp.dtype(s.dtype)), []).append(i)

    out: list[jax.Array] = [None] * len(stacks)
    for members in groups.values():
        inputs = [wide[i] for i in members]
        if axes:
            op = _split_op(orthogonalize, axes, len(inputs), mesh)
            if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
                # Shardings in the types: the op runs as in Auto mode, each result typed as its stack.
                op = jax.sharding.auto_axes(op, out_sharding=tuple(jax.typeof(x).sharding for x in inputs))
            results = op(*inputs, *args)
        else:
            results = _orthogonalize_whole(inputs, orthogonalize, args)
        for i, result in zip(members, results):
            out[i] = jnp.swapaxes(result, 1, 2) if tall[i] else result
    return out


__all__ = ["make_plan", "orthogonalize_stacks", "split_axes"]
