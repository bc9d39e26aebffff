"""Attention backends against the plain XLA reference, and the reference against float64 NumPy.

cuDNN needs a GPU (skipped elsewhere). Splash is a Pallas TPU kernel: here it runs in Pallas'
interpreter on CPU (`interpret=True`), which checks the kernel's arguments, masks, GQA/MQA handling
and the shard_map wrapping, though not TPU speed or TPU lowering.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, Mesh

from osp_jax import attention as attn
from osp_jax import sharding


def _qkv(batch, seq, heads, kv_heads, head_dim, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim))
    k = rng.standard_normal((batch, seq, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq, kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _segments(batch, seq, docs=3, seed=1):
    """Packed windows: sorted document ids, so every query sees at least itself."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, docs, (batch, seq)), axis=1), jnp.int32)


def _numpy_reference(q, k, v, segment_ids=None):
    """Causal softmax attention in float64, GQA by repeating each key/value head over its query group."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    group = h // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(d)
    mask = np.tril(np.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        mask = mask & (ids[:, None, :, None] == ids[:, None, None, :])
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshd->bqhd", probs, v)


# ------------------------------------------------------------------------------------------------
# XLA reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,segments", [(4, 4, False), (4, 4, True), (4, 2, False),
                                                     (4, 2, True), (4, 1, True)])
def test_xla_attention_matches_float64(heads, kv_heads, segments):
    q, k, v = _qkv(2, 32, heads, kv_heads, 16)
    ids = _segments(2, 32) if segments else None
    out = attn.xla_attention(q, k, v, ids)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, ids), atol=2e-5, rtol=2e-5)


def test_xla_attention_is_causal_and_respects_documents():
    q, k, v = _qkv(1, 16, 2, 2, 8)
    base = attn.xla_attention(q, k, v)
    # Changing the last position's key/value leaves every earlier output unchanged.
    k2, v2 = k.at[:, -1].set(7.0), v.at[:, -1].set(-7.0)
    np.testing.assert_array_equal(np.asarray(attn.xla_attention(q, k2, v2))[:, :-1], np.asarray(base)[:, :-1])
    # With two documents, the second starts afresh: its first token attends only to itself.
    ids = jnp.asarray([[0] * 8 + [1] * 8], jnp.int32)
    out = np.asarray(attn.xla_attention(q, k, v, ids))
    np.testing.assert_allclose(out[:, 8], np.asarray(v)[:, 8], atol=1e-6)
    np.testing.assert_allclose(out[:, :8], np.asarray(attn.xla_attention(q[:, :8], k[:, :8], v[:, :8])),
                               atol=1e-6)


def test_xla_attention_bfloat16_close_to_float64():
    q, k, v = _qkv(2, 64, 4, 2, 32, dtype=jnp.bfloat16)
    out = attn.xla_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), _numpy_reference(q, k, v), atol=3e-2)


def test_pick_backend_and_dispatch():
    assert attn.pick_backend("auto", "cpu") == "xla"
    assert attn.pick_backend("auto", "gpu") == "cudnn"
    assert attn.pick_backend("auto", "tpu") == "splash"
    assert attn.pick_backend("splash", "cpu") == "splash"
    with pytest.raises(ValueError, match="flash"):
        attn.pick_backend("flash")
    # cuDNN takes half precision only: a float32 model (configs/tiny.py) on a GPU gets XLA's attention
    assert attn.pick_backend("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert attn.pick_backend("auto", "gpu", jnp.float16) == "cudnn"
    assert attn.pick_backend("auto", "gpu", jnp.float32) == "xla"
    assert attn.pick_backend("auto", "tpu", jnp.float32) == "splash"
    q, k, v = _qkv(1, 16, 2, 2, 8)
    np.testing.assert_array_equal(np.asarray(attn.attention(q, k, v, backend="xla")),
                                  np.asarray(attn.xla_attention(q, k, v)))


# ------------------------------------------------------------------------------------------------
# cuDNN (GPU only)
# ------------------------------------------------------------------------------------------------


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_matches_xla(segments):
    if not _has_gpu():
        pytest.skip("cuDNN attention needs a GPU; none present")
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(x, gpu) for x in _qkv(2, 256, 8, 2, 128, dtype=jnp.bfloat16))
    ids = jax.device_put(_segments(2, 256), gpu) if segments else None
    out = jax.jit(attn.cudnn_attention)(q, k, v, ids)
    ref = attn.xla_attention(q, k, v, ids)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_gradients_match_xla(segments):
    if not _has_gpu():
        pytest.skip("cuDNN attention needs a GPU; none present")
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(x, gpu) for x in _qkv(2, 256, 8, 2, 128, seed=3, dtype=jnp.bfloat16))
    ids = jax.device_put(_segments(2, 256), gpu) if segments else None
    cot = jax.device_put(jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.bfloat16), gpu)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, ids).astype(jnp.float32) * cot.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(attn.cudnn_attention), grads(attn.xla_attention)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_call_masks_like_the_reference(segments):
    """The cuDNN path's arguments (kernel-causal + document mask), run by XLA so any machine checks them."""
    q, k, v = _qkv(2, 64, 4, 2, 32)
    ids = _segments(2, 64) if segments else None
    out = attn.cudnn_attention(q, k, v, ids, implementation="xla")
    np.testing.assert_allclose(out, attn.xla_attention(q, k, v, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# cuDNN packed (ragged) layout: the segment description on any machine, the kernel on a GPU
# ------------------------------------------------------------------------------------------------


def _numpy_packed_segments(ids, max_segments):
    """Loop reference: segments are runs of equal ids; lengths and starts, -1 past the last."""
    ids = np.asarray(ids)
    b = ids.shape[0]
    seqlen = np.full((b, max_segments), -1, np.int32)
    offsets = np.full((b, max_segments + 1), -1, np.int32)
    count = np.zeros(b, np.int32)
    for r, row in enumerate(ids):
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]]
        ends = starts[1:] + [len(row)]
        count[r] = len(starts)
        for m, (start, end) in enumerate(zip(starts[:max_segments], ends)):
            seqlen[r, m], offsets[r, m] = end - start, start
    return seqlen, offsets, count


