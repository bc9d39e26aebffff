"""Tests for osp_jax.newton_schulz's methods: Polar Express's published table re-derived, each method
against its float64 iteration and the SVD's polar factor, Gram Newton–Schulz's FLOPs, and the methods
through scale_by_muon, optax wrappers and the config."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from osp_jax.metrics import compiled_cost
from osp_jax.newton_schulz import (NS_METHODS, POLAR_EXPRESS_COEFFS, _gram_iteration, _normalize, method_coeffs,
                                   newton_schulz, newton_schulz_reference, polar_express_coeffs)
from tests.test_muon import _assert_bf16_close, _muon_params, _model_tree, _polar, _spectral_matrix

SHAPES = [(64, 64), (64, 160), (160, 64)]


def _best_quintic(lo, hi):
    """The odd quintic p closest to 1 on [lo, hi] in the max norm (Remez: 1 - p equioscillates at lo,
    two interior extrema and hi)."""
    if lo / hi >= 1 - 5e-6:  # the interval is a point: the limit is Newton–Schulz's own quintic
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r, err = (3 * lo + hi) / 4, (lo + 3 * hi) / 4, None
    for _ in range(100):
        x = np.array([lo, q, r, hi])
        a, b, c, e = np.linalg.solve(np.stack([x, x**3, x**5, [1, -1, 1, -1]], 1), np.ones(4))
        root = np.sqrt(9 * b * b - 20 * a * c)
        q, r = np.sqrt((-3 * b - root) / (10 * c)), np.sqrt((-3 * b + root) / (10 * c))
        if err is not None and abs(err - e) < 1e-15:
            break
        err = e
    return a, b, c


def test_polar_express_table_is_the_papers_optimal_composition():
    """Re-derived in float64 from the paper's recipe: from singular values in [1e-3, 1], each step is the
    best quintic on [max(l, 0.0241 u), u], rescaled so that it maps l and u symmetrically about 1; the
    next interval is [p(l), 2 - p(l)]. The published table agrees to 1e-7."""
    lo, hi, rows = 1e-3, 1.0, []
    for _ in POLAR_EXPRESS_COEFFS:
        a, b, c = _best_quintic(max(lo, 0.02407327424182761 * hi), hi)
        scale = 2 / ((a * lo + b * lo**3 + c * lo**5) + (a * hi + b * hi**3 + c * hi**5))
        a, b, c = a * scale, b * scale, c * scale
        rows.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    np.testing.assert_allclose(rows, POLAR_EXPRESS_COEFFS, rtol=1e-7)
    assert 1 - lo < 1e-6  # eight steps take every singular value in [1e-3, 1] to 1


def test_coefficient_tables_carry_their_safety_factors():
    rows = polar_express_coeffs(10)
    (a, b, c), last = POLAR_EXPRESS_COEFFS[1], POLAR_EXPRESS_COEFFS[-1]
    np.testing.assert_allclose(rows[1], (a / 1.01, b / 1.01**3, c / 1.01**5))
    assert rows[7:] == [last] * 3  # the table's last row, unscaled, repeated past its end
    first = method_coeffs("polar_express", 5)[0]  # x / (1.01 ||x||) folded into the first step
    np.testing.assert_allclose(first, np.array(POLAR_EXPRESS_COEFFS[0]) / [1.01**2, 1.01**6, 1.01**10])
    gram = method_coeffs("gram", 8)
    np.testing.assert_allclose(gram[7], np.array(last) / [1.05, 1.05**3, 1.05**5])
    with pytest.raises(ValueError, match="expected one of quintic, polar_express, gram"):
        method_coeffs("cubic", 5)
    with pytest.raises(ValueError, match="ns_coeffs is for method 'quintic'"):
        method_coeffs("polar_express", 5, coeffs=(3.0, -3.0, 1.0))


@pytest.mark.parametrize("method", ["polar_express", "gram"])
@pytest.mark.parametrize("shape", SHAPES)
def test_method_matches_its_float64_iteration(method, shape):
    x = _spectral_matrix(np.random.default_rng(5), *shape)
    _assert_bf16_close(newton_schulz(jnp.asarray(x), method=method), newton_schulz_reference(x, method=method))


@pytest.mark.parametrize("shape", [(64, 160), (160, 64)])
def test_gram_iteration_is_the_plain_iteration_rearranged(shape):
    """In float32 arithmetic the Gram form (R and Q with a restart) and x <- p(x x^T) x agree to rounding,
    restart or not: the restart only resets where rounding accumulates."""
    g = np.random.default_rng(1).standard_normal(shape)
    x = _normalize(jnp.asarray(g.T if shape[0] > shape[1] else g), 1e-7)  # wide, bfloat16, as the update has it
    schedule = method_coeffs("gram", 5)
    plain = np.asarray(x, np.float64)
    for a, b, c in schedule:
        g = plain @ plain.T
        plain = a * plain + b * g @ plain + c * g @ g @ plain
    for restarts in [(2,), ()]:
        gram = _gram_iteration(x, schedule, restarts)
        _assert_bf16_close(gram.astype(jnp.float32), plain)


@pytest.mark.parametrize("shape", [(64, 64), (96, 256)])
def test_polar_express_and_gram_converge_where_the_quintic_plateaus(shape):
    """After 8 steps on a Gaussian matrix the quintic still sits ~0.2 from the polar factor (its
    fixed points oscillate); the converging methods are within 0.05."""
    g = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    polar = _polar(g)

    def error(method):
        y = np.asarray(newton_schulz(jnp.asarray(g), steps=8, method=method), np.float64)
        return np.linalg.norm(y - polar) / np.linalg.norm(polar)

    assert error("quintic") > 0.15
    assert error("polar_express") < 0.05 and error("gram") < 0.05


def test_gram_saves_flops_on_wide_matrices_only():
    def flops(shape, method):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return compiled_cost(jax.jit(functools.partial(newton_schulz, method=method)).lower(x).compile())["flops"]

    # (m, n), m <= n: 5 plain steps cost 20 m^2 n + 10 m^3; Gram's form 8 m^2 n + ~28 m^3.
    assert flops((128, 512), "gram") < 0.8 * flops((128, 512), "quintic")
    assert flops((128, 128), "gram") == flops((128, 128), "polar_express") == flops((128, 128), "quintic")


def test_traced_step_count():
    """Under optax.inject_hyperparams the step count is traced: Polar Express takes row min(t, 7) of
    its table in a fori_loop, the same as a static count; Gram's restarts need a static count."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((32, 48)), jnp.float32)
    rolled = jax.jit(lambda x, k: newton_schulz(x, steps=k, method="polar_express"))(x, 9)
    _assert_bf16_close(rolled, newton_schulz(x, steps=9, method="polar_express"))
    with pytest.raises(ValueError, match="static_args=\\('ns_steps',\\)"):
        jax.jit(lambda x, k: newton_schulz(x, steps=k, method="gram"))(x, 5)


