"""Scale-out on 8 simulated CPU devices, for the configs/osp_124m.py model, from the compiler alone.

Nothing here executes the 124M step: the train state is `jax.eval_shape`d and the step only lowered
and compiled (batch 8 x 128, so compiling is quick). Two figures, both per device:
- argument bytes of the train step (parameters + optimizer state + the batch) with fsdp=8 are
  about 1/8 of those on one device;
- the FLOPs of the Muon update (Newton–Schulz) with op=8 are about 1/8 of those on one device.
`pytest -s tests/test_scale.py` prints them; docs/benchmarks.md records them.
"""

import jax
import numpy as np
import pytest
from flax import linen as nn

from osp_jax import sharding
from osp_jax.metrics import compiled_cost
from osp_jax.model import abstract_params
from osp_jax.muon import muon
from osp_jax.optim import MUON, param_labels
from osp_jax.train import lower_train_step
from tests.helpers import load_recipe

BATCH, SEQ = 8, 128
ONE = {"dp": 1, "op": 1, "fsdp": 1, "tp": 1}


def _config(mesh_sizes, recipe="osp_124m"):
    cfg = load_recipe(recipe)
    cfg.train.global_batch_size, cfg.train.seq_len = BATCH, SEQ
    cfg.mesh.update(mesh_sizes)
    return cfg


def _mesh(sizes):
    return sharding.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def _flops(compiled) -> float:
    return compiled_cost(compiled)["flops"]


def _compile_train_step(sizes):
    lowered, state = lower_train_step(_config(sizes), _mesh(sizes))
    return lowered.compile(), state


def test_fsdp_splits_parameters_and_optimizer_state():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    single, state = _compile_train_step(ONE)
    split, _ = _compile_train_step({**ONE, "fsdp": 8})
    one, eight = single.memory_analysis(), split.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    ratio = eight.argument_size_in_bytes / one.argument_size_in_bytes
    print(f"\nosp_124m train step, batch {BATCH}x{SEQ}: state {state_bytes / 2**20:,.1f} MiB in all")
    print(f"  per-device argument bytes: 1 device {one.argument_size_in_bytes / 2**20:,.1f} MiB, "
          f"fsdp=8 {eight.argument_size_in_bytes / 2**20:,.1f} MiB, ratio {ratio:.4f}")
    print(f"  per-device temp bytes: 1 device {one.temp_size_in_bytes / 2**20:,.1f} MiB, "
          f"fsdp=8 {eight.temp_size_in_bytes / 2**20:,.1f} MiB")
    # One device holds the whole state (and the batch); fsdp=8 about an eighth of it.
    assert one.argument_size_in_bytes >= state_bytes
    assert ratio < 0.2, ratio


def _keep(tree, labels):
    """The subtree of `tree` whose leaves are labelled MUON (nesting kept: Muon reads q/k/v by path)."""
    if not isinstance(tree, dict):
        return tree if labels == MUON else None
    kept = {k: _keep(tree[k], labels[k]) for k in tree}
    return {k: v for k, v in kept.items() if v is not None} or None


def test_op_splits_newton_schulz_flops():
    boxed = abstract_params(_config(ONE).model, SEQ)
    params = nn.unbox(boxed)
    muon_params = _keep(params, param_labels(params, "muon"))  # the Muon partition, nested as in the model
    matrices = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(muon_params))

    def update(grads, state, params):
        return tx.update(grads, state, params)

    tx = muon(1e-3, weight_decay=0.1)
    state = jax.eval_shape(tx.init, muon_params)
    single = jax.jit(update).lower(muon_params, state, muon_params).compile()
    with jax.set_mesh(_mesh({**ONE, "op": 8})):
        split = jax.jit(update).lower(muon_params, state, muon_params).compile()
    ratio = _flops(split) / _flops(single)
    print(f"\nosp_124m Muon partition ({matrices / 1e6:.1f}M parameters), one optimizer update, per device: "
          f"1 device {_flops(single) / 1e9:,.1f} GFLOP, op=8 {_flops(split) / 1e9:,.1f} GFLOP, ratio {ratio:.4f}")
    assert ratio < 0.25, ratio


def _step_collective_bytes(optimizer, mesh_sizes) -> int:
    """Collective bytes per device of the tiny recipe's step (the OSP model: SSNorm, EmbProj) with
    `optimizer`."""
    from benchmarks.step_time import collectives

    sizes = {**ONE, **mesh_sizes}
    cfg = _config(sizes, "tiny")
    cfg.optimizer.name = optimizer
    lowered, _ = lower_train_step(cfg, _mesh(sizes))
    return collectives(lowered.compile().as_text())["total"]["bytes"]


