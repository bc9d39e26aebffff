"""GPTQ: one matrix against a float64 NumPy reference, the layer-by-layer pass on a trained tiny model
(every linear layer's output error below round-to-nearest's), and evaluate's --method flags."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from osp_jax import evaluate as ev
from osp_jax import gptq, ptq, quant
from osp_jax.checkpoint import Checkpointer
from osp_jax.config import defaults, validate
from osp_jax.data import pipeline
from osp_jax.model import Transformer
from osp_jax.step import TrainState, cross_entropy
from tests.helpers import small_config
from tests.test_quant import random_params


# ------------------------------------------------------------------------------------------ reference

def gptq_reference(w, x, bits, act_order=False, percdamp=0.01):
    """GPTQ of w (in, out) for inputs x (tokens, in), written from the paper's Algorithm 1 in float64:
    one column at a time, no lazy blocks. Returns the quantised (in, out) kernel."""
    w = np.asarray(w, np.float64).T.copy()  # (out, in)
    h = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=1) / qmax  # RTN's per-output-channel grid, from the whole W
    scale[scale == 0] = 1.0
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = np.clip(np.round(w[:, i] / scale), -qmax, qmax) * scale
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    return q[:, np.argsort(perm)].T


def correlated_inputs(rng, tokens, n_in, dead=()):
    """Inputs with correlated features of unequal scale (where GPTQ's error feedback pays)."""
    x = rng.standard_normal((tokens, n_in)) @ rng.standard_normal((n_in, n_in)) * rng.uniform(0.2, 3, n_in)
    x[:, list(dead)] = 0.0
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_matrix_matches_float64_reference(act_order, bits):
    """40 inputs in blocks of 16 (two full blocks and a padded one), one input never seen: GPTQ in
    float64 (jax x64) gives the reference's kernel, and in float32 the same levels nearly everywhere."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((40, 24))
    x = correlated_inputs(rng, 200, 40, dead=(7,))
    h = x.T @ x
    want = gptq_reference(w, x, bits, act_order)
    with jax.enable_x64(True):
        got64 = gptq.quantize_matrix(w, h, bits, act_order=act_order, block_size=16, dtype=np.float64)
    np.testing.assert_allclose(got64, want, rtol=1e-9, atol=1e-12)
    got32 = gptq.quantize_matrix(w.astype(np.float32), h, bits, act_order=act_order, block_size=16)
    scale = np.abs(w).max(axis=0) / (2 ** (bits - 1) - 1)
    same = np.round(got32 / scale) == np.round(want / scale)
    assert same.mean() > 0.98, same.mean()
    assert np.all(got32[7] == 0)  # the dead input's weights
    assert len(np.unique(np.round(got32 / scale), axis=None)) <= 2 ** bits - 1


def test_block_size_does_not_change_the_result():
    """The lazy batch update is exact: any block size gives the one-column-at-a-time result."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8))
    x = correlated_inputs(rng, 300, 64)
    with jax.enable_x64(True):
        outs = [gptq.quantize_matrix(w, x.T @ x, 4, block_size=b, dtype=np.float64) for b in (1, 8, 64, 128)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_gptq_beats_rtn_on_the_objective_and_uses_its_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 32)).astype(np.float32)
    x = correlated_inputs(rng, 500, 96)
    h = x.T @ x
    scale = np.asarray(quant.weight_scale(jnp.asarray(w), 4, 0)).reshape(-1)
    rtn = np.asarray(quant.quantize_weight(jnp.asarray(w), 4, 0))
    for act_order in (False, True):
        q = gptq.quantize_matrix(w, h, 4, act_order=act_order)
        np.testing.assert_allclose(q / scale, np.round(q / scale), atol=1e-4)  # on RTN's grid
        assert gptq.output_error(w, q, h) < 0.8 * gptq.output_error(w, rtn, h)
    # With the clip search the grid is the searched one (never coarser than max|w|'s).
    clipped = np.asarray(quant.weight_scale(jnp.asarray(w), 4, 0, clip_search=True)).reshape(-1)
    q = gptq.quantize_matrix(w, h, 4, clip_search=True)
    np.testing.assert_allclose(q / clipped, np.round(q / clipped), atol=1e-4)
    assert np.all(clipped <= scale + 1e-7)