@pytest.mark.parametrize("method", NS_METHODS)
def test_muon_methods_compose_with_multi_steps_and_inject_hyperparams(method):
    from osp_jax.muon import muon

    params = _muon_params(_model_tree())
    grads = _muon_params(_model_tree(key=1))
    plain = muon(0.01, ns_method=method)
    reference, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    injected = optax.inject_hyperparams(muon, static_args=("ns_steps", "ns_method"))(learning_rate=0.01,
                                                                                      ns_method=method)
    updates, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    jax.tree.map(_assert_bf16_close, updates, reference)
    accumulated = optax.MultiSteps(muon(0.01, ns_method=method), every_k_schedule=2)
    state = accumulated.init(params)
    _, state = jax.jit(accumulated.update)(grads, state, params)
    second, _ = jax.jit(accumulated.update)(grads, state, params)
    jax.tree.map(_assert_bf16_close, second, reference)  # the mean of two equal gradients is the gradient


def test_config_names_the_methods_and_make_optimizer_passes_them():
    from osp_jax.config import CHOICES
    from osp_jax.optim import make_optimizer
    from tests.helpers import small_config

    assert CHOICES["optimizer.ns_method"] == NS_METHODS
    params = {"layers": {"mlp": {"up": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 48)),
                                                                jnp.float32)}}}}
    updates = {}
    for method in ("quintic", "gram"):
        cfg = small_config()
        cfg.optimizer.ns_method, cfg.optimizer.warmup_steps, cfg.optimizer.muon_weight_decay = method, 0, 0.0
        tx, _ = make_optimizer(cfg)
        updates[method], _ = jax.jit(tx.update)(params, tx.init(params), params)
    g = params["layers"]["mlp"]["up"]["kernel"][0]

    def cosine(method, direction_of):  # |cos| between an update and a method's orthogonalisation
        u = np.asarray(updates[method]["layers"]["mlp"]["up"]["kernel"][0], np.float64).ravel()
        v = np.asarray(newton_schulz(g, method=direction_of), np.float64).ravel()
        return abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v)

    assert cosine("gram", "gram") > 0.999 and cosine("quintic", "quintic") > 0.999
    assert cosine("quintic", "gram") < 0.995  # the config's method is the one that ran
