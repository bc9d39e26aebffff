"""The OSP transformer: shapes, SSNorm, EmbProj, tying, hidden states, a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from osp_jax import attention, model as model_lib
from tests.helpers import load_recipe, small_config


def _init(cfg, batch=2, seq=16, seed=0):
    mdl = model_lib.Transformer(cfg.model)
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.model.vocab_size)
    params = nn.unbox(mdl.init(jax.random.key(1), tokens)["params"])
    return mdl, params, tokens


def test_output_and_hidden_shapes():
    cfg = small_config()
    mdl, params, tokens = _init(cfg)
    logits = mdl.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    logits2, hidden = mdl.apply({"params": params}, tokens, return_hidden=True)
    assert hidden.shape == (cfg.model.layers + 1, 2, 16, cfg.model.dim)
    np.testing.assert_allclose(logits, logits2, rtol=1e-6)


def test_ssnorm_scalars_and_channel_vectors():
    _, single, _ = _init(small_config(norm_scale="single"))
    assert single["final_norm"]["scale"].shape == ()
    assert single["layers"]["attn_norm"]["scale"].shape == (2,)  # one scalar per layer (scanned)
    assert single["layers"]["mlp_norm"]["scale"].shape == (2,)
    _, channel, _ = _init(small_config(norm_scale="channel"))
    assert channel["final_norm"]["scale"].shape == (32,)
    assert channel["layers"]["attn_norm"]["scale"].shape == (2, 32)


def test_embed_proj_orthogonal_at_init():
    _, params, _ = _init(small_config(embed_proj=True))
    for name in ("embed_proj", "head_proj"):
        w = np.asarray(params[name]["kernel"], np.float64)
        np.testing.assert_allclose(w.T @ w, np.eye(32), atol=1e-5)
    _, plain, _ = _init(small_config(embed_proj=False))
    assert "embed_proj" not in plain and "head_proj" not in plain


def test_bfloat16_parameters_with_embed_proj_initialise_orthogonal():
    """EmbProj's orthogonal init runs its QR in float32 (there is no bfloat16 kernel), then casts."""
    mdl, params, _ = _init(small_config(param_dtype="bfloat16", dtype="bfloat16"))
    w = params["embed_proj"]["kernel"]
    assert w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(w, np.float32) @ np.asarray(w, np.float32).T, np.eye(w.shape[0]), atol=3e-2)


def test_tied_embeddings_share_one_matrix():
    cfg = small_config(tie_embeddings=True, embed_proj=False)
    mdl, params, tokens = _init(cfg)
    assert "lm_head" not in params
    h = np.asarray(params["embed"]["embedding"])
    # Changing the embedding table changes the output head too: one matrix, two uses.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["embed"]["embedding"] = params["embed"]["embedding"].at[5].add(1.0)
    base = mdl.apply({"params": params}, tokens)
    out = mdl.apply({"params": bumped}, tokens)
    assert not np.allclose(base[..., 5], out[..., 5])
    assert h.shape == (64, 32)


def test_logical_axes_on_every_parameter():
    boxed = model_lib.abstract_params(small_config().model)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    q = boxed["layers"]["attn"]["q"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "head_dim")


def test_scan_equals_loop():
    cfg = small_config()
    mdl, params, tokens = _init(cfg)
    cfg_loop = small_config()
    cfg_loop.model.scan_layers = False
    loop = model_lib.Transformer(cfg_loop.model)
    loop_params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.model.layers):
        loop_params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    np.testing.assert_allclose(mdl.apply({"params": params}, tokens),
                               loop.apply({"params": loop_params}, tokens), rtol=1e-5, atol=1e-5)