def _padded_documents(batch, seq, docs=5, seed=1):
    """Packed windows as the data pipeline makes them: ids 1, 2, ... per document, 0 = trailing padding;
    row 0 is a single document filling the window."""
    rng = np.random.default_rng(seed)
    rows = [np.ones(seq, np.int32)]
    for _ in range(batch - 1):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=rng.integers(1, docs), replace=False))
        row = np.zeros(seq, np.int32)
        for i, (start, end) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq])):
            row[start:end] = i + 1
        row[seq - rng.integers(0, seq // 4):] = 0  # trailing padding (possibly none)
        rows.append(row)
    return jnp.asarray(np.stack(rows))


@pytest.mark.parametrize("max_segments", [1, 3, 8])
def test_packed_segments_matches_numpy(max_segments):
    ids = jnp.concatenate([_padded_documents(6, 64), _segments(2, 64)])  # _segments: ids from 0, no padding
    seqlen, offsets, count = jax.jit(attn.packed_segments, static_argnums=1)(ids, max_segments)
    assert seqlen.shape == (8, max_segments) and offsets.shape == (8, max_segments + 1) and count.shape == (8,)
    assert seqlen.dtype == offsets.dtype == count.dtype == jnp.int32
    want = _numpy_packed_segments(ids, max_segments)
    for got, ref in zip((seqlen, offsets, count), want):
        np.testing.assert_array_equal(np.asarray(got), ref)
    assert int(count[0]) == 1 and np.asarray(seqlen)[0, 0] == 64 and np.all(np.asarray(offsets)[:, -1] == -1)
    # Rows that fit: their segments tile the window exactly.
    fits = np.asarray(count) <= max_segments
    np.testing.assert_array_equal(np.where(np.asarray(seqlen) > 0, np.asarray(seqlen), 0).sum(1)[fits], 64)


def test_packed_segments_example_from_the_jax_docstring():
    """The offsets of jax's docstring: rows of 3 and 2 segments start at [0, 1, 2, -1] and [0, 1, -1, -1]."""
    seqlen, offsets, count = attn.packed_segments(jnp.asarray([[1, 2, 3], [1, 2, 2]], jnp.int32), 3)
    np.testing.assert_array_equal(np.asarray(seqlen), [[1, 1, 1], [1, 2, -1]])
    np.testing.assert_array_equal(np.asarray(offsets), [[0, 1, 2, -1], [0, 1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(count), [3, 2])


def test_cudnn_max_segments_keeps_the_xla_implementation_dense():
    """max_segments only changes the cuDNN kernel call; implementation="xla" stays the dense mask."""
    q, k, v = _qkv(2, 64, 4, 2, 32)
    ids = _padded_documents(2, 64)
    out = attn.cudnn_attention(q, k, v, ids, implementation="xla", max_segments=8)
    dense = attn.cudnn_attention(q, k, v, ids, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    np.testing.assert_array_equal(np.asarray(attn.attention(q, k, v, ids, backend="xla", max_segments=8)),
                                  np.asarray(attn.xla_attention(q, k, v, ids)))


def _skip_without_packed_layout():
    if not _has_gpu():
        pytest.skip("cuDNN attention needs a GPU; none present")
    if not attn._packed_layout_supported():
        pytest.skip("cuDNN's packed layout needs a Hopper GPU and cuDNN >= 9.6 (the dense mask runs instead)")


def _gpu_packed_case(kv_heads, docs, seed):
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(x, gpu) for x in _qkv(4, 256, 8, kv_heads, 128, seed=seed, dtype=jnp.bfloat16))
    return q, k, v, jax.device_put(_padded_documents(4, 256, docs=docs, seed=seed), gpu)


# docs=5: at most 4 documents + padding per row, within max_segments=8 (packed layout); docs=20: rows
# with more than 8 segments, so the batch falls back to the dense mask.
@pytest.mark.parametrize("kv_heads,docs", [(8, 5), (2, 5), (2, 20)], ids=["mha", "gqa", "gqa-fallback"])
def test_cudnn_packed_matches_xla(kv_heads, docs):
    _skip_without_packed_layout()
    q, k, v, ids = _gpu_packed_case(kv_heads, docs, seed=5)
    count = int(attn.packed_segments(ids, 8)[2].max())
    assert (count <= 8) == (docs == 5), count  # the case is the one its name says
    out = jax.jit(functools.partial(attn.cudnn_attention, max_segments=8))(q, k, v, ids)
    ref = attn.xla_attention(q, k, v, ids)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("kv_heads,docs", [(8, 5), (2, 5), (2, 20)], ids=["mha", "gqa", "gqa-fallback"])
def test_cudnn_packed_gradients_match_xla(kv_heads, docs):
    _skip_without_packed_layout()
    q, k, v, ids = _gpu_packed_case(kv_heads, docs, seed=6)
    cot = jax.device_put(jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32), q.device)
    packed = functools.partial(attn.cudnn_attention, max_segments=8)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, ids).astype(jnp.float32) * cot)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(packed), grads(attn.xla_attention)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(got))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


