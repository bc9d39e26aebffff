"""Mesh construction (one slice, and several with fake TPU devices), the rule table, and sharded ==
unsharded training steps on 8 CPU devices."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.experimental import mesh_utils

from osp_jax import sharding
from osp_jax.model import Transformer
from osp_jax.optim import make_optimizer
from osp_jax.step import init_state, train_step
from osp_jax.train import state_shardings
from tests.helpers import small_config


def test_mesh_fill_and_errors():
    assert sharding.mesh_shape({"dp": 2, "op": 1, "fsdp": -1, "tp": 1}, 8) == (2, 1, 4, 1)
    with pytest.raises(sharding.MeshError, match=r"dp=3.*needs 3 devices but 8"):
        sharding.mesh_shape({"dp": 3, "op": 1, "fsdp": 1, "tp": 1}, 8)
    with pytest.raises(sharding.MeshError, match="not divisible"):
        sharding.mesh_shape({"dp": 3, "op": 1, "fsdp": -1, "tp": 1}, 8)
    assert sharding.mesh_shape({"fsdp": -1, "op": 2}, 8) == (1, 2, 4, 1)  # axes left out are 1
    with pytest.raises(sharding.MeshError, match=r"unknown mesh axes \['data'\]"):
        sharding.mesh_shape({"data": 8}, 8)
    mesh = sharding.make_mesh({"dp": 1, "op": 2, "fsdp": 4, "tp": 1})
    assert dict(mesh.shape) == {"dp": 1, "op": 2, "fsdp": 4, "tp": 1}


def test_a_mesh_jax_will_not_map_onto_the_topology_splits_physical_axes(monkeypatch, caplog):
    """jax.make_mesh refuses fsdp=16 on a v4-512 (4 x 8 x 8 chips: no product of physical axes is 16),
    the README's pod mesh; make_mesh then splits a physical axis, with a warning, instead of a traceback."""
    def refuse(*args, **kwargs):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 2 of size 16")

    monkeypatch.setattr(jax, "make_mesh", refuse)
    mesh = sharding.make_mesh({"dp": 2, "op": 1, "fsdp": 4, "tp": 1})
    assert dict(mesh.shape) == {"dp": 2, "op": 1, "fsdp": 4, "tp": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert "splitting them" in caplog.text


def test_processes_holding_the_same_rows_read_the_same_data():
    """The data shard of each process: its own when it holds rows of its own (in any order: a TPU
    host's chips are spread over the mesh); a shared one for processes a tp group spans (each fed its own
    half before: a tp pair saw other rows); an error when the holdings do not split the batch."""
    two = {0: {0, 1}, 1: {2, 3}}
    assert sharding._data_shards(two, 4) == [0, 1]
    spread = {0: {0, 2}, 1: {1, 3}}  # rows {0, 4, 8, 12} of a v4 host: still its own shard
    assert sharding._data_shards(spread, 4) == [0, 1]
    assert sharding._data_shards({0: {0, 1}, 1: {0, 1}}, 2) == [0, 0]  # tp=2, one device a process
    mixed = {p: {2 * (p // 2), 2 * (p // 2) + 1} for p in range(4)}  # dp=2 x tp=2 over 4 processes
    assert sharding._data_shards(mixed, 4) == [0, 0, 1, 1]
    with pytest.raises(sharding.MeshError, match="equal, disjoint"):
        sharding._data_shards({0: {0, 1, 2}, 1: {2, 3}}, 4)
    mesh = sharding.make_mesh({"dp": 2, "op": 1, "fsdp": 2, "tp": 2})
    assert sharding.data_shard(mesh) == (0, 1) and sharding.data_shards(mesh) == [0]  # one process


# ------------------------------------------------------------------------------------------ multislice
@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What mesh_utils reads of a TPU device (and NamedSharding of any device)."""
    id: int
    process_index: int
    slice_index: int
    coords: tuple
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v5p"


def fake_slices(n_slices, topology=(2, 2, 2), chips_per_host=4):
    """`n_slices` v5p slices of `topology` chips (2x2x2: a v5p-16, two hosts of four chips), ids and
    processes numbered slice by slice as on a multislice job."""
    per_slice = int(np.prod(topology))
    devices = []
    for s in range(n_slices):
        for i, (z, y, x) in enumerate(np.ndindex(*reversed(topology))):
            d = s * per_slice + i
            devices.append(FakeTpu(id=d, process_index=d // chips_per_host, slice_index=s, coords=(x, y, z)))
    return devices


def _slice_of(mesh):
    return np.vectorize(lambda d: d.slice_index)(mesh.devices)


@pytest.mark.parametrize("ici,dcn,shape", [
    ({"fsdp": -1}, {"dcn_dp": 2}, (2, 1, 8, 1)),                 # 2 x v5p-16: dp over DCN, fsdp within a slice
    ({"dp": 2, "op": 2, "fsdp": 2}, {"dcn_dp": 2}, (4, 2, 2, 1)),
    ({"fsdp": 8}, {"dcn_fsdp": 2}, (1, 1, 16, 1)),                # fsdp across slices too
    ({"fsdp": 4, "tp": 2}, {"dcn_dp": 2}, (2, 1, 4, 2)),
])
def test_multislice_mesh_keeps_each_slice_contiguous(ici, dcn, shape):
    """mesh.dcn_dp / dcn_fsdp: a slice holds one contiguous block of the mesh, so only the DCN axis's
    collectives cross slices; each slice's block is laid out on its own ICI topology."""
    devices = fake_slices(2)
    mesh = sharding.make_mesh({**ici, **dcn}, devices)
    assert tuple(mesh.shape.values()) == shape and sorted(d.id for d in mesh.devices.flat) == list(range(16))
    axis = sharding.MESH_AXES.index("dp" if "dcn_dp" in dcn else "fsdp")
    half = shape[axis] // 2
    ici_shape, _ = sharding.hybrid_shape({**ici, **dcn}, 16)
    for s, block in enumerate((slice(0, half), slice(half, None))):
        # The first half of the DCN axis is slice 0, the rest slice 1, each laid out as one slice alone.
        part = mesh.devices[tuple(block if a == axis else slice(None) for a in range(4))]
        assert (_slice_of(mesh)[tuple(block if a == axis else slice(None) for a in range(4))] == s).all()
        alone = mesh_utils.create_device_mesh(ici_shape, devices[8 * s: 8 * (s + 1)])
        assert [d.id for d in part.flat] == [d.id for d in alone.flat]
    assert sharding.mesh_shape({**ici, **dcn}, 16) == shape


def test_multislice_fsdp_ring_follows_the_ici_links():
    """fsdp over a v5p-16's 8 chips: consecutive devices of a slice's fsdp axis (and its last and first)
    are ICI neighbours, a ring; the ids alone, reshaped, would not be (chip 1 -> 2 is a diagonal)."""
    mesh = sharding.make_mesh({"fsdp": -1, "dcn_dp": 2}, fake_slices(2))
    for ring in mesh.devices[:, 0, :, 0]:
        coords = [np.array(d.coords) for d in ring]
        assert all(np.abs(a - b).sum() == 1 for a, b in zip(coords, coords[1:] + coords[:1])), [d.id for d in ring]


def test_multislice_data_shards():
    """The batch split over a dp that crosses slices: every process reads rows of its own, those of
    slice 0's processes are the first half; a tp group spanning the two hosts of a slice shares a shard."""
    devices = fake_slices(2)
    mesh = sharding.make_mesh({"fsdp": -1, "dcn_dp": 2}, devices)
    assert sharding.data_shards(mesh) == [0, 1, 2, 3]
    rows = {}
    for device, index in sharding.batch_sharding(mesh).devices_indices_map((16, 1)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(16)[:2]))
    assert set().union(rows[0], rows[1]) == set(range(8)) and set().union(rows[2], rows[3]) == set(range(8, 16))
    tp_across_hosts = sharding.make_mesh({"tp": 8, "dcn_dp": 2}, devices)
    assert sharding.data_shards(tp_across_hosts) == [0, 0, 1, 1]


def test_multislice_errors_name_the_slices():
    devices = fake_slices(2)
    with pytest.raises(sharding.MeshError, match=r"devices are in 2 slices but mesh.dcn_dp=1 \* mesh.dcn_fsdp=1 = 1"):
        sharding.make_mesh({"fsdp": -1}, devices)  # jax.make_mesh would refuse a multislice topology
    with pytest.raises(sharding.MeshError, match=r"devices are in 2 slices but mesh.dcn_dp=4 \* mesh.dcn_fsdp=1 = 4"):
        sharding.make_mesh({"fsdp": -1, "dcn_dp": 4}, devices)
    with pytest.raises(sharding.MeshError, match=r"devices are in 1 slice but mesh.dcn_dp=2"):
        sharding.make_mesh({"fsdp": -1, "dcn_dp": 2})  # the 8 CPU devices: one slice
    with pytest.raises(sharding.MeshError, match=r"needs 16 devices but 8 are available per slice \(2 slices\)"):
        sharding.mesh_shape({"fsdp": 16, "dcn_dp": 2}, 16)
    with pytest.raises(sharding.MeshError, match="3 slices cannot split 16 devices"):
        sharding.mesh_shape({"fsdp": -1, "dcn_dp": 3}, 16)


def test_rule_table_names_every_logical_axis_once():
    names = [rule[0] for rule in sharding.LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    from osp_jax.model import abstract_params
    used = {a for spec in jax.tree.leaves(nn.get_partition_spec(abstract_params(small_config().model)),
                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
            for a in spec if a}
    assert used <= set(names), used - set(names)


def _batch(cfg, n=8, seed=0):
    toks = jax.random.randint(jax.random.key(seed), (n, cfg.train.seq_len + 1), 0, cfg.model.vocab_size)
    seg = jnp.ones((n, cfg.train.seq_len), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(cfg.train.seq_len), (n, cfg.train.seq_len))
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos}


def _run(cfg, mesh_sizes, steps=3):
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
    model = Transformer(cfg.model)
    tx, _ = make_optimizer(cfg, mesh)
    shardings = state_shardings(cfg, model, tx, mesh)
    bsh = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = jax.jit(functools.partial(init_state, cfg, model, tx), out_shardings=shardings)(jax.random.key(0))
        step = jax.jit(functools.partial(train_step, model=model, tx=tx), in_shardings=(shardings, bsh),
                       out_shardings=(shardings, sharding.replicated(mesh)))
        losses = []
        for i in range(steps):
            state, m = step(state, jax.device_put(_batch(cfg, seed=i), bsh))
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state


FSDP_OP = {"dp": 1, "op": 2, "fsdp": 4, "tp": 1}
DP_FSDP_TP = {"dp": 2, "op": 1, "fsdp": 2, "tp": 2}


@pytest.mark.parametrize("optimizer,meshes", [("adamw", (FSDP_OP, DP_FSDP_TP)), ("muon", (FSDP_OP,))],
                         ids=["adamw", "muon"])
def test_sharded_step_equals_single_device(optimizer, meshes):
    """Three steps on 8 devices (fsdp x op; for AdamW also dp x fsdp x tp, tensor parallelism) give the
    losses and parameters of the same steps on one device, computed once for all of an optimizer's meshes."""
    cfg = small_config()
    cfg.optimizer.name = optimizer
    # The partitioned program is the same for every Newton–Schulz method (only its coefficients differ); the
    # quintic, whose fixed points oscillate instead of sharpening, grows bfloat16 rounding differences least
    # (Polar Express: 1.6x this tolerance after the run, docs/benchmarks.md, issue 22).
    cfg.optimizer.ns_method = "quintic"
    losses1, params1, _ = _run(cfg, {"dp": 1, "op": 1, "fsdp": 1, "tp": 1})
    for mesh_sizes in meshes:
        losses8, params8, state8 = _run(cfg, mesh_sizes)
        np.testing.assert_allclose(losses1, losses8, rtol=1e-5, err_msg=str(mesh_sizes))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), params1, params8)
        if mesh_sizes == FSDP_OP:
            # Parameters really are split: the embedding table is sharded over fsdp (vocab over tp, size 1 here).
            emb = state8.params["embed"]["embedding"]
            assert emb.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
            assert emb.addressable_shards[0].data.shape == (cfg.model.vocab_size, cfg.model.dim // 4)


@pytest.mark.slow  # over 15 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_sharded_step_compiles_without_replicating_activations():
    """XLA says "Involuntary full rematerialization" when it cannot reshard a tensor and replicates it
    on every device instead. No activation may need that. The token embedding's rows did (they leave
    the fsdp-split table split over embed, not batch) whenever op, dp or tp were > 1; so did accumulated
    micro-batches made of consecutive rows (each on half the devices). Compiled in one child (each mesh,
    with and without EmbProj), whose C++ log is its stderr, each compile's part headed by its mesh."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    cases = [({"fsdp": 4, "op": 2}, 1), ({"dp": 2, "fsdp": 2, "tp": 2}, 1), ({"fsdp": 8}, 2)]
    code = ("import sys\n"
            "from tests.helpers import small_config\n"
            "from osp_jax import sharding\n"
            "from osp_jax.train import lower_train_step\n"
            f"for sizes, accum in {cases!r}:\n"
            "    for embed_proj in (False, True):\n"
            "        print(f'== mesh {sizes} grad_accum_steps={accum} embed_proj={embed_proj}', file=sys.stderr,"
            " flush=True)\n"
            "        c = small_config(embed_proj=embed_proj)\n"
            "        c.mesh.update({'dp': 1, 'op': 1, 'fsdp': 1, 'tp': 1, **sizes})\n"
            "        c.train.global_batch_size = 8 * accum\n"
            "        c.optimizer.grad_accum_steps = accum\n"
            "        lower_train_step(c, sharding.make_mesh(c.mesh))[0].compile()\n"
            "print('compiled')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}  # XLA_FLAGS: conftest's, 8 devices
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.count("== mesh ") == 2 * len(cases)
    # The model's ops only: the Muon update's own concatenations are not activations (ops under the
    # step's `cond`; docs/benchmarks.md says when they replicate).
    compile_of = ""
    for line in proc.stderr.splitlines():
        if line.startswith("== mesh "):
            compile_of = line
        assert not ("Involuntary full rematerialization" in line and "jit(train_step)/cond/" not in line), \
            f"{compile_of}: {line[:1500]}"