def test_remat_does_not_change_values():
    cfg = small_config()
    mdl, params, tokens = _init(cfg)
    cfg_r = small_config(remat="full")
    grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, tokens).mean())(params)
    g1, g2 = grad(mdl), grad(model_lib.Transformer(cfg_r.model))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def _reference_forward(params, tokens, c):
    """The model written again in float64 NumPy, straight from the paper's description."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    hd = c.dim // c.heads

    def norm(x, scale):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * scale

    def rope(x):
        s = x.shape[1]
        half = hd // 2
        inv = c.rope_theta ** (-np.arange(half) / half)
        ang = np.arange(s)[:, None] * inv
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p["embed"]["embedding"][tokens]
    if c.embed_proj:
        x = x @ p["embed_proj"]["kernel"]
    s = tokens.shape[1]
    mask = np.tril(np.ones((s, s), bool))
    for i in range(c.layers):
        lp = jax.tree.map(lambda a: a[i], p["layers"])
        h = norm(x, lp["attn_norm"]["scale"])
        q = rope(np.einsum("bsd,dhk->bshk", h, lp["attn"]["q"]["kernel"]))
        k = rope(np.einsum("bsd,dhk->bshk", h, lp["attn"]["k"]["kernel"]))
        v = np.einsum("bsd,dhk->bshk", h, lp["attn"]["v"]["kernel"])
        rep = c.heads // c.kv_heads
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd)
        logits = np.where(mask, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", w, v)
        x = x + np.einsum("bshk,hkd->bsd", o, lp["attn"]["o"]["kernel"])
        h = norm(x, lp["mlp_norm"]["scale"])
        g = h @ lp["mlp"]["gate"]["kernel"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"]["kernel"]
    x = norm(x, p["final_norm"]["scale"])
    if c.embed_proj:
        x = x @ p["head_proj"]["kernel"]
    head = p["embed"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("norm_scale,embed_proj,tie", [("single", True, False), ("channel", False, True)])
def test_matches_float64_reference(norm_scale, embed_proj, tie):
    cfg = small_config(norm_scale=norm_scale, embed_proj=embed_proj, tie_embeddings=tie)
    mdl, params, tokens = _init(cfg)
    # Non-trivial norm scales so a wrong broadcast would show.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 if str(path[-1]) == "['scale']" else x, params)
    ref = _reference_forward(params, np.asarray(tokens), cfg.model)
    np.testing.assert_allclose(mdl.apply({"params": params}, tokens), ref, rtol=2e-4, atol=2e-4)


def test_segment_ids_keep_attention_within_documents():
    cfg = small_config()
    mdl, params, tokens = _init(cfg, batch=1)
    seg = jnp.array([[1] * 8 + [2] * 8])
    pos = jnp.array([list(range(8)) * 2])
    packed = mdl.apply({"params": params}, tokens, positions=pos, segment_ids=seg)
    second_alone = mdl.apply({"params": params}, tokens[:, 8:])
    np.testing.assert_allclose(packed[:, 8:], second_alone, rtol=1e-5, atol=1e-5)


def test_attention_backend_choice():
    assert attention.pick_backend("auto", "tpu") == "splash"
    assert attention.pick_backend("auto", "gpu") == "cudnn"
    assert attention.pick_backend("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="flash"):
        attention.pick_backend("flash")


def test_1b4_builds_abstractly_with_1_42b_parameters():
    cfg = load_recipe("osp_1b4")
    n = model_lib.count_params(model_lib.abstract_params(cfg.model))
    assert 1.40e9 < n < 1.44e9, n
    assert f"{n / 1e6:.2f} M parameters" in model_lib.summary(cfg.model, cfg.train.seq_len)


def test_chunked_loss_equals_full_loss_and_gradient():
    import optax
    from osp_jax.model import Transformer

    cfg = small_config()
    mdl, params, tokens = _init(cfg, seq=16)
    targets = jnp.roll(tokens, -1, axis=1)
    cfg_c = small_config(loss_chunk=4)
    chunked = Transformer(cfg_c.model)

    def full(p):
        logits = mdl.apply({"params": p}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def by_chunks(p):
        return chunked.apply({"params": p}, tokens, targets=targets).mean()

    np.testing.assert_allclose(full(params), by_chunks(params), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.grad(full)(params), jax.grad(by_chunks)(params))


@pytest.mark.parametrize("tie,chunk,dtype", [(False, 0, "float32"), (False, 4, "float32"), (True, 4, "float32"),
                                             (False, 8, "bfloat16")])
def test_fused_loss_equals_the_weighted_loss_and_its_gradient(tie, chunk, dtype):
    """model.loss_fused forms the head's gradients in the forward pass, chunk by chunk; value, token
    losses and every parameter's gradient equal autodiff's through the ordinary loss (padding
    weighted 0, so the weights are not uniform)."""
    plain = small_config(tie_embeddings=tie, loss_chunk=chunk, dtype=dtype)
    mdl, params, tokens = _init(plain, seq=16)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones(tokens.shape).at[0, 11:].set(0.0)
    weights = mask / mask.sum()
    fused = model_lib.Transformer(small_config(tie_embeddings=tie, loss_chunk=chunk, dtype=dtype, loss_fused=True).model)

    def loss(m):
        return lambda p: m.apply({"params": p}, tokens, targets=targets, loss_weights=weights)

    (want, want_tokens), want_grads = jax.value_and_grad(loss(mdl), has_aux=True)(params)
    (got, got_tokens), got_grads = jax.value_and_grad(loss(fused), has_aux=True)(params)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == "float32" else dict(rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(got_tokens, want_tokens, **tol)
    np.testing.assert_allclose(got, (want_tokens * weights).sum(), **tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), got_grads, want_grads)
    head = "embed" if tie else "lm_head"
    assert np.abs(np.asarray(got_grads[head][list(got_grads[head])[0]])).max() > 0


def test_dots_attn_norms_keeps_the_norms_and_the_rotated_queries_and_keys():
    """`dots_attn_norms` keeps each layer's two norm outputs and inverse RMS and its rotated q and k
    (which `dots_attn` computes again in the backward pass), and the gradients do not change."""
    from jax._src.ad_checkpoint import saved_residuals

    def named(remat):
        cfg = small_config(remat=remat, layers=1, scan_layers=False)
        mdl, params, tokens = _init(cfg)
        loss = lambda p: mdl.apply({"params": p}, tokens).mean()
        names = sorted(why.split("'")[1] for _, why in saved_residuals(loss, params) if why.startswith("named '"))
        return names, jax.grad(loss)(params)

    kept, grads = named("dots_attn_norms")
    # norm_rms three times: the layer's two norms and the final norm, which is outside the remat'd layer
    assert kept == ["norm_out", "norm_out", "norm_rms", "norm_rms", "norm_rms", "qk_rope", "qk_rope"]
    assert named("dots_attn")[0] == ["norm_rms"]
    _, plain = named("none")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), grads, plain)
