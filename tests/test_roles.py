"""The roles table (osp_jax.roles): every parameter of every model variant has exactly one role, each
consumer reads the table and decides as the hand-written rules before it did, an unknown matrix is
refused by name, and Muon's dimension numbers for osp_jax's tree come from it."""
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from osp_jax import model as model_lib
from osp_jax import quant, roles
from osp_jax.muon import MuonDimensionNumbers, infer_dimension_numbers
from osp_jax.optim import _decay_mask, make_optimizer, param_labels
from tests.helpers import small_config

VARIANTS = list(itertools.product((True, False), (False, True), (False, True), ("single", "channel")))
VARIANT_IDS = [f"{'scan' if s else 'unrolled'}-{'tied' if t else 'untied'}-{'proj' if p else 'noproj'}-{n}"
               for s, t, p, n in VARIANTS]


def _config(scan=True, tied=False, proj=True, norm="single", **model):
    return small_config(scan_layers=scan, tie_embeddings=tied, embed_proj=proj, norm_scale=norm, **model)


def _tree(cfg):
    return nn.unbox(model_lib.abstract_params(cfg.model))


def _leaves(tree):
    return [(roles.path_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# The rules each consumer held by hand before the table, kept here as the reference the table must match.
def _old_label(names, ndim, name):
    p = "/".join(names)
    if name == "adamw" or p.endswith("scale") or ndim < 2:
        return "adamw"
    if p in ("embed/embedding", "lm_head/kernel") and name != "muon_all":
        return "adamw"
    return "muon"


def _old_precast(names, tied):
    return (names[-1] == "kernel" and names[0] != "lm_head") or (names[-1] == "embedding" and not tied)


def _old_in_axes(names, ndim):
    if names[-1] != "kernel":
        return None
    first = 1 if names[0] == "layers" else 0
    return tuple(range(first, ndim - 1)) if names[-2] == "o" else (first,)


@pytest.mark.parametrize("scan,tied,proj,norm", VARIANTS, ids=VARIANT_IDS)
def test_every_parameter_has_one_role_and_the_consumers_decide_as_before(scan, tied, proj, norm):
    cfg = _config(scan, tied, proj, norm, dtype="bfloat16")  # so that precast's casts show
    tree = _tree(cfg)
    seen = set()
    for names, x in _leaves(tree):
        role = roles.find(names)
        assert role is not None, names  # a renamed module fails here first
        assert sum(names[-len(r.key):] == r.key for r in roles.ROLES) == 1, names
        assert role.per_layer == names[0].startswith("layers"), names
        if role.rank is not None:
            assert x.ndim == role.rank + (names[0] == "layers"), names
        seen.add(role)
    expected = set(roles.ROLES) - ({roles.LM_HEAD} if tied else set()) - (
        set() if proj else {roles.EMBED_PROJ, roles.HEAD_PROJ})
    assert seen == expected
    for name in roles.OPTIMIZERS:
        labels = param_labels(tree, name)
        assert jax.tree.leaves(labels) == [_old_label(n, x.ndim, name) for n, x in _leaves(tree)], name
    assert jax.tree.leaves(_decay_mask(tree)) == [x.ndim >= 2 and n[-1] != "scale" for n, x in _leaves(tree)]
    assert [quant.weight_in_axes(n, x.ndim) for n, x in _leaves(tree)] == [_old_in_axes(n, x.ndim)
                                                                           for n, x in _leaves(tree)]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
    cast = model_lib.precast_weights(params, cfg.model)
    for (n, _), c in zip(_leaves(params), jax.tree.leaves(cast)):
        want = jnp.dtype(cfg.model.dtype) if _old_precast(n, tied) else jnp.float32
        assert c.dtype == want, n


def _renamed(tree, old, new):
    return {(new if k == old else k): v for k, v in tree.items()}


@pytest.mark.parametrize("name", roles.OPTIMIZERS)
def test_a_renamed_lm_head_is_refused_by_name_not_routed_to_muon(name):
    """If the model renamed `lm_head`, its kernel would have no role: building the optimizer's state
    fails, naming the path, instead of training the head with Muon (or without weight decay)."""
    cfg = _config(tied=False)
    cfg.optimizer.name = name
    tree = _renamed(_tree(cfg), "lm_head", "output_head")
    with pytest.raises(ValueError, match=r"'output_head/kernel' \(2 axes\) has no role"):
        param_labels(tree, name)
    tx, _ = make_optimizer(cfg)
    with pytest.raises(ValueError, match="'output_head/kernel'"):
        jax.eval_shape(tx.init, tree)
    # The model's own tree goes through untouched.
    jax.eval_shape(tx.init, _tree(cfg))


def test_an_unknown_vector_goes_to_adamw_and_a_bad_optimizer_name_is_refused():
    tree = {**_tree(_config()), "extra_bias": jax.ShapeDtypeStruct((7,), jnp.float32)}
    assert param_labels(tree, "muon")["extra_bias"] == "adamw"
    assert _decay_mask(tree)["extra_bias"] is False
    with pytest.raises(ValueError, match="optimizer.name='sgd': expected one of muon, muon_all, adamw"):
        param_labels(tree, "sgd")


def test_linear_inputs_are_the_names_the_model_records():
    cfg = _config()
    model = model_lib.Transformer(cfg.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = _tree(cfg)  # shapes only: the model is traced, not run
    _, state = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, mutable=["intermediates"]), params)
    recorded = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(
        state["intermediates"], is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert model_lib.LINEAR_INPUTS == roles.LINEAR_INPUTS == ("qkv_in", "o_in", "gate_up_in", "down_in")
    assert recorded == set(roles.LINEAR_INPUTS)


# ------------------------------------------------------------------------------------------------
# Muon's dimension numbers for osp_jax's tree


@pytest.mark.parametrize("scan", [True, False])
def test_muon_dimension_numbers_of_the_model_tree_come_from_the_roles(scan):
    cfg = _config(scan=scan, norm="channel")  # channel norms: (L, dim) stacks are still not matrices
    tree = _tree(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # osp_jax's own tree infers silently
        dims = infer_dimension_numbers(tree)
    s = 1 if scan else 0
    layer = (lambda d: d["layers"]) if scan else (lambda d: d["layers_1"])
    assert layer(dims)["attn"]["q"]["kernel"] == MuonDimensionNumbers(s, (s + 1, s + 2))
    assert layer(dims)["attn"]["v"]["kernel"] == MuonDimensionNumbers(s, (s + 1, s + 2))
    assert layer(dims)["attn"]["o"]["kernel"] == MuonDimensionNumbers((s, s + 1), s + 2)
    assert layer(dims)["mlp"]["gate"]["kernel"] == MuonDimensionNumbers(s, s + 1)
    assert layer(dims)["attn_norm"]["scale"] is None and dims["final_norm"]["scale"] is None
    for top in ("embed_proj", "head_proj", "lm_head"):
        assert dims[top]["kernel"] == MuonDimensionNumbers(0, 1)
    assert dims["embed"]["embedding"] == MuonDimensionNumbers(0, 1)  # muon_all trains it with Muon


def test_a_foreign_tree_keeps_the_generic_rule_and_its_warning():
    """Someone else's tree: last two axes, a warning for a rank-3 leaf outside a layer stack; a leaf
    named like one of osp_jax's but of another rank takes the generic rule too."""
    with pytest.warns(UserWarning, match="'block/proj/w' of shape"):
        dims = infer_dimension_numbers({"block": {"proj": {"w": jax.ShapeDtypeStruct((3, 8, 4), jnp.float32)}}})
    assert dims["block"]["proj"]["w"] == MuonDimensionNumbers(1, 2)
    dims = infer_dimension_numbers({"attn": {"q": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}},
                                    "b": jax.ShapeDtypeStruct((8,), jnp.float32)})
    assert dims["attn"]["q"]["kernel"] == MuonDimensionNumbers(0, 1) and dims["b"] is None


# ------------------------------------------------------------------------------------------------
# Hugging Face layout and the EmbProj fold


@pytest.mark.parametrize("role", [r for r in roles.ROLES if r.hf_layout == "kernel"], ids=lambda r: r.name)
def test_hf_layout_is_pytorch_out_by_in_and_inverts(role):
    shape = (6, 4, 5) if role.rank == 3 else (6, 10)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    hf = roles.to_hf(role, x, dim=6, dtype=np.float32)
    fan_in = int(np.prod(shape[:role.fan_in]))
    assert hf.shape == roles.hf_shape(role, shape, 6) == (x.size // fan_in, fan_in)
    np.testing.assert_array_equal(hf, x.reshape(fan_in, -1).T)  # y = x_in @ W  <=>  y = W_hf @ x_in
    np.testing.assert_array_equal(roles.from_hf(role, hf, shape), x)


def test_ssnorm_scale_becomes_a_constant_gain():
    np.testing.assert_array_equal(roles.to_hf(roles.FINAL_NORM, np.float32(1.5), 4, np.float32), np.full(4, 1.5))
    v = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(roles.to_hf(roles.ATTN_NORM, v, 4, np.float32), v)


@pytest.mark.parametrize("tied", [False, True])
def test_fold_matches_float64_reference_across_row_blocks(tied, monkeypatch):
    monkeypatch.setattr(roles, "_ROW_BLOCK_BYTES", 8 * 32 * 5)  # 5 rows of 32 a block: 13 blocks, a ragged last
    cfg = _config(tied=tied).model
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), _tree(_config(tied=tied)))
    emb = params["embed"]["embedding"].astype(np.float64)
    head = emb.T if tied else params["lm_head"]["kernel"].astype(np.float64)
    want_emb = emb @ params["embed_proj"]["kernel"]
    want_head = (params["head_proj"]["kernel"].astype(np.float64) @ head).T
    for role, want in ((roles.EMBEDDING, want_emb), (roles.LM_HEAD, want_head)):
        got = roles.folded(params, cfg, role, np.float32)
        assert got.dtype == np.float32 and got.shape == (cfg.vocab_size, cfg.dim)
        np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=1e-7 * np.abs(want).max())  # up to the cast
    cfg.embed_proj = False
    np.testing.assert_array_equal(roles.folded(params, cfg, roles.LM_HEAD, np.float32), head.T.astype(np.float32))
    with pytest.raises(ValueError, match="neither embedding nor lm_head"):
        roles.folded(params, cfg, roles.ATTN_Q, np.float32)