# ------------------------------------------------------------------------------------------------
# Splash (Pallas TPU kernel, in interpret mode on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,segments", [(2, 2, True), (4, 2, False), (4, 1, True)])
def test_splash_interpret_matches_xla(heads, kv_heads, segments):
    q, k, v = _qkv(2, 128, heads, kv_heads, 64)
    ids = _segments(2, 128) if segments else None
    out = attn.splash_attention(q, k, v, ids, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(attn.xla_attention(q, k, v, ids)), atol=2e-5)


def test_splash_interpret_gradients_match_xla():
    q, k, v = _qkv(1, 256, 2, 2, 128)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: attn.splash_attention(q, k, v, interpret=True))
    want = grads(attn.xla_attention)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_splash_interpret_under_a_mesh_runs_in_shard_map():
    """Mosaic kernels cannot be partitioned by XLA: under a mesh, splash must run inside shard_map."""
    devices = np.asarray(jax.devices()[:8]).reshape(1, 1, 8, 1)
    mesh = Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    q, k, v = _qkv(8, 128, 2, 1, 64)
    ids = _segments(8, 128)
    fn = jax.jit(lambda q, k, v, ids: attn.splash_attention(q, k, v, ids, interpret=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, ids))
        out = fn(q, k, v, ids)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(np.asarray(out), np.asarray(attn.xla_attention(q, k, v, ids)), atol=2e-5)


def test_splash_rejects_sequence_not_a_multiple_of_the_block():
    q, k, v = _qkv(1, 192, 2, 2, 64)
    with pytest.raises(ValueError, match="multiple of 128"):
        attn.splash_attention(q, k, v, interpret=True)


