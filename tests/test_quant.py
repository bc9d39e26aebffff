"""Fake quantisation: kurtosis reference, identity at 16 bits, level counts, clip search, Hadamard, model hooks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from osp_jax import metrics, quant
from osp_jax.model import Transformer, abstract_params
from tests.helpers import small_config


def random_params(model_config, seed=0, std=None):
    """Parameters of the right shapes straight from NumPy (no init compile): normal kernels, orthogonal
    EmbProj, unit norm scales."""
    rng = np.random.default_rng(seed)
    std = model_config.init_std if std is None else std

    def init(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            return np.ones(s.shape, np.float32)
        if "embed_proj" in name or "head_proj" in name:
            return np.linalg.qr(rng.standard_normal(s.shape))[0].astype(np.float32)
        return (rng.standard_normal(s.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, nn.unbox(abstract_params(model_config)))


def levels(x, axes):
    """Largest number of distinct values in any slice of `x` reduced over `axes`."""
    x = np.moveaxis(np.asarray(x), axes, range(-len(axes), 0))
    flat = x.reshape(-1, int(np.prod(x.shape[-len(axes):])))
    return max(len(np.unique(row)) for row in flat)


def kurtosis_ref(x):
    """The paper's evaluate_kurtosis.py in float64: ((x**4).mean(-1) / x.std(-1)**4 - 3).relu(), torch's
    std being the unbiased one (ddof=1)."""
    x = np.asarray(x, np.float64)
    return np.maximum(np.mean(x ** 4, -1) / np.std(x, -1, ddof=1) ** 4 - 3.0, 0.0)


# ------------------------------------------------------------------------------------------ kurtosis

def test_kurtosis_gaussian_near_zero_and_outlier_channel_large():
    x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
    k = np.asarray(metrics.excess_kurtosis(jnp.asarray(x)))
    np.testing.assert_allclose(k, kurtosis_ref(x), rtol=1e-3, atol=1e-4)
    assert k.mean() < 0.1
    y = x.copy()
    y[:, 7] = 200.0  # one massive channel: an activation outlier
    ky = np.asarray(metrics.excess_kurtosis(jnp.asarray(y)))
    np.testing.assert_allclose(ky, kurtosis_ref(y), rtol=1e-3)
    assert ky.mean() > 1000


def test_kurtosis_is_the_papers_at_small_width_and_zero_for_a_flat_token():
    """At 16 features the std's ddof moves the ratio by (16/15)^2 = 14%: it must be the paper's (1). A
    token whose features are all equal has no spread: 0, not NaN or infinity. outlier_stats averages
    over the tokens its mask keeps only."""
    x = np.random.default_rng(1).standard_normal((3, 64, 16)).astype(np.float32)
    x[..., 5] *= 6.0  # a heavy channel, so that most tokens' kurtosis is above zero
    np.testing.assert_allclose(metrics.excess_kurtosis(jnp.asarray(x)), kurtosis_ref(x), rtol=1e-4, atol=1e-5)
    flat = np.zeros((2, 16), np.float32)
    flat[1] = 3.0
    assert np.asarray(metrics.excess_kurtosis(jnp.asarray(flat))).tolist() == [0.0, 0.0]
    mask = np.zeros((1, 64), bool)
    mask[0, :40] = True
    hidden = x[:, None]  # (layers + 1, batch 1, seq, dim)
    stats = metrics.outlier_stats(jnp.asarray(hidden), jnp.asarray(mask))
    np.testing.assert_allclose(stats["kurtosis_per_layer"], kurtosis_ref(x[:, :40]).mean(-1), rtol=1e-4)
    np.testing.assert_allclose(stats["max_abs_per_layer"], np.abs(x[:, :40]).max(axis=(1, 2)), rtol=1e-6)


# ------------------------------------------------------------------------------------------ quantisers

def test_16_bits_is_the_identity():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 2, 256)), jnp.float32)
    assert quant.fake_quant_asym(x, 16) is x
    assert quant.fake_quant_sym(x, 16) is x
    assert quant.quantize_kv(x, 16) is x
    assert quant.quantize_weight(x, 16, 0, clip_search=True) is x
    params = {"layers": {"mlp": {"up": {"kernel": np.asarray(x[..., 0])}}}}
    assert quant.quantize_weights(params, 16) is params
    # 15 bits is already within 1e-3 relative, so 16 = "not quantised" is no cliff.
    np.testing.assert_allclose(quant.fake_quant_asym(x, 15), x, rtol=1e-3, atol=1e-3 * float(jnp.abs(x).max()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_activation_rows_have_at_most_2_pow_bits_levels(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((4, 6, 64)).astype(np.float32) * rng.uniform(0.1, 50, (4, 6, 1)).astype(np.float32)
    q = np.asarray(quant.fake_quant_asym(jnp.asarray(x), bits, -1))
    assert levels(q, (-1,)) <= 2 ** bits
    # Per token: each row's error is bounded by its own step, not by the largest row's.
    step = (np.maximum(x.max(-1), 0) - np.minimum(x.min(-1), 0)) / (2 ** bits - 1)
    assert np.all(np.abs(q - x).max(-1) <= step / 2 + 1e-5 * np.abs(x).max(-1))
    assert np.all(q[x == 0] == 0)  # zero is exactly representable
    # o-projection input: one token = all its (heads, head_dim) features.
    xo = x.reshape(4, 6, 8, 8)
    assert levels(quant.fake_quant_asym(jnp.asarray(xo), bits, (-2, -1)), (-2, -1)) <= 2 ** bits


def test_weights_per_output_channel():
    cfg = small_config()
    params = random_params(cfg.model, seed=3)
    params["layers"]["attn"]["q"]["kernel"][:, :, 0, 0] *= 1000.0  # one loud output channel
    qp = quant.quantize_weights(params, 4)
    for name, axes in (("q", (1,)), ("k", (1,)), ("o", (1, 2))):
        w, wq = params["layers"]["attn"][name]["kernel"], np.asarray(qp["layers"]["attn"][name]["kernel"])
        assert quant.weight_in_axes(("layers", "attn", name, "kernel"), w.ndim) == axes
        assert levels(wq, axes) <= 16
        assert not np.array_equal(wq, w)
    for name in ("gate", "up", "down"):
        assert levels(qp["layers"]["mlp"][name]["kernel"], (1,)) <= 16
    assert levels(qp["lm_head"]["kernel"], (0,)) <= 16
    # The loud channel does not crush its neighbours: they keep their own scales.
    w, wq = params["layers"]["attn"]["q"]["kernel"], np.asarray(qp["layers"]["attn"]["q"]["kernel"])
    rel = np.abs(wq[:, :, 1:] - w[:, :, 1:]).max() / np.abs(w[:, :, 1:]).max()
    assert rel < 0.1
    # Not quantised: the embedding lookup and the norm scales.
    assert qp["embed"]["embedding"] is params["embed"]["embedding"]
    assert qp["final_norm"]["scale"] is params["final_norm"]["scale"]
    # Unscanned layers have no leading layers axis.
    assert quant.weight_in_axes(("layers_0", "attn", "o", "kernel"), 3) == (0, 1)
    assert quant.weight_in_axes(("layers_0", "mlp", "down", "kernel"), 2) == (0,)
    assert quant.weight_in_axes(("embed", "embedding"), 2) is None


def test_kv_groups_of_128():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 2, 256)).astype(np.float32)
    x[..., 128:] *= 3.0  # the two groups have different ranges
    q = np.asarray(quant.quantize_kv(jnp.asarray(x), 4))
    groups = q.reshape(2, 5, 2, 2, 128)
    assert levels(groups, (-1,)) <= 16
    assert levels(q, (-1,)) > 16  # a whole head_dim row spans two groups' levels
    small = rng.standard_normal((2, 5, 2, 64)).astype(np.float32)  # head_dim < 128: one group
    assert levels(quant.quantize_kv(jnp.asarray(small), 3), (-1,)) <= 8
    with pytest.raises(ValueError, match="head_dim 192"):
        quant.quantize_kv(jnp.zeros((1, 1, 1, 192)), 4)


def test_mse_clip_search_never_increases_error():
    w = np.random.default_rng(5).standard_t(2.5, size=(2, 64, 48)).astype(np.float32)  # heavy tails
    for bits in (3, 4):
        plain = np.asarray(quant.quantize_weight(jnp.asarray(w), bits, 1))
        searched = np.asarray(quant.quantize_weight(jnp.asarray(w), bits, 1, clip_search=True))
        err_plain = ((plain - w) ** 2).sum(1)
        err_search = ((searched - w) ** 2).sum(1)
        assert np.all(err_search <= err_plain * (1 + 1e-6))
        assert err_search.sum() < 0.95 * err_plain.sum()
        assert levels(searched, (1,)) <= 2 ** bits


@pytest.mark.parametrize("text,ok", [("4,4,4", (4, 4, 4)), ("4, 8, 16", (4, 8, 16)), ("2,16,2", (2, 16, 2)),
                                     ("4,4", None), ("1,4,4", None), ("4,17,4", None), ("a,b,c", None),
                                     ("4.5,4,4", None), ("", None)])
def test_parse_bits(text, ok):
    if ok:
        assert quant.parse_bits(text) == ok
    else:
        with pytest.raises(ValueError, match="expected three integers"):
            quant.parse_bits(text)
    with pytest.raises(ValueError, match="2..16"):
        quant.QuantSpec(a_bits=1)


# ------------------------------------------------------------------------------------------ Hadamard

@pytest.mark.parametrize("n", [1, 2, 64, 48, 172, 352])
def test_hadamard_orthonormal_and_fast_transform_matches(n):
    h = quant.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-10)
    if n & (n - 1) == 0:  # a power of two: a true (Sylvester) Hadamard matrix
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)
    x = np.random.default_rng(n).standard_normal((3, 4, n)).astype(np.float32)
    np.testing.assert_allclose(quant.hadamard_transform(jnp.asarray(x)), x @ h, atol=1e-4)
    np.testing.assert_allclose(quant.hadamard_transform(x.astype(np.float64), axis=-1), x @ h, atol=1e-10)


# ------------------------------------------------------------------------------------------ the model

@functools.lru_cache(maxsize=None)
def _apply(model_json, spec):
    import json
    import ml_collections
    model = Transformer(ml_collections.ConfigDict(json.loads(model_json)), quant=spec)
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def logits(model_cfg, params, tokens, spec=None):
    import json
    return np.asarray(_apply(json.dumps(model_cfg.to_dict(), sort_keys=True), spec)(params, tokens))


@pytest.fixture(scope="module")
def small():
    cfg = small_config(ffn_dim=48)  # 48 = 16 x 3: the Kronecker (non power of two) Hadamard
    params = random_params(cfg.model, seed=6, std=0.2)
    tokens = np.random.default_rng(7).integers(0, cfg.model.vocab_size, (2, 16)).astype(np.int32)
    return cfg.model, params, tokens, logits(cfg.model, params, tokens)


def test_bits_16_model_equals_unquantised(small):
    model_cfg, params, tokens, base = small
    folded, plain_cfg = quant.fold_embproj(params, model_cfg)
    assert "embed_proj" not in folded and not plain_cfg.embed_proj and not plain_cfg.tie_embeddings
    assert model_cfg.embed_proj  # the caller's config is left alone
    qp = quant.quantize_weights(folded, 16)
    out = logits(plain_cfg, qp, tokens, quant.QuantSpec(a_bits=16, kv_bits=16))
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())


def test_ffn_rotation_leaves_logits_unchanged_and_4_bits_changes_them(small):
    model_cfg, params, tokens, base = small
    folded, plain_cfg = quant.fold_embproj(params, model_cfg)
    rotated = quant.rotate_ffn(folded)
    assert not np.allclose(rotated["layers"]["mlp"]["down"]["kernel"], folded["layers"]["mlp"]["down"]["kernel"])
    out = logits(plain_cfg, rotated, tokens, quant.QuantSpec(hadamard_ffn=True))
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
    q4 = logits(plain_cfg, quant.quantize_weights(rotated, 4), tokens,
                quant.QuantSpec(a_bits=4, kv_bits=4, hadamard_ffn=True))
    rel = np.abs(q4 - base).max() / np.abs(base).max()
    assert 1e-3 < rel < 0.5


def test_fold_unties_a_tied_head():
    cfg = small_config(tie_embeddings=True, embed_proj=True)
    params = random_params(cfg.model, seed=8, std=0.2)
    tokens = np.random.default_rng(9).integers(0, cfg.model.vocab_size, (2, 16)).astype(np.int32)
    folded, plain_cfg = quant.fold_embproj(params, cfg.model)
    assert folded["lm_head"]["kernel"].shape == (cfg.model.dim, cfg.model.vocab_size)
    out = logits(plain_cfg, folded, tokens, quant.QuantSpec())
    base = logits(cfg.model, params, tokens)
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())


def test_qk_head_rotation_cancels_in_the_scores_but_not_under_kv_quantisation(small):
    """QuantSpec.rotate_qk_heads rotates queries and keys alike (q.k unchanged: same logits at 16 bits);
    with 4-bit keys it is the rotated keys that are quantised, so the logits then differ."""
    model_cfg, params, tokens, base = small
    out = logits(model_cfg, params, tokens, quant.QuantSpec(rotate_qk_heads=True))
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
    plain = logits(model_cfg, params, tokens, quant.QuantSpec(kv_bits=4))
    rotated = logits(model_cfg, params, tokens, quant.QuantSpec(kv_bits=4, rotate_qk_heads=True))
    assert not np.allclose(plain, rotated, rtol=1e-4, atol=1e-4 * np.abs(base).max())