# The pod-scale issue's bound: what Muon adds to the step's collectives, at most 1.25 x the least it has
# to move (benchmarks/collectives.py: the momentum to whole matrices split over the Newton–Schulz axes
# and the update back). The compiled CPU program moves bfloat16 collectives as float32, so its figures
# are held to the float32 minimum (docs/benchmarks.md).
BOUND = 1.25
BOUND_MESHES = [{"fsdp": 4, "op": 2}, {"dp": 2, "fsdp": 2, "tp": 2}]


def _minimum(cfg):
    from benchmarks.collectives import minimum

    return minimum(cfg, dtype_bytes=4)


@pytest.mark.parametrize("mesh_sizes", BOUND_MESHES, ids=["fsdp4xop2", "dp2xfsdp2xtp2"])
def test_muon_update_moves_at_most_the_bound_over_the_minimum(mesh_sizes):
    """The tiny recipe's optimizer update in its train-state shardings: its all-to-alls and all-gathers
    (AdamW's part has none) are Muon's moves. Whole matrices cannot be shared more finely than the
    minimum's rounding to whole matrices; below the fractional minimum would be a miscount."""
    from benchmarks.step_time import collectives
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.train import abstract_state, state_shardings

    sizes = {**ONE, **mesh_sizes}
    cfg = _config(sizes, "tiny")
    mesh = _mesh(sizes)
    model = Transformer(cfg.model)
    tx, _ = make_optimizer(cfg, mesh)
    sh = state_shardings(cfg, model, tx, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = abstract_state(cfg, model, tx, sh)
        update = jax.jit(tx.update, in_shardings=(sh.params, sh.opt_state, sh.params),
                         out_shardings=(sh.params, sh.opt_state))
        kinds = collectives(update.lower(state.params, state.opt_state, state.params).compile().as_text())
    moved = kinds["all-to-all"]["bytes"] + kinds["all-gather"]["bytes"]
    least = _minimum(cfg)
    print(f"\n{mesh_sizes}: Muon update moves {moved / 2**10:.1f} KiB per device (float32 on CPU); minimum "
          f"{least['whole_matrices'] / 2**10:.1f} KiB in whole matrices, {least['total'] / 2**10:.1f} fractional")
    assert least["total"] <= moved <= BOUND * least["whole_matrices"], (moved, least["whole_matrices"])


@pytest.mark.parametrize("mesh_sizes,limit,bound", [
    pytest.param({"fsdp": 8}, 2.0, False, id="fsdp8"),
    pytest.param({"dp": 2, "fsdp": 2, "tp": 2}, 3.0, True, id="dp2xfsdp2xtp2"),
    pytest.param({"fsdp": 4, "op": 2}, None, True, id="fsdp4xop2", marks=pytest.mark.slow),
])
def test_osp_step_collectives_against_adamw(mesh_sizes, limit, bound, capfd):
    """The full train step of the tiny recipe (the OSP model: SSNorm, EmbProj), Muon against AdamW on the same
    model, compiled once each for both checks:
    - `limit`: with op=1, an fsdp- or tp-split momentum stack must still be orthogonalised a whole matrix per
      device (split over fsdp and tp like op), not split along its matrix dimensions: that needs collectives
      in every Newton–Schulz iteration, and the Muon step moved 5-6x what the AdamW step moves. Split by
      matrix it moves a little more than AdamW's step;
    - `bound`: the OSP step moves at most the bound over the minimum more than AdamW's, and neither compile
      replicates anything by surprise ("Involuntary full rematerialization", XLA's warning on stderr)."""
    moved = {name: _step_collective_bytes(name, mesh_sizes) for name in ("adamw", "muon")}
    warnings = capfd.readouterr().err.count("Involuntary full rematerialization")
    least = _minimum(_config({**ONE, **mesh_sizes}, "tiny"))
    extra = moved["muon"] - moved["adamw"]
    print(f"\n{mesh_sizes}: collectives per device (static), OSP step {moved['muon'] / 2**20:.2f} MiB, AdamW on the "
          f"OSP model {moved['adamw'] / 2**20:.2f} MiB; Muon's extra {extra / least['whole_matrices']:.3f} x the "
          f"minimum; {warnings} rematerialisation warnings")
    if limit is not None:
        assert moved["muon"] < limit * moved["adamw"], moved
    if bound:
        assert warnings == 0
        assert least["total"] <= extra <= BOUND * least["whole_matrices"], (extra, least["whole_matrices"])