# ------------------------------------------------------------------------------------------------
# Remat policy `dots_attn`: the fused kernel's forward runs once, not again in the backward pass
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cudnn_traceable(monkeypatch):
    """Lets jax trace (not run) its cuDNN attention on a machine without cuDNN: the checks that ask
    the GPU for its cuDNN version and compute capability answer as a Hopper with cuDNN 9.10 would."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_is_flash_attention", "check_compute_capability"):
        if not hasattr(fa, name):
            pytest.skip(f"jax moved {name}; update this fixture")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_is_flash_attention", lambda *a, **k: None)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(attn, "_packed_layout_supported", lambda: True)


def test_float32_model_on_a_gpu_traces_with_auto_and_names_the_problem_with_cudnn(cudnn_traceable, monkeypatch):
    """`auto` on a GPU with a float32 model (the tiny config) traces XLA's attention, where it used to
    hand float32 to cuDNN and fail ("Unsupported dtype"); asking for cuDNN by name says what to change."""
    from osp_jax import model as model_lib
    from tests.helpers import small_config

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tokens, ids = jnp.zeros((2, 128), jnp.int32), _segments(2, 128)
    trace = lambda mdl, p: str(jax.make_jaxpr(lambda p: mdl.apply({"params": p}, tokens, segment_ids=ids))(p))
    for dtype, kernel in (("float32", False), ("bfloat16", True)):
        mdl = model_lib.Transformer(small_config(dtype=dtype, dim=128, heads=2, kv_heads=2).model)
        params = jax.eval_shape(lambda: nn.unbox(mdl.init(jax.random.key(0), tokens)["params"]))
        assert ("dot_product_attention" in trace(mdl, params)) == kernel
    q, k, v = _qkv(1, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="bfloat16 or float16 inputs, not float32"):
        attn.attention(q, k, v, backend="cudnn")


def _gradient_jaxpr(remat: str, backend: str, max_segments: int = 0) -> str:
    from osp_jax import model as model_lib
    from tests.helpers import small_config

    cfg = small_config(remat=remat, attention=backend, max_segments=max_segments, dtype="bfloat16",
                       dim=128, heads=2, kv_heads=2)
    mdl = model_lib.Transformer(cfg.model)
    tokens = jnp.zeros((2, 128), jnp.int32)
    ids = _segments(2, 128)
    params = jax.eval_shape(lambda: nn.unbox(mdl.init(jax.random.key(0), tokens)["params"]))
    loss = lambda p: mdl.apply({"params": p}, tokens, segment_ids=ids).mean()
    return str(jax.make_jaxpr(jax.grad(loss))(params))


# (backend, max_segments, the forward kernel's primitive, its calls in the traced gradient
# without remat: the scanned layer's body appears once; the packed cuDNN path's `lax.cond` holds two
# forward calls, one in each branch; splash has three kernels, forward, dq and dkv)
KERNELS = [("cudnn", 0, "dot_product_attention_fwd_wrapper", 1),
           ("cudnn", 4, "dot_product_attention_fwd_wrapper", 2),
           ("splash", 0, "pallas_call", 3)]


@pytest.mark.parametrize("backend,max_segments,primitive,calls", KERNELS)
def test_dots_attn_keeps_the_attention_kernels_outputs(cudnn_traceable, backend, max_segments, primitive,
                                                       calls):
    """Under `dots` the backward pass calls the forward kernel again (it is not a matmul, so its
    output and softmax statistics are not kept); under `dots_attn` it does not, as with no remat."""
    count = lambda remat: _gradient_jaxpr(remat, backend, max_segments).count(primitive)
    assert count("none") == calls
    assert count("dots_attn") == calls
    recomputed = 2 if max_segments else 1  # the forward kernel of each branch, called again
    assert count("dots") == calls + recomputed


def test_dots_attn_gradients_match_xla_with_splash_interpret():
    """The kept outputs feed the kernel's backward correctly (splash in Pallas' interpreter)."""
    from osp_jax.model import save_dots_and_attention

    q, k, v = _qkv(1, 256, 2, 2, 128)
    ids = _segments(1, 256)
    splash = jax.checkpoint(lambda q, k, v: attn.splash_attention(q, k, v, ids, interpret=True),
                            policy=save_dots_and_attention)
    loss = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(loss(splash), loss(lambda q, k, v: attn.xla_attention(q, k, v, ids))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_segments", [0, 16])
def test_cudnn_dots_attn_gradients_match_no_remat(max_segments):
    """On a GPU: the kept cuDNN outputs give the gradients the unremat'd kernel gives (the name of
    the test's -k filter, cudnn, puts it in gpu_suite.sh's check stage)."""
    if not _has_gpu():
        pytest.skip("cuDNN attention needs a GPU; none present")
    gpu = jax.devices("gpu")[0]
    q, k, v = (jax.device_put(x, gpu) for x in _qkv(2, 256, 8, 8, 128, seed=5, dtype=jnp.bfloat16))
    ids = jax.device_put(_segments(2, 256), gpu)
    from osp_jax.model import save_dots_and_attention

    fn = lambda q, k, v: attn.cudnn_attention(q, k, v, ids, max_segments=max_segments)
    grads = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2),
                                       argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads(jax.checkpoint(fn, policy=save_dots_and_attention)), grads(fn)):
        # not bitwise: cuDNN's backward may accumulate in another order from one call to the next
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
