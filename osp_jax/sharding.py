"""The device mesh, the one logical-axis rule table, and multi-host start-up.

Mesh axes ("dp", "op", "fsdp", "tp"):
  dp    pure data parallelism (replicas of parameters and optimizer state)
  op    the OSP paper's optimizer parallelism: Newton–Schulz for same-shaped matrices is split
        over it, a whole matrix per device (see muon.py; optim.NS_SHARD_AXES adds fsdp and tp, which
        split the momentum already); the batch is split over it too
  fsdp  parameters and optimizer state are sharded over it; the batch is split over it
  tp    tensor parallelism over heads / MLP width / vocabulary, for models that outgrow fsdp

Multislice (several TPU slices joined by the data-center network, DCN): config.mesh's dp/op/fsdp/tp are
each slice's sizes (its ICI), and mesh.dcn_dp / mesh.dcn_fsdp say how many slices dp and fsdp span. A slice
then holds a contiguous block of every axis, so only dp's (or fsdp's) collectives cross the DCN: dp's
gradient all-reduce, once a step.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dp", "op", "fsdp", "tp")
BATCH_AXES = ("dp", "op", "fsdp")
# The mesh axes that may span slices, and the config.mesh key of the number of slices each spans.
DCN_AXES = {"dp": "dcn_dp", "fsdp": "dcn_fsdp"}

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters and activations use
# separate names for the model dimension, so parameters shard over fsdp while activations
# shard their batch over fsdp: the usual ZeRO-3 layout.
LOGICAL_AXIS_RULES = (
    # parameters
    ("vocab", "tp"),
    ("embed", "fsdp"),
    ("embed_proj", None),
    ("mlp", "tp"),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("batch", BATCH_AXES),
    ("lookup_batch", ("dp", "op")),  # rows out of the embedding table, whose embed dim is fsdp's
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tp"),
    ("act_vocab", "tp"),
)


class MeshError(ValueError):
    """The requested mesh does not fit the devices."""


def mesh_shape(sizes: dict, device_count: int) -> tuple[int, ...]:
    """The mesh's shape in MESH_AXES order, -1 resolved: each slice's size of an axis times the slices it
    spans (`hybrid_shape`). An axis left out has size 1; a name that is not one of MESH_AXES or DCN_AXES'
    keys is an error (MeshError), as is a shape whose product is not `device_count`."""
    ici, dcn = hybrid_shape(sizes, device_count)
    return tuple(i * d for i, d in zip(ici, dcn))


def hybrid_shape(sizes: dict, device_count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(one slice's shape, slices each axis spans), both in MESH_AXES order; -1 fills one slice's
    devices. Without dcn_* keys (or all 1): (the whole shape, all ones), as for one slice."""
    unknown = sorted(set(sizes) - set(MESH_AXES) - set(DCN_AXES.values()))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}: the axes are {', '.join(MESH_AXES)} (and, across slices, "
                        f"{', '.join(DCN_AXES.values())})")
    dcn = tuple(int(sizes.get(DCN_AXES[a], 1)) if a in DCN_AXES else 1 for a in MESH_AXES)
    slices = math.prod(dcn)
    if min(dcn) < 1:
        raise MeshError(f"mesh {', '.join(f'{k}={sizes.get(k, 1)}' for k in DCN_AXES.values())}: slice counts "
                        "must be positive")
    if device_count % slices:
        raise MeshError(f"mesh.dcn_dp * mesh.dcn_fsdp = {slices} slices cannot split {device_count} devices evenly")
    ici = _slice_shape({a: int(sizes.get(a, 1)) for a in MESH_AXES}, device_count // slices, slices)
    return ici, dcn


def _slice_shape(sizes: dict, device_count: int, slices: int) -> tuple[int, ...]:
    """`sizes` with -1 resolved, checked to multiply to `device_count` (the devices of one of `slices`)."""
    described = ", ".join(f"{a}={s}" for a, s in sizes.items())
    per = f" per slice ({slices} slices)" if slices > 1 else ""
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    fill = [a for a, s in sizes.items() if s == -1]
    if fill:
        if device_count % fixed:
            raise MeshError(f"mesh ({described}) does not fit {device_count} devices{per}: "
                            f"{device_count} is not divisible by the fixed axes' product {fixed}")
        sizes[fill[0]] = device_count // fixed
    total = int(np.prod(list(sizes.values())))
    if total != device_count:
        raise MeshError(f"mesh ({described}) needs {total} devices but {device_count} are available{per}; "
                        "make dp*op*fsdp*tp equal the device count or set one axis to -1")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """A mesh over all (or the given) devices, axes in MESH_AXES order, Auto sharding mode. Devices in one
    slice (or without slices: CPU, GPU) make it as jax.make_mesh does; devices in several slices need
    `sizes` to say which axes span them (DCN_AXES), and make it with mesh_utils.create_hybrid_device_mesh."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = hybrid_shape(sizes, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    slices = _slices(devices)
    if slices != math.prod(dcn):
        spans = " * ".join(f"mesh.{k}={sizes.get(k, 1)}" for k in DCN_AXES.values())
        raise MeshError(f"the devices are in {slices} slice{'s' * (slices > 1)} but {spans} = {math.prod(dcn)}: "
                        "the product of the dcn sizes must equal the number of slices (e.g. mesh.dcn_dp="
                        f"{slices} for data parallelism across them)")
    if slices > 1:
        return Mesh(_hybrid_grid(ici, dcn, devices), MESH_AXES, axis_types=auto)
    shape = ici
    if devices == list(jax.devices()):
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
        except NotImplementedError as e:
            # A TPU topology whose physical axes no product matches an axis size (fsdp=16 on a v4-512,
            # 4 x 8 x 8 chips): jax.make_mesh will not split a physical axis; this will, at some cost
            # in the locality of that axis's collectives.
            from jax.experimental import mesh_utils

            logging.warning("mesh %s does not map onto the devices' physical axes (%s); splitting them",
                            dict(zip(MESH_AXES, shape)), e)
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _slices(devices) -> int:
    """How many slices `devices` are in: distinct `slice_index` values (1 where devices have none)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _hybrid_grid(ici: tuple, dcn: tuple, devices) -> np.ndarray:
    """The devices as a (ici * dcn)-shaped array: each slice's block laid out on its own topology, the
    slices in slice_index order along the DCN axes."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    except NotImplementedError as e:  # as in make_mesh: a slice's physical axes do not match its sizes
        logging.warning("mesh %s per slice does not map onto a slice's physical axes (%s); splitting them",
                        dict(zip(MESH_AXES, ici)), e)
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def data_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): the data shard this process reads, of how many. (process_index, process_count)
    when every process holds rows of its own; fewer shards when an axis the batch is not split over (tp,
    say) spans processes: those hold the same rows and must read the same data, or each device of a tp
    group would see other rows. A process's rows need not be one block (a TPU host's chips are spread
    over the mesh): jax places its local rows in row order."""
    shards = data_shards(mesh)
    return shards[jax.process_index()], len(set(shards))


def data_shards(mesh: Mesh) -> list[int]:
    """The data shard of every process (the same answer on each: computed from the mesh alone)."""
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)  # rows in units of the batch's shards
    rows: dict[int, set] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((n, 1)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(n)[:2]))
    return _data_shards(rows, n)


