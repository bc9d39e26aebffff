"""Tests for osp_jax.orthogonalize: the plan read from the stacks' shardings, and the split update equal
to the one-device update on every mesh of the pod-scale issue (8 simulated CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from osp_jax.newton_schulz import newton_schulz
from osp_jax.orthogonalize import make_plan, orthogonalize_stacks, split_axes
from tests.test_muon import _assert_bf16_close

MESH_AXES = ("dp", "op", "fsdp", "tp")
NS_AXES = ("op", "fsdp", "tp")
# The meshes of the pod-scale issue: every way 8 devices split into dp, op, fsdp and tp that it names.
MESHES = [{"fsdp": 8}, {"fsdp": 4, "op": 2}, {"fsdp": 2, "op": 4}, {"op": 8}, {"dp": 2, "fsdp": 2, "tp": 2},
          {"fsdp": 4, "tp": 2}]


def _mesh(sizes) -> Mesh:
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    return Mesh(np.array(jax.devices()).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _ns(stack):
    return newton_schulz(stack, normalize=False)


def test_split_axes_are_the_mesh_s_own_in_mesh_order():
    mesh = _mesh({"op": 2, "fsdp": 2, "tp": 2})
    assert split_axes(mesh, NS_AXES) == ("op", "fsdp", "tp")
    assert split_axes(mesh, ("tp", "op")) == ("op", "tp")
    assert split_axes(_mesh({"dp": 8}), NS_AXES) == ()  # axes of one device split nothing
    assert split_axes(None, NS_AXES) == () and split_axes(mesh, None) == ()


def test_plan_reads_square_stacks_transposed_and_joins_replicated_ones_by_slicing():
    """The 124M's square group on op=2 x fsdp=2 x tp=2: q is (fsdp, tp), o is (tp, fsdp) and is read
    transposed, EmbProj's kernel (fsdp, -) takes its tp part by a local slice; op replicates them all."""
    mesh = _mesh({"op": 2, "fsdp": 2, "tp": 2})
    shapes = [(12, 768, 768), (12, 768, 768), (1, 768, 768)]
    specs = [P(None, "fsdp", "tp"), P(None, "tp", "fsdp"), P(None, "fsdp", None)]
    plan = make_plan(mesh, NS_AXES, shapes, specs)
    assert (plan.x_axes, plan.y_axes, plan.r_axes) == (("fsdp",), ("tp",), ("op",))
    assert [m.transpose for m in plan.members] == [False, True, False]
    assert plan.members[2].cols == () and plan.specs == tuple(specs)  # nothing asked of the partitioner


def test_plan_asks_the_partitioner_only_for_what_it_cannot_do():
    """A split stack axis, a split over an axis outside the Newton–Schulz axes, a split that does not
    divide, or a wide stack in another layout: the plan asks for a sharding it handles."""
    mesh = _mesh({"dp": 2, "fsdp": 2, "tp": 2})
    shapes = [(4, 64, 96), (4, 64, 96), (2, 64, 96), (6, 64, 96), (4, 64, 96)]
    specs = [P(None, "fsdp", "tp"), P("fsdp", None, "tp"), P(None, "dp", "tp"), P(None, "tp", "fsdp"),
             P(None, ("fsdp", "tp"), None)]
    plan = make_plan(mesh, ("fsdp", "tp"), shapes, specs)
    assert (plan.x_axes, plan.y_axes, plan.r_axes) == (("fsdp",), ("tp",), ())
    assert plan.specs[:3] == (P(None, "fsdp", "tp"), P(None, None, "tp"), P(None, None, "tp"))
    assert plan.specs[3] == P(None, "fsdp", "tp") and not plan.members[3].transpose  # not square: moved
    assert plan.specs[4] == P(None, "fsdp", "tp")  # rows over (fsdp, tp) is no prefix of fsdp: moved
    odd = make_plan(mesh, ("fsdp", "tp"), [(3, 63, 96)], [P(None, "fsdp", "tp")])
    assert odd.specs == (P(None, None, "tp"),) and odd.x_axes == ()  # 63 rows do not split in 2


