"""Mesh construction, the rule table, and sharded == unsharded training steps on 8 CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sharded_step_equals_single_device(optimizer):
    cfg = small_config()
    cfg.optimizer.name = optimizer
    one = {"dp": 1, "op": 1, "fsdp": 1, "tp": 1}
    eight = {"dp": 1, "op": 2, "fsdp": 4, "tp": 1}
    losses1, params1, _ = _run(cfg, one)
    losses8, params8, state8 = _run(cfg, eight)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), params1, params8)
    # Parameters really are split: the embedding table is sharded over fsdp (vocab over tp, size 1 here).
    emb = state8.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
    assert emb.addressable_shards[0].data.shape == (cfg.model.vocab_size, cfg.model.dim // 4)


def test_tensor_parallel_step_equals_single_device():
    cfg = small_config()
    cfg.optimizer.name = "adamw"
    losses1, params1, _ = _run(cfg, {"dp": 1, "op": 1, "fsdp": 1, "tp": 1})
    losses_tp, params_tp, _ = _run(cfg, {"dp": 2, "op": 1, "fsdp": 2, "tp": 2})
    np.testing.assert_allclose(losses1, losses_tp, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), params1, params_tp)


@pytest.mark.parametrize("mesh_sizes,accum", [({"fsdp": 4, "op": 2}, 1), ({"dp": 2, "fsdp": 2, "tp": 2}, 1),
                                              ({"fsdp": 8}, 2)])
def test_sharded_step_compiles_without_replicating_activations(mesh_sizes, accum):
    """XLA says "Involuntary full rematerialization" when it cannot reshard a tensor and replicates it
    on every device instead. No activation may need that. The token embedding's rows did (they leave
    the fsdp-split table split over embed, not batch) whenever op, dp or tp were > 1; so did accumulated
    micro-batches made of consecutive rows (each on half the devices). Compiled in a child, whose C++
    log is its stderr."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    sizes = {"dp": 1, "op": 1, "fsdp": 1, "tp": 1, **mesh_sizes}
    code = ("from tests.helpers import small_config\n"
            "from osp_jax import sharding\n"
            "from osp_jax.train import lower_train_step\n"
            "for embed_proj in (False, True):\n"
            "    c = small_config(embed_proj=embed_proj)\n"
            f"    c.mesh.update({sizes!r})\n"
            f"    c.train.global_batch_size = {8 * accum}\n"
            f"    c.optimizer.grad_accum_steps = {accum}\n"
            "    lower_train_step(c, sharding.make_mesh(c.mesh))[0].compile()\n"
            "print('compiled')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    # The model's ops only: the Muon update's own concatenations are not activations (ops under the
    # step's `cond`; docs/benchmarks.md says when they replicate).
    replicated = [line for line in proc.stderr.splitlines()
                  if "Involuntary full rematerialization" in line and "jit(train_step)/cond/" not in line]
    assert not replicated, replicated[0][:1500]