def _data_shards(rows: dict[int, set], n: int) -> list[int]:
    """`rows`: process -> the batch rows its devices hold (of `n`). Processes holding the same rows share
    a shard; distinct holdings must be disjoint, equal in size and cover the batch (MeshError)."""
    holdings = {p: frozenset(r) for p, r in rows.items()}
    distinct = sorted(set(holdings.values()), key=min)
    if sum(map(len, distinct)) != n or len(set().union(*distinct)) != n or len({len(d) for d in distinct}) != 1:
        raise MeshError(f"the processes' batch rows {[sorted(d) for d in distinct]} do not split the batch's "
                        f"{n} shards into equal, disjoint parts")
    if len(distinct) == len(holdings):  # every process its own rows: its own shard, as always
        return sorted(holdings)
    return [distinct.index(holdings[p]) for p in sorted(holdings)]


def logical_to_mesh(logical_specs, rules=LOGICAL_AXIS_RULES):
    """A pytree of logical PartitionSpecs -> mesh PartitionSpecs."""
    return nn.logical_to_mesh(logical_specs, rules)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a pytree of logically-partitioned (boxed) parameters or their shapes."""
    specs = nn.get_partition_spec(boxed_params)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), logical_to_mesh(specs, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over every data-parallel axis, sequence unsplit."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts multi-host JAX once, before any device is touched.

    Flags win, then OSP_COORDINATOR_ADDRESS / OSP_NUM_PROCESSES / OSP_PROCESS_ID. Given explicitly, jax's
    cluster detection is switched off: under SLURM it would otherwise still narrow each process to the
    GPU numbered SLURM_LOCALID (one GPU a node with one process a node, a missing one with the launcher's
    --per-gpu), so each process keeps every GPU it can see. With none of them,
    `jax.distributed.initialize()` auto-detects the cluster where one is recognised: OSP_DISTRIBUTED=1
    (launch/tpu_pod.sh exports it: a Cloud TPU VM pod is found through its metadata server, with no
    environment variable to tell), a GKE TPU pod, or a multi-task SLURM job (jax's convention there: one
    process per GPU, the GPU numbered SLURM_LOCALID). A plain single process stays single.
    """
    address = coordinator_address or os.environ.get("OSP_COORDINATOR_ADDRESS")
    count = num_processes or (int(os.environ["OSP_NUM_PROCESSES"]) if "OSP_NUM_PROCESSES" in os.environ else None)
    pid = process_id if process_id is not None else (
        int(os.environ["OSP_PROCESS_ID"]) if "OSP_PROCESS_ID" in os.environ else None)
    if address:
        if count is None or pid is None:
            raise ValueError("a coordinator address needs the process count and id too "
                             "(--num_processes/--process_id or OSP_NUM_PROCESSES/OSP_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid,
                                   cluster_detection_method="deactivate")
    elif _on_cluster():
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _on_cluster() -> bool:
    """True where jax can auto-detect the peers: OSP_DISTRIBUTED=1 (set by launch/tpu_pod.sh), a GKE TPU
    pod slice, or a multi-task SLURM job."""
    if os.environ.get("OSP_DISTRIBUTED") == "1":
        return True
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_JOB_ID" in os.environ:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
