"""Tests for osp_jax.muon: Newton–Schulz quality, dimension numbers, optax composition, sharding."""
import functools
import os
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from osp_jax.metrics import compiled_cost
from osp_jax.muon import (MuonDimensionNumbers, infer_dimension_numbers, muon, newton_schulz,
                          newton_schulz_reference, scale_by_muon)

L, DIM, HEADS, HEAD_DIM, FFN, VOCAB = 2, 32, 4, 8, 48, 64


def _spectral_matrix(rng, m, n, smallest=1e-2):
    """U diag(s) V^T with singular values log-uniform in [smallest, 1]."""
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.exp(rng.uniform(np.log(smallest), 0.0, k))
    return ((u * s) @ v.T).astype(np.float32)


def _polar(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


def _model_tree(key=0):
    """A small tree shaped like osp_jax.model.Transformer's params (docs/CONTRACTS.md)."""
    shapes = {
        "embed": {"embedding": (VOCAB, DIM)},
        "layers": {
            "attn_norm": {"scale": (L,)},
            "attn": {"q": {"kernel": (L, DIM, HEADS, HEAD_DIM)}, "k": {"kernel": (L, DIM, HEADS, HEAD_DIM)},
                     "v": {"kernel": (L, DIM, HEADS, HEAD_DIM)}, "o": {"kernel": (L, HEADS, HEAD_DIM, DIM)}},
            "mlp_norm": {"scale": (L,)},
            "mlp": {"gate": {"kernel": (L, DIM, FFN)}, "up": {"kernel": (L, DIM, FFN)},
                    "down": {"kernel": (L, FFN, DIM)}},
        },
        "final_norm": {"scale": ()},
        "lm_head": {"kernel": (DIM, VOCAB)},
    }
    rng = np.random.default_rng(key)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _labels(params):
    """Hidden matrices to Muon; embedding, head and norm scales to AdamW (as optim.py routes them)."""
    def label(path, _):
        names = [k.key for k in path]
        return "adamw" if names[0] in ("embed", "lm_head", "final_norm") or "scale" in names else "muon"
    return jax.tree_util.tree_map_with_path(label, params)


def _muon_params(params):
    return {"layers": {"attn": params["layers"]["attn"], "mlp": params["layers"]["mlp"]}}


def _assert_bf16_close(actual, desired, scale=1.0):
    """Equal up to bf16 rounding, which Newton–Schulz (bf16 between steps) amplifies: entries within 4e-2 (times `scale`)
    and the whole matrix within 5% in Frobenius norm."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    np.testing.assert_allclose(actual, desired, atol=4e-2 * scale)
    assert np.linalg.norm(actual - desired) <= 5e-2 * np.linalg.norm(desired)


def _flops(compiled) -> float:
    return compiled_cost(compiled)["flops"]


# ------------------------------------------------------------------------------------------------
# Newton–Schulz
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 128), (96, 96), (128, 64)])
def test_newton_schulz_spectrum(shape):
    x = _spectral_matrix(np.random.default_rng(0), *shape)
    s = np.linalg.svd(np.asarray(newton_schulz(jnp.asarray(x)), np.float64), compute_uv=False)
    # The quintic's maximum on [0, 1] is 1.2024 (it oscillates instead of converging to 1), plus bf16.
    assert s.min() >= 0.6 and s.max() <= 1.21, (s.min(), s.max())


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_newton_schulz_close_to_polar_factor(shape):
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = np.asarray(newton_schulz(jnp.asarray(g)), np.float64)
    polar = _polar(g)
    cosine = (y * polar).sum() / (np.linalg.norm(y) * np.linalg.norm(polar))
    assert cosine > 0.9, cosine


@pytest.mark.parametrize("shape", [(64, 128), (96, 96), (128, 64)])
def test_newton_schulz_matches_float64_reference(shape):
    # The bf16 implementation folds `a x` into the (m, m) polynomial and rounds each iterate to bf16;
    # it must still be the same iteration.
    x = _spectral_matrix(np.random.default_rng(5), *shape)
    _assert_bf16_close(newton_schulz(jnp.asarray(x, jnp.float32)), newton_schulz_reference(x))


def test_newton_schulz_steps_write_no_float32_iterate():
    # Each step's last matmul writes the next bf16 iterate itself: the only float32 tensors of the
    # iterate's shape are the normalisation's and the final cast's, however many steps run.
    x = jax.ShapeDtypeStruct((64, 160), jnp.float32)

    def f32_iterates(steps):
        text = jax.jit(functools.partial(newton_schulz, steps=steps)).lower(x).as_text()
        return text.count("tensor<64x160xf32>")

    assert f32_iterates(5) == f32_iterates(1)


def test_newton_schulz_keeps_dtype_and_zero():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 24)), jnp.bfloat16)
    assert newton_schulz(x).dtype == jnp.bfloat16
    assert not np.any(np.asarray(newton_schulz(jnp.zeros((8, 8)))))


def test_newton_schulz_stack_equals_per_matrix():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 32, 48)), jnp.float32)
    stacked = newton_schulz(x)
    for i in range(2):
        for j in range(3):
            _assert_bf16_close(stacked[i, j], newton_schulz(x[i, j]))


def test_newton_schulz_coefficient_schedule():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((32, 48)), jnp.float32)
    default = (3.4445, -4.7750, 2.0315)
    _assert_bf16_close(newton_schulz(x, steps=3, coeffs=[default] * 3), newton_schulz(x, steps=3))
    # Polar-Express-like schedule: aggressive early steps, converging last ones.
    schedule = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
    y = np.asarray(newton_schulz(x, steps=5, coeffs=schedule), np.float64)
    assert (y * _polar(x)).sum() / np.linalg.norm(y) / np.linalg.norm(_polar(x)) > 0.9
    with pytest.raises(ValueError, match="triples"):
        newton_schulz(x, steps=4, coeffs=schedule)


# ------------------------------------------------------------------------------------------------
# Dimension numbers
# ------------------------------------------------------------------------------------------------


def test_infer_dimension_numbers_for_model_tree():
    dims = infer_dimension_numbers(_model_tree())
    assert dims["layers"]["attn"]["q"]["kernel"] == MuonDimensionNumbers(1, (2, 3))
    assert dims["layers"]["attn"]["k"]["kernel"] == MuonDimensionNumbers(1, (2, 3))
    assert dims["layers"]["attn"]["o"]["kernel"] == MuonDimensionNumbers((1, 2), 3)
    assert dims["layers"]["mlp"]["down"]["kernel"] == MuonDimensionNumbers(1, 2)
    assert dims["lm_head"]["kernel"] == MuonDimensionNumbers(0, 1)
    assert dims["layers"]["attn_norm"]["scale"] is None and dims["final_norm"]["scale"] is None


def test_infer_dimension_numbers_warns_about_a_foreign_stack():
    """A rank-3 leaf outside osp_jax's layout (here flax's multi-head query kernel (dim, heads,
    head_dim)) is read as matrices over its last two axes, which is wrong for it: say so. osp_jax's
    own tree, scanned or unrolled, infers silently."""
    import warnings

    with pytest.warns(UserWarning, match=r"'query/kernel' of shape \(64, 4, 16\) as 64 independent 4 x 16"):
        dims = infer_dimension_numbers({"query": {"kernel": jax.ShapeDtypeStruct((64, 4, 16), jnp.float32)}})
    assert dims["query"]["kernel"] == MuonDimensionNumbers(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infer_dimension_numbers(_model_tree())
        infer_dimension_numbers({f"layers_{i}": {"attn": {"q": {"kernel": jax.ShapeDtypeStruct((64, 4, 16), jnp.float32)}},
                                                 "mlp": {"up": {"kernel": jax.ShapeDtypeStruct((64, 96), jnp.float32)}}}
                                 for i in range(2)})


def _orthogonalized(params):
    """Pure orthogonalisation of `params` (beta=0, no Nesterov: the momentum is the gradient)."""
    opt = scale_by_muon(beta=0.0, nesterov=False)
    updates, _ = jax.jit(opt.update)(params, opt.init(params))
    return updates


def test_attention_kernels_are_batches_of_matrices():
    params = _muon_params(_model_tree())
    updates = _orthogonalized(params)
    q = params["layers"]["attn"]["q"]["kernel"]
    expected_q = newton_schulz(q.reshape(L, DIM, HEADS * HEAD_DIM)).reshape(q.shape)
    _assert_bf16_close(updates["layers"]["attn"]["q"]["kernel"], expected_q)
    o = params["layers"]["attn"]["o"]["kernel"]
    expected_o = newton_schulz(o.reshape(L, HEADS * HEAD_DIM, DIM)).reshape(o.shape)
    _assert_bf16_close(updates["layers"]["attn"]["o"]["kernel"], expected_o)
    down = params["layers"]["mlp"]["down"]["kernel"]  # tall: grouped with the transposed up/gate
    _assert_bf16_close(updates["layers"]["mlp"]["down"]["kernel"], newton_schulz(down))


def test_explicit_dimension_numbers_tree_and_callable():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((3, 8, 4)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)}
    dims = {"w": MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2), "b": MuonDimensionNumbers(1, 0)}
    for spec in (dims, lambda _: dims):
        opt = scale_by_muon(beta=0.0, nesterov=False, dimension_numbers=spec)
        updates, _ = jax.jit(opt.update)(params, opt.init(params))
        _assert_bf16_close(updates["w"], newton_schulz(params["w"].reshape(24, 4)).reshape(3, 8, 4))
        _assert_bf16_close(updates["b"], newton_schulz(params["b"].T).T)


def test_rank_one_leaf_is_an_error_naming_the_path():
    params = {"layers": {"attn_norm": {"scale": jnp.ones((L,))}, "w": jnp.ones((4, 4))}}
    opt = scale_by_muon()
    with pytest.raises(ValueError, match="layers/attn_norm/scale"):
        opt.update(params, opt.init(params))
    # A matrix whose dimension numbers say None is not a Muon leaf either.
    opt = scale_by_muon(dimension_numbers={"w": None})
    with pytest.raises(ValueError, match="'w'.*\\(4, 4\\)"):
        opt.update({"w": jnp.ones((4, 4))}, opt.init({"w": jnp.ones((4, 4))}))


# ------------------------------------------------------------------------------------------------
# Composition with optax, checkpointing
# ------------------------------------------------------------------------------------------------


def test_inside_chain_with_clipping():
    params = _muon_params(_model_tree())
    grads = _muon_params(_model_tree(key=1))
    opt = optax.chain(optax.clip_by_global_norm(1.0), scale_by_muon(), optax.scale(-0.01))
    updates, state = jax.jit(opt.update)(grads, opt.init(params))
    assert jax.tree.all(jax.tree.map(lambda u, p: u.shape == p.shape and bool(jnp.all(jnp.isfinite(u))),
                                     updates, params))
    assert int(state[1].count) == 1


def test_multi_steps_accumulates_then_updates():
    params = _muon_params(_model_tree())
    grads = _muon_params(_model_tree(key=1))
    opt = optax.MultiSteps(muon(0.01), every_k_schedule=2)
    update = jax.jit(opt.update)
    state = opt.init(params)
    first, state = update(grads, state, params)
    second, state = update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(first))
    assert all(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(second))


def test_inject_hyperparams():
    params = _muon_params(_model_tree())
    grads = _muon_params(_model_tree(key=1))
    opt = optax.inject_hyperparams(muon)(learning_rate=0.01)
    update = jax.jit(opt.update)
    state = opt.init(params)
    updates, _ = update(grads, state, params)
    plain = muon(0.01)
    reference, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    jax.tree.map(_assert_bf16_close, updates, reference)
    state.hyperparams["learning_rate"] = jnp.asarray(0.02)  # e.g. a learning-rate finder
    doubled, _ = update(grads, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-6), doubled, updates)


def test_multi_transform_with_adamw_passes_masked_leaves():
    params = _model_tree()
    grads = _model_tree(key=1)
    opt = optax.multi_transform({"muon": muon(0.02, weight_decay=0.1), "adamw": optax.adamw(1e-3)},
                                _labels)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    # Muon's update RMS is rms_scale * lr (+ weight decay); AdamW's first step is lr * sign(g).
    q = updates["layers"]["attn"]["q"]["kernel"]
    assert 0.5 * 0.2 * 0.02 < float(jnp.sqrt(jnp.mean(q**2))) < 2.0 * 0.2 * 0.02
    np.testing.assert_allclose(jnp.abs(updates["embed"]["embedding"]), 1e-3, rtol=1e-2)


def test_state_survives_orbax_round_trip(tmp_path):
    # The training set-up: Muon and AdamW partitions, so the state holds MaskedNodes too.
    params = _model_tree()
    grads = _model_tree(key=1)
    opt = optax.multi_transform({"muon": muon(0.01, weight_decay=0.1), "adamw": optax.adamw(1e-3)}, _labels)
    update = jax.jit(opt.update)
    _, state = update(grads, opt.init(params), params)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))

    assert jax.tree.structure(restored) == jax.tree.structure(state)
    expected, _ = update(grads, state, params)
    actual, _ = update(grads, restored, params)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


# ------------------------------------------------------------------------------------------------
# Sharded orthogonalisation
# ------------------------------------------------------------------------------------------------


def _op_mesh():
    return Mesh(np.array(jax.devices()).reshape(1, 8, 1, 1), ("dp", "op", "fsdp", "tp"),
                axis_types=(AxisType.Auto,) * 4)


@pytest.mark.parametrize("stacked", [False, True])
def test_op_axis_splits_newton_schulz_work(stacked):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    matrices = jax.random.normal(jax.random.key(0), (8, 256, 256))
    grads = {"w": matrices} if stacked else {f"w{i}": matrices[i] for i in range(8)}
    opt = muon(0.01)
    state = opt.init(grads)

    def update(g, s):
        return opt.update(g, s)

    single = jax.jit(update).lower(grads, state).compile()
    with jax.set_mesh(_op_mesh()):
        split = jax.jit(update).lower(grads, state).compile()
        sharded, _ = split(grads, state)
    unsharded, _ = single(grads, state)

    ratio = _flops(split) / _flops(single)
    print(f"per-device FLOPs, op=8 vs one device: {_flops(split):.3g} / {_flops(single):.3g} = {ratio:.3f}")
    assert ratio <= 0.25, ratio
    # muon scales the orthogonalised matrices by lr * rms_scale * sqrt(max(fan_in, fan_out)) =
    # 0.01 * 0.2 * 16. The two programs round differently in bf16 (each is ~1% from a float64
    # Newton–Schulz in Frobenius norm), so they agree to bf16 tolerance, not bit for bit.
    jax.tree.map(lambda a, b: _assert_bf16_close(a, b, scale=0.01 * 0.2 * 16), sharded, unsharded)


def test_one_batched_newton_schulz_per_shape_group():
    # 8 wide + 4 tall leaves of one shape (up to transposition) and 2 square ones: two groups, so
    # 2 groups x 5 steps x 3 matmuls, however many leaves there are.
    grads = {**{f"wide{i}": jnp.ones((16, 32)) for i in range(8)},
             **{f"tall{i}": jnp.ones((2, 32, 16)) for i in range(4)},
             "square": jnp.ones((2, 16, 16))}
    opt = scale_by_muon()
    jaxpr = jax.make_jaxpr(opt.update)(grads, opt.init(grads))
    assert sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns) == 2 * 5 * 3


_FSDP_OP_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from osp_jax.muon import scale_by_muon
mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 4, 1), ("dp", "op", "fsdp", "tp"), axis_types=(AxisType.Auto,) * 4)
tree = {f"w{i}": jax.ShapeDtypeStruct((4, 64, 128), jnp.float32) for i in range(4)}  # 4 same-shape layer stacks
split = {k: NamedSharding(mesh, P(None, "fsdp", None)) for k in tree}                 # as fsdp splits a kernel
opt = scale_by_muon()
with jax.set_mesh(mesh):
    state = jax.eval_shape(opt.init, tree)
    state_split = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)._replace(mu=split)
    update = jax.jit(opt.update, in_shardings=(split, state_split), out_shardings=(split, state_split))
    update.lower(tree, state).compile()
print("compiled")
"""