@pytest.mark.parametrize("sizes", [{"op": 2, "fsdp": 2, "tp": 2}, {"op": 8}, {"fsdp": 4, "tp": 2}])
def test_odd_layouts_give_the_unsplit_result(sizes):
    """Stacks in every layout the plan handles (transposed, joined by slicing, moved by the
    partitioner first, a group that needs padding) come back as the unsplit computation gives them,
    each in its own sharding."""
    mesh = _mesh(sizes)
    rng = np.random.default_rng(0)
    shapes = [(3, 32, 32), (2, 32, 32), (1, 32, 32), (5, 16, 48), (2, 16, 48)]
    specs = [P(None, "fsdp", "tp"), P(None, "tp", "fsdp"), P(None, None, "fsdp"), P(None, "fsdp", None),
             P(None, "tp", "fsdp")]
    stacks = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1] * s[2]), jnp.bfloat16) for s in shapes]
    reference = orthogonalize_stacks(stacks, _ns)
    shardings = [NamedSharding(mesh, spec) for spec in specs]
    with jax.set_mesh(mesh):
        split = jax.jit(lambda xs: orthogonalize_stacks(xs, _ns, shard_axis=NS_AXES), out_shardings=shardings)(
            [jax.device_put(x, s) for x, s in zip(stacks, shardings)])
    for got, want, sharding in zip(split, reference, shardings):
        _assert_bf16_close(got.astype(jnp.float32), want.astype(jnp.float32))
        assert got.sharding.is_equivalent_to(sharding, got.ndim)


@pytest.fixture(scope="module")
def one_device_updates():
    """name -> (config, params, grads, update on one device) for the tiny recipe with optimizer `name`
    (no warmup: a first step with a learning rate, or every update is zero); computed once a name."""
    from tests.helpers import load_recipe

    cache = {}

    def get(name):
        if name not in cache:
            cfg = load_recipe("tiny")
            cfg.optimizer.name, cfg.optimizer.warmup_steps = name, 0
            cache[name] = (cfg, *_one_device_update(cfg))
        return cache[name]

    return get


def _one_device_update(cfg):
    """(params, grads, the optimizer update on one device) for `cfg`'s model: parameters and gradients
    straight from NumPy (no init or random-normal compiles)."""
    from osp_jax.optim import make_optimizer
    from tests.test_quant import random_params

    params = random_params(cfg.model, seed=0)
    grads = jax.tree.map(lambda p: np.random.default_rng(p.size).standard_normal(p.shape).astype(p.dtype), params)
    tx, _ = make_optimizer(cfg)
    return params, grads, jax.jit(tx.update)(grads, tx.init(params), params)[0]


def _recipe_update_on(sizes, cfg, params, grads):
    """The recipe's optimizer update on a mesh of `sizes`, in the train state's own shardings."""
    from osp_jax import sharding
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.train import abstract_state, state_shardings

    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.update({"dp": 1, "op": 1, "fsdp": 1, "tp": 1, **sizes})
    mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg, mesh)
    sh = state_shardings(cfg, Transformer(cfg.model), tx, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        abstract_state(cfg, Transformer(cfg.model), tx, sh)
        update = jax.jit(tx.update, in_shardings=(sh.params, sh.opt_state, sh.params),
                         out_shardings=(sh.params, sh.opt_state))
        put = lambda tree: jax.device_put(tree, sh.params)  # noqa: E731
        return update(put(grads), jax.device_put(tx.init(params), sh.opt_state), put(params))[0]


def _assert_same_updates(updates, reference):
    # Entries of up to ~1.5e-3 (Muon's RMS is lr * 0.2, AdamW's first step lr): within 4e-4, and every
    # leaf within 5% in Frobenius norm, of the one-device update (bf16 Newton–Schulz rounds differently).
    assert all(float(jnp.abs(u).max()) > 1e-4 for u in jax.tree.leaves(reference))
    jax.tree.map(lambda a, b: _assert_bf16_close(a, b, scale=1e-2), updates, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_recipe_update_equals_one_device_on_every_mesh(sizes, one_device_updates):
    """The tiny recipe's optimizer update (Muon and AdamW, the Newton–Schulz work split over op, fsdp
    and tp), in the model's own shardings, against the same update on one device."""
    cfg, params, grads, reference = one_device_updates("muon")
    _assert_same_updates(_recipe_update_on(sizes, cfg, params, grads), reference)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"fsdp": 4, "op": 2}, {"dp": 2, "fsdp": 2, "tp": 2}],
                         ids=["fsdp4xop2", "dp2xfsdp2xtp2"])