def test_output_error_is_the_squared_output_difference():
    rng = np.random.default_rng(2)
    w, q, x = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)), rng.standard_normal((10, 6))
    assert gptq.output_error(w, q, x.T @ x) == pytest.approx(np.sum((x @ w - x @ q) ** 2), rel=1e-12)


# ------------------------------------------------------------------------------------------ a trained model

SEQ, STEPS = 64, 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model (dim 64, 2 layers, GQA, SSNorm + EmbProj) trained with Adam for a few dozen steps on
    the built-in corpus's training split, saved as a run whose config.json names data.path=builtin."""
    c = defaults()
    c.model.update(vocab_size=4096, dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=176, dtype="float32",
                   remat="none", norm_scale="single", embed_proj=True)
    c.train.update(steps=STEPS, global_batch_size=8, seq_len=SEQ)
    c.data.path = "builtin"
    validate(c)
    data_dir = pipeline.resolve_data_dir("builtin")
    it = pipeline.make_iterator(data_dir, "train", seq_len=SEQ, global_batch_size=8, seed=1)
    batches = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(STEPS)]
    it.close()

    model = Transformer(c.model)
    params = jax.tree.map(jnp.asarray, random_params(c.model, seed=0))
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, b):
        loss_fn = lambda p: cross_entropy(model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"]),
                                          b["targets"])
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for b in batches:
        params, opt_state, loss = step(params, opt_state, b)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses  # it learned something

    workdir = tmp_path_factory.mktemp("gptq") / "run"
    state = TrainState(step=jnp.asarray(STEPS, jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.random.key_data(jax.random.key(0)), bad_steps=jnp.zeros([], jnp.int32))
    ckpt = Checkpointer(str(workdir / "checkpoints"), save_every=1, keep=1, async_save=False)
    ckpt.save(STEPS, state, config=c.to_dict(), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(json.dumps(c.to_dict()))
    shutil.copyfile(pipeline.builtin_files()[1], workdir / "tokenizer.json")
    return {"config": c, "params": jax.tree.map(np.asarray, params), "workdir": str(workdir)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "quarot+gptq"])
def test_every_linear_layer_beats_rtn(trained, method):
    """Layer by layer on 16 calibration sequences, each kernel's ||X W - X Q||^2 on its own inputs (as
    the already quantised layers before it give them) is below round-to-nearest's on the same inputs."""
    c = trained["config"]
    calib = ev.calibration_batches("builtin", trained["workdir"], vocab_size=4096, seq_len=SEQ, samples=16,
                                   batch_size=8)
    params, model_cfg = quant.fold_embproj(trained["params"], c.model)
    spec = quant.QuantSpec()
    if method == "quarot+gptq":
        from osp_jax import rotation
        params = quant.rotate_ffn(rotation.rotate(params))
        spec = quant.QuantSpec(hadamard_ffn=True, rotate_qk_heads=True)
    report = {}
    out = gptq.quantize_params(params, model_cfg, 4, calib, spec=spec, report=report)
    kernels = [f"layers_{i}/{m}/{k}/kernel" for i in range(2) for m, k in
               (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up"),
                ("mlp", "down"))] + ["lm_head/kernel"]
    assert sorted(report) == sorted(kernels)
    for name, (err_gptq, err_rtn) in report.items():
        assert 0 < err_gptq < err_rtn, (name, err_gptq, err_rtn)
    assert sum(g for g, _ in report.values()) < 0.8 * sum(r for _, r in report.values())
    # Scanned layout in, scanned layout out; every kernel on its 4-bit grid, the embedding untouched.
    assert out["layers"]["attn"]["q"]["kernel"].shape == params["layers"]["attn"]["q"]["kernel"].shape
    assert out["embed"]["embedding"] is params["embed"]["embedding"] or \
        np.array_equal(out["embed"]["embedding"], params["embed"]["embedding"])
    w = out["layers"]["mlp"]["up"]["kernel"][0]
    assert max(len(np.unique(w[:, j])) for j in range(w.shape[1])) <= 15


def test_gptq_model_through_ptq():
    """quantize_model(method=gptq) of a small random model on random calibration windows: the same tree
    and spec as rtn's, other (GPTQ) values, 16-bit weights left alone, a clear error without calibration."""
    cfg = small_config(norm_scale="channel", embed_proj=True)
    params = random_params(cfg.model, seed=4, std=0.2)
    rng = np.random.default_rng(5)
    calib = [{"inputs": rng.integers(0, cfg.model.vocab_size, (4, 16)).astype(np.int32),
              "segment_ids": np.repeat([[1] * 10 + [2] * 6], 4, axis=0), "positions": np.tile(np.arange(16), (4, 1))}]
    rtn = ptq.quantize_model(params, cfg.model, quant.Bits(4, 8, 8))
    q = ptq.quantize_model(params, cfg.model, quant.Bits(4, 8, 8), method="gptq", calibration=calib, act_order=True)
    assert jax.tree.structure(q.params) == jax.tree.structure(rtn.params) and q.spec == rtn.spec
    assert not np.allclose(q.params["layers"]["mlp"]["down"]["kernel"], rtn.params["layers"]["mlp"]["down"]["kernel"])
    w16 = ptq.quantize_model(params, cfg.model, quant.Bits(16, 16, 16), method="gptq", calibration=calib)
    plain = ptq.quantize_model(params, cfg.model, quant.Bits(16, 16, 16))
    jax.tree.map(np.testing.assert_array_equal, w16.params, plain.params)
    with pytest.raises(ValueError, match="needs calibration"):
        ptq.quantize_model(params, cfg.model, quant.Bits(4, 4, 4), method="gptq")
    with pytest.raises(ValueError, match="rtn, gptq, quarot, quarot\\+gptq"):
        ptq.quantize_model(params, cfg.model, quant.Bits(4, 4, 4), method="awq")


# ------------------------------------------------------------------------------------------ evaluate CLI

def _main(capsys, *args):
    code = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_methods_report_method_and_calibration(trained, capsys, tmp_path):
    """--method=quarot+gptq calibrating on the run's data.path (config.json) by default: the JSON and the
    table name the method; gptq at 4 bits costs less than rtn at 4 bits on the same tokens."""
    ppl = {}
    for method in ("rtn", "gptq", "quarot+gptq"):
        out_json = tmp_path / f"{method}.json"
        code, out, err = _main(capsys, f"--workdir={trained['workdir']}", "--data=builtin", "--bits=4,16,16",
                               f"--method={method}", "--calib-samples=16", "--max-tokens=2048",
                               f"--seq-len={SEQ}", f"--output={out_json}")
        assert code == 0, err
        r = json.loads(out_json.read_text())
        assert r["method"] == method and r["quantize_s"] > 0
        ppl[method] = r["quant_ppl"]
        if method == "rtn":
            assert r["calibration"] is None
        else:
            assert r["calibration"] == {"data": "builtin", "samples": 16, "seq_len": SEQ, "act_order": False}
            assert f"W4A16KV16 {method}" in out
    assert r["hadamard"] == "ffn"  # quarot implies the FFN Hadamard
    assert ppl["gptq"] < ppl["rtn"], ppl


def _one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_method_and_missing_calibration_exit_2_before_loading(capsys, tmp_path):
    """No checkpoint in tmp_path: each error must be found before one is looked for."""
    code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", "--method=awq")
    _one_line_error(code, err, "--method='awq'", "rtn, gptq, quarot, quarot+gptq")
    for method in ("gptq", "quarot+gptq"):
        code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", f"--method={method}")
        _one_line_error(code, err, f"--method={method} needs calibration data", "--calib-data", "config.json")
        code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", f"--method={method}",
                             f"--calib-data={tmp_path / 'nothing'}")
        _one_line_error(code, err, f"--calib-data={tmp_path / 'nothing'}", "does not exist")
        code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", f"--method={method}",
                             f"--calib-data={tmp_path / 'missing.jsonl'}")
        _one_line_error(code, err, "missing.jsonl is no such file")
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "grain", "path": str(tmp_path / "gone")}}))
    code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", "--method=gptq")
    _one_line_error(code, err, f"--calib-data={tmp_path / 'gone'}", "does not exist")
    code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", "--method=gptq", "--calib-samples=0")
    _one_line_error(code, err, "--calib-samples=0")
    # rtn and quarot need no calibration: the error is the missing checkpoint.
    code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", "--method=quarot")
    _one_line_error(code, err, "no complete checkpoint")