def test_layer_stacks_reach_the_op_split_without_a_full_rematerialization():
    """On an fsdp x op mesh, stacks whose layer count the op axis divides go to the op split one by one:
    concatenating four fsdp-split stacks first made XLA replicate them ("[SPMD] Involuntary full
    rematerialization") before splitting the result over op."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", _FSDP_OP_PROBE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]


def test_explicit_mesh_argument_and_uneven_groups():
    # 3 + 2 matrices of one shape over 8 devices: padded to 8; a mesh without `op` runs unsplit.
    grads = {"a": jax.random.normal(jax.random.key(1), (3, 64, 32)),
             "b": jax.random.normal(jax.random.key(2), (2, 32, 64))}
    opt = scale_by_muon(beta=0.0, nesterov=False)
    reference, _ = jax.jit(opt.update)(grads, opt.init(grads))
    for mesh in (_op_mesh(), Mesh(np.array(jax.devices()), ("data",))):
        opt = scale_by_muon(beta=0.0, nesterov=False, mesh=mesh)
        updates, _ = jax.jit(opt.update)(grads, opt.init(grads))
        jax.tree.map(_assert_bf16_close, updates, reference)


def test_explicit_mesh_axes_give_the_same_update_in_each_leaf_s_own_sharding():
    """With Explicit mesh axes (shardings in the types), same-shaped leaves sharded differently are
    stacked, an uneven stack padded and sliced, and every update comes back sharded as its leaf."""
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.standard_normal((3, 16, 32)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
             "c": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
    opt = scale_by_muon(beta=0.0, nesterov=False, dimension_numbers=MuonDimensionNumbers(-2, -1))
    reference, _ = jax.jit(opt.update)(grads, opt.init(grads))
    mesh = jax.make_mesh((1, 2, 4, 1), ("dp", "op", "fsdp", "tp"), axis_types=(AxisType.Explicit,) * 4)
    specs = {"a": P(None, "fsdp", None), "b": P("fsdp", None), "c": P(None, "fsdp")}
    grads = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
    opt = scale_by_muon(beta=0.0, nesterov=False, dimension_numbers=MuonDimensionNumbers(-2, -1),
                        shard_axis=("op", "fsdp", "tp"))
    with jax.set_mesh(mesh):
        updates, _ = jax.jit(opt.update)(grads, opt.init(grads))
    jax.tree.map(_assert_bf16_close, updates, reference)
    assert {k: u.sharding.spec for k, u in updates.items()} == specs


# ------------------------------------------------------------------------------------------------
# Optimisation sanity
# ------------------------------------------------------------------------------------------------


def test_muon_lowers_least_squares_loss():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (256, 32))
    y = x @ jax.random.normal(kw, (32, 16))

    def loss(w):
        return jnp.mean((x @ w["w"] - y) ** 2)

    params = {"w": jnp.zeros((32, 16))}
    opt = muon(optax.linear_schedule(0.2, 0.0, 100))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    start = loss(params)
    for _ in range(100):
        params, state = step(params, state)
    assert loss(params) < 0.05 * start, (loss(params), start)


def test_readme_optax_chain_runs_on_a_tree_with_vectors_and_an_embedding():
    """The README's "Muon in your own optax chain" snippet, run as written on a tree with a bias and
    an embedding (chaining osp_jax.muon over a whole tree refuses the bias)."""
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Muon in your own optax chain"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    tx = scope["tx"]
    params = {"embed": jnp.ones((50, 16)), "w": jnp.full((16, 32), 0.1), "b": jnp.zeros((32,))}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    # b took AdamW's first step (-lr for a unit gradient); w took Muon's, which is not that
    np.testing.assert_allclose(np.asarray(updates["b"]), -1e-3, rtol=1e-4)
    assert not np.allclose(np.asarray(updates["w"]), -1e-3, rtol=0.1)
    # on osp_jax's own tree (EmbProj, untied head) the snippet's labels are the recipe's, as it says
    from flax import linen as nn

    from osp_jax.model import Transformer
    from osp_jax.optim import param_labels
    from tests.helpers import small_config

    model = Transformer(small_config(embed_proj=True).model)
    tree = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    labels = jax.tree_util.tree_map_with_path(scope["label"], tree)
    assert labels == param_labels(tree, "muon")
    assert labels["embed_proj"]["kernel"] == "muon" and labels["lm_head"]["kernel"] == "adamw"