def test_muon_all_update_equals_one_device(sizes, one_device_updates):
    """muon_all: the embedding (vocab over tp, embed over fsdp) and the LM head on Muon too, each a
    tall or wide matrix group of its own."""
    cfg, params, grads, reference = one_device_updates("muon_all")
    _assert_same_updates(_recipe_update_on(sizes, cfg, params, grads), reference)


@pytest.mark.parametrize("layers,meshes", [(3, ({"dp": 4, "tp": 2}, {"fsdp": 4, "tp": 2})),
                                           (1, ({"dp": 2, "fsdp": 2, "tp": 2},))], ids=["3-layers", "1-layer"])
def test_recipe_update_on_tensor_parallel_meshes_equals_one_device(layers, meshes):
    """The training recipe's optimizer update (Newton-Schulz split over op, fsdp and tp) of a small model
    with 3 or 1 layers, in the model's own parameter shardings. On these meshes XLA's partitioner cut the
    orthogonalised group into its members with a slice past a shard's end, and compiling failed ("limit
    index (5) must be less than or equal to dimension size (1)"); now the group is made whole along its
    stack axis first. (One one-device reference for the meshes of a layer count.)"""
    from tests.helpers import small_config

    cfg = small_config(layers=layers, dim=64, heads=4, kv_heads=2, ffn_dim=96, embed_proj=True)
    cfg.optimizer.name = "muon"
    params, grads, reference = _one_device_update(cfg)
    for sizes in meshes:
        jax.tree.map(_assert_bf16_close, _recipe_update_on(sizes, cfg, params, grads), reference)


def test_user_dimension_numbers_on_a_mesh():
    """A convolution kernel (h, w, in, out) read as one (h*w*in, out) matrix and a pair of stacks with
    their own dimension numbers, split over fsdp as a user might: the same update as on one device."""
    from osp_jax.muon import MuonDimensionNumbers, scale_by_muon

    rng = np.random.default_rng(0)
    grads = {"conv": jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32),
             "w": jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.float32),
             "v": jnp.asarray(rng.standard_normal((32, 4, 64)), jnp.float32)}
    dims = {"conv": MuonDimensionNumbers((0, 1, 2), 3), "w": MuonDimensionNumbers(1, 2),
            "v": MuonDimensionNumbers(0, 2)}
    opt = scale_by_muon(beta=0.0, nesterov=False, dimension_numbers=dims)
    reference, _ = jax.jit(opt.update)(grads, opt.init(grads))
    mesh = _mesh({"fsdp": 4, "op": 2})
    specs = {"conv": P(None, None, "fsdp", None), "w": P(None, "fsdp", None), "v": P("fsdp", None, None)}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    opt = scale_by_muon(beta=0.0, nesterov=False, dimension_numbers=dims, shard_axis=NS_AXES)
    with jax.set_mesh(mesh):
        updates, _ = jax.jit(opt.update)(jax.device_put(grads, shardings), opt.init(grads))
    jax.tree.map(_assert_bf16_close, updates, reference)
