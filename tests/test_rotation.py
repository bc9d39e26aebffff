"""QuaRot-style rotation: the random Hadamard matrix, the weight folding against a float64 NumPy
reference, and the rotated model's logits against the unrotated model's at 16 bits."""
import itertools

import numpy as np
import pytest

from osp_jax import ptq, quant, rotation
from tests.helpers import small_config
from tests.test_quant import logits, random_params


def sylvester(n):
    """Unnormalised Sylvester-Hadamard matrix of size n (a power of two), built independently of quant."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def with_random_gains(params, seed):
    """Norm gains away from 1 (per channel or one scalar a layer), so that folding them matters."""
    rng = np.random.default_rng(seed)
    out = {k: v for k, v in params.items()}
    out["layers"] = {k: v for k, v in params["layers"].items()}
    for name in ("attn_norm", "mlp_norm"):
        s = params["layers"][name]["scale"]
        out["layers"][name] = {"scale": rng.uniform(0.5, 1.5, s.shape).astype(np.float32)}
    s = params["final_norm"]["scale"]
    out["final_norm"] = {"scale": rng.uniform(0.5, 1.5, np.shape(s)).astype(np.float32)}
    return out


@pytest.mark.parametrize("n", [8, 32, 48, 96])
def test_random_hadamard_is_orthonormal_signed_hadamard(n):
    q = rotation.random_hadamard(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    signs = np.sign(q[:, 0] * quant.hadamard_matrix(n)[:, 0])
    np.testing.assert_array_equal(q, signs[:, None] * quant.hadamard_matrix(n))  # rows of H, each signed
    assert {-1.0, 1.0} <= set(signs)
    assert not np.array_equal(q, rotation.random_hadamard(n, seed=4))
    if n & (n - 1) == 0:
        np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(n), rtol=1e-12)


@pytest.mark.parametrize("norm_scale", ["single", "channel"])
def test_folding_matches_numpy_reference(norm_scale):
    """Every leaf of rotation.rotate against dense float64 products written out here: E Q; Q^T diag(g) W for
    q/k/v, gate/up and the head; per-head Hd on v and Hd^T on o, then o and down times Q."""
    cfg = small_config(norm_scale=norm_scale, embed_proj=False, tie_embeddings=False)
    c = cfg.model
    params = with_random_gains(random_params(c, seed=1, std=0.2), seed=2)
    out = rotation.rotate(params, seed=5)
    q = rotation.random_hadamard(c.dim, seed=5)
    hd = sylvester(c.dim // c.heads) / np.sqrt(c.dim // c.heads)  # head_dim 8: a power of two
    f64 = lambda x: np.asarray(x, np.float64)
    check = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    check(out["embed"]["embedding"], f64(params["embed"]["embedding"]) @ q)
    g = f64(params["final_norm"]["scale"]) * np.ones(c.dim)
    check(out["lm_head"]["kernel"], q.T @ np.diag(g) @ f64(params["lm_head"]["kernel"]))
    assert np.all(np.asarray(out["final_norm"]["scale"]) == 1)
    for i in range(c.layers):
        lp, lo = params["layers"], out["layers"]
        g_attn = f64(lp["attn_norm"]["scale"][i]) * np.ones(c.dim)
        g_mlp = f64(lp["mlp_norm"]["scale"][i]) * np.ones(c.dim)
        for name in ("q", "k"):
            w = f64(lp["attn"][name]["kernel"][i]).reshape(c.dim, -1)
            check(np.asarray(lo["attn"][name]["kernel"][i]).reshape(c.dim, -1), q.T @ np.diag(g_attn) @ w)
        v = f64(lp["attn"]["v"]["kernel"][i])  # (dim, kv_heads, head_dim)
        want_v = np.stack([q.T @ np.diag(g_attn) @ v[:, h, :] @ hd for h in range(c.kv_heads)], axis=1)
        check(lo["attn"]["v"]["kernel"][i], want_v)
        o = f64(lp["attn"]["o"]["kernel"][i])  # (heads, head_dim, dim)
        want_o = np.stack([hd.T @ o[h] @ q for h in range(c.heads)])
        check(lo["attn"]["o"]["kernel"][i], want_o)
        for name in ("gate", "up"):
            check(lo["mlp"][name]["kernel"][i], q.T @ np.diag(g_mlp) @ f64(lp["mlp"][name]["kernel"][i]))
        check(lo["mlp"]["down"]["kernel"][i], f64(lp["mlp"]["down"]["kernel"][i]) @ q)
        for name in ("attn_norm", "mlp_norm"):
            assert np.all(np.asarray(lo[name]["scale"][i]) == 1)
    # The caller's tree is left alone.
    assert not np.array_equal(params["final_norm"]["scale"], out["final_norm"]["scale"])


def test_unrolled_layers_fold_like_the_scanned_stack():
    cfg = small_config(norm_scale="channel", scan_layers=False)
    params = random_params(cfg.model, seed=3, std=0.2)
    for i in range(cfg.model.layers):
        params[f"layers_{i}"]["attn_norm"]["scale"] = np.linspace(0.5, 1.5, cfg.model.dim).astype(np.float32)
    folded, _ = quant.fold_embproj(params, cfg.model)
    out = rotation.rotate(folded)
    w = np.asarray(folded["layers_1"]["mlp"]["gate"]["kernel"], np.float64)
    g = np.asarray(folded["layers_1"]["mlp_norm"]["scale"], np.float64)
    q = rotation.random_hadamard(cfg.model.dim)
    np.testing.assert_allclose(out["layers_1"]["mlp"]["gate"]["kernel"], q.T @ (g[:, None] * w), rtol=1e-5, atol=1e-6)
    w = np.asarray(folded["layers_0"]["attn"]["q"]["kernel"], np.float64).reshape(cfg.model.dim, -1)
    g = np.asarray(params["layers_0"]["attn_norm"]["scale"], np.float64)
    np.testing.assert_allclose(np.asarray(out["layers_0"]["attn"]["q"]["kernel"]).reshape(cfg.model.dim, -1),
                               q.T @ (g[:, None] * w), rtol=1e-5, atol=1e-6)


def test_rotate_wants_the_folded_plain_llama():
    cfg = small_config(embed_proj=True)
    with pytest.raises(ValueError, match="fold_embproj"):
        rotation.rotate(random_params(cfg.model))


COMBOS = list(itertools.product(("single", "channel"), (False, True), (2, 4), (False, True)))


@pytest.mark.slow
@pytest.mark.parametrize("norm_scale,embed_proj,kv_heads,tied", COMBOS)
def test_rotated_model_gives_the_same_logits(norm_scale, embed_proj, kv_heads, tied):
    """quarot at 16 bits: norms folded, residual stream, values and (online) queries/keys and FFN hidden
    state rotated; logits within 1e-4 of the unrotated model's (4 heads: kv_heads 2 is GQA)."""
    _check_rotated_logits(norm_scale=norm_scale, embed_proj=embed_proj, kv_heads=kv_heads, tie_embeddings=tied)


def test_rotated_model_gives_the_same_logits_osp_gqa_tied():
    """The fast member of the product above: SSNorm, EmbProj, GQA and a tied head at once."""
    _check_rotated_logits(norm_scale="single", embed_proj=True, kv_heads=2, tie_embeddings=True)


def _check_rotated_logits(**model):
    cfg = small_config(ffn_dim=48, **model)  # 48 = 16 x 3: the Kronecker Hadamard in the FFN; dim 32
    params = with_random_gains(random_params(cfg.model, seed=6, std=0.2), seed=7)
    tokens = np.random.default_rng(8).integers(0, cfg.model.vocab_size, (2, 16)).astype(np.int32)
    base = logits(cfg.model, params, tokens)
    q = ptq.quantize_model(params, cfg.model, quant.Bits(16, 16, 16), method="quarot")
    assert q.spec.rotate_qk_heads and q.spec.hadamard_ffn
    out = logits(q.model_config, q.params, tokens, q.spec)
    np.testing.assert_allclose(out, base, rtol=1e-4, atol=1e-4 * np.abs(base).max())
    # The rotation did something: the weights differ from the plain fold's.
    plain, _ = quant.fold_embproj(params, cfg.model)
    assert not np.allclose(q.params["layers"]["attn"]["q"]["kernel"], plain["layers"]["attn"]["q"]["kernel"])


def test_rotation_spreads_an_outlier_channel_so_4_bit_activations_cost_less():
    """What the rotation is for: a residual stream with one loud channel (as Adam-trained models grow),
    normed and fed to a linear layer. With 4-bit per-token activations the rotated stream (x Q, kernel
    Q^T diag(g) W, as rotate_residual and fold_norms write them) loses less than half of what round-to-nearest does."""
    rng = np.random.default_rng(11)
    dim, out = 128, 64
    x = rng.standard_normal((256, dim))
    x[:, 3] *= 40.0
    g = rng.uniform(0.5, 1.5, dim)
    w = rng.standard_normal((dim, out)) / np.sqrt(dim)
    norm = lambda t: t / np.sqrt(np.mean(t ** 2, axis=-1, keepdims=True) + 1e-5)
    a4 = lambda t: np.asarray(quant.fake_quant_asym(t.astype(np.float32), 4), np.float64)
    ref = norm(x) * g @ w
    q = rotation.random_hadamard(dim, seed=0)
    rtn = a4(norm(x) * g) @ w
    rotated = a4(norm(x @ q)) @ (q.T @ (g[:, None] * w))
    np.testing.assert_allclose(norm(x @ q) @ (q.T @ (g[:, None] * w)), ref, atol=1e-9)  # exact unquantised
    err = lambda y: np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err(rotated) < 0.5 * err(rtn), (err(rotated), err(rtn))  # 0.070 against 0.168
