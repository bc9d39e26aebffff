"""The evaluate CLI on a tiny trained checkpoint: the JSON it writes, quantisation costing perplexity, bad input."""
import json
import lzma
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from osp_jax import eval_data
from osp_jax import evaluate as ev
from osp_jax.config import defaults, validate
from osp_jax.data import pipeline
from osp_jax.data import prepare as prep
from osp_jax.data.tokenizer import load_tokenizer
from osp_jax.model import Transformer
from tests.helpers import train_and_save_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32
STEPS = 300


def _docs(n=4, chars=1500):
    docs = []
    with lzma.open(pipeline.builtin_files()[0], "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"][:chars])
            if len(docs) == n:
                return docs
    return docs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with a checkpoint of a tiny model trained (Adam, a few hundred steps on four short
    documents) until it predicts its validation text well, and a prepared data directory."""
    root = tmp_path_factory.mktemp("eval")
    docs = _docs()
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for split in ("train", "validation"):  # validation = the training text: a model that knows it
            for t in docs:
                f.write(json.dumps({"text": t, "split": split}) + "\n")
    tok_path = pipeline.builtin_files()[1]
    meta = prep.prepare(str(root / "corpus.jsonl"), str(root / "data"), tok_path, quiet=True)

    c = defaults()
    # Unscanned layers (layers_0, layers_1): compiles faster here, and covers that parameter layout.
    c.model.update(vocab_size=4096, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=48, dtype="float32",
                   remat="none", scan_layers=False)
    c.train.update(steps=STEPS, global_batch_size=8, seq_len=SEQ)
    c.data.path = str(root / "data")
    validate(c)

    workdir = root / "run"
    assert train_and_save_run(c, docs, tok_path, workdir, steps=STEPS, seq=SEQ) < 2.0
    return {"root": root, "workdir": str(workdir), "data": str(root / "data"), "meta": meta, "docs": docs,
            "layers": c.model.layers}


def _main(capsys, *args):
    code = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_json_table_and_plot(run, capsys, tmp_path):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    code, out, err = _main(capsys, f"--workdir={run['workdir']}", f"--data={run['data']}", "--bits=4,4,4",
                           f"--output={out_json}", f"--plot={out_png}")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    for key in ("ppl", "quant_ppl", "kurtosis", "kurtosis_per_layer", "max_abs_per_layer", "tokens", "bits",
                "step", "hadamard"):
        assert key in r, key
    assert r["step"] == STEPS and r["bits"] == {"w": 4, "a": 4, "kv": 4} and r["hadamard"] is None
    assert len(r["kurtosis_per_layer"]) == len(r["max_abs_per_layer"]) == run["layers"] + 1
    assert r["kurtosis"] == pytest.approx(np.mean(r["kurtosis_per_layer"]))
    assert all(k >= 0 for k in r["kurtosis_per_layer"]) and all(m > 0 for m in r["max_abs_per_layer"])
    assert sorted(r["linear_inputs"]) == ["down_in", "gate_up_in", "o_in", "qkv_in"]
    for stats in r["linear_inputs"].values():
        assert len(stats["kurtosis_per_layer"]) == len(stats["max_abs_per_layer"]) == run["layers"]
        assert stats["kurtosis"] == pytest.approx(np.mean(stats["kurtosis_per_layer"]))
        assert stats["max_abs"] == max(stats["max_abs_per_layer"]) > 0
    # Every validation token but the first of each window is a scored target; padding never is.
    val_tokens = run["meta"]["splits"]["validation"]["tokens"]
    assert r["tokens"] == val_tokens - -(-val_tokens // (SEQ + 1))
    assert 1.0 < r["ppl"] < 10.0  # the model knows this text
    assert r["quant_ppl"] > r["ppl"] * 1.01, (r["ppl"], r["quant_ppl"])
    assert "W4A4KV4" in out and "kurtosis" in out and "embed" in out
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b"\x89PNG"


def test_text_file_16_bits_and_max_tokens(run, capsys, tmp_path):
    text = tmp_path / "val.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in run["docs"]), encoding="utf-8")
    out_json = tmp_path / "eval.json"
    code, out, err = _main(capsys, f"--workdir={run['workdir']}", f"--data={text}", "--bits=16,16,16",
                           "--max-tokens=500", f"--output={out_json}", "--hadamard=ffn")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["tokens"] == 500 and r["hadamard"] == "ffn"
    assert r["quant_ppl"] == pytest.approx(r["ppl"], rel=1e-4)  # 16 bits + rotation: the same function
    assert r["ppl"] < 10.0


def test_text_file_with_a_sentencepiece_run(tmp_path):
    """A run trained on SentencePiece data keeps tokenizer.model (named by its data_metadata.json);
    --data=FILE tokenises with it. It looked for tokenizer.json only and said the run had none."""
    import io

    spm = pytest.importorskip("sentencepiece")
    docs = [f"document {i} says the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(40)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model, vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "data_metadata.json").write_text(json.dumps({"tokenizer": "tokenizer.model"}))
    text = tmp_path / "val.txt"
    text.write_text("\n".join(docs), encoding="utf-8")
    batch = next(eval_data.text_batches(str(text), str(tmp_path), vocab_size=64, seq_len=16, batch_size=2))
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert batch["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(batch["inputs"][0], tok.encode(docs[0])[:16])
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ev.EvalError, match="holds no tokenizer"):
        eval_data.text_batches(str(text), str(tmp_path), vocab_size=64, seq_len=16, batch_size=2)


def test_a_long_pass_reports_progress(capsys):
    batches = [np.full((2,), i, np.float32) for i in range(4)]
    total = ev._run(lambda p, b: {"x_sum": b.sum(), "x_max_abs": b.max()}, None, batches, "16-bit pass", every_s=0)
    assert total["x_sum"] == 12 and total["x_max_abs"] == 3
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2].split(",")[0] for line in lines] == ["1/4 batches", "2/4 batches", "3/4 batches"]
    assert all(line.startswith("osp_jax.evaluate: 16-bit pass: ") and "ETA" in line for line in lines)


def test_masked_kurtosis_matches_outlier_stats(run):
    """On a batch without padding, evaluate's masked statistics are metrics.outlier_stats exactly."""
    from osp_jax import metrics
    from osp_jax.checkpoint import restore_params_only
    from osp_jax.config import from_dict

    _, params, cfg = restore_params_only(run["workdir"])
    model = Transformer(from_dict(cfg).model)
    tokens = np.random.default_rng(0).integers(0, 4096, (2, SEQ)).astype(np.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape),
             "weights": np.ones(tokens.shape, np.float32)}

    @jax.jit
    def both(params, batch):
        stats = ev.batch_stats(params, batch, model=model, pack_mask=True, outliers=True)
        _, hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], return_hidden=True)
        return stats, metrics.outlier_stats(hidden)

    stats, ref = both(params, batch)
    np.testing.assert_allclose(stats["kurtosis_sum"] / stats["tokens"], ref["kurtosis_per_layer"], rtol=1e-5)
    np.testing.assert_allclose(stats["max_abs"], ref["max_abs_per_layer"], rtol=1e-6)
    # What the activation quantiser sees: every linear layer's input, per layer. Under SSNorm a
    # layer's q/k/v input is its residual input times one scalar per token, and kurtosis is blind to
    # scale, so it equals the residual stream's kurtosis before that layer.
    assert cfg["model"]["norm_scale"] == "single"
    for name in ("qkv_in", "o_in", "gate_up_in", "down_in"):
        assert stats[f"{name}.kurtosis_sum"].shape == stats[f"{name}.max_abs"].shape == (cfg["model"]["layers"],)
    np.testing.assert_allclose(stats["qkv_in.kurtosis_sum"] / stats["tokens"], ref["kurtosis_per_layer"][:-1],
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(stats["down_in.kurtosis_sum"], stats["qkv_in.kurtosis_sum"])


# ------------------------------------------------------------------------------------------ bad input

def _one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("osp_jax.evaluate")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_workdir_without_checkpoint(capsys, tmp_path, run):
    code, _, err = _main(capsys, f"--workdir={tmp_path}", f"--data={run['data']}")
    _one_line_error(code, err, "no complete checkpoint")
    code, _, err = _main(capsys, f"--workdir={tmp_path / 'missing'}", f"--data={run['data']}")
    _one_line_error(code, err, "no such directory")


@pytest.mark.parametrize("bits", ["4,4", "1,4,4", "4,17,4", "a,b,c"])
def test_bad_bits(capsys, tmp_path, bits):
    code, _, err = _main(capsys, f"--workdir={tmp_path}", "--data=builtin", f"--bits={bits}")
    _one_line_error(code, err, "--bits", "2..16")


def test_data_shorter_than_one_sequence(capsys, tmp_path, run):
    short = tmp_path / "short.txt"
    short.write_text("Emma Woodhouse, handsome.\n", encoding="utf-8")
    code, _, err = _main(capsys, f"--workdir={run['workdir']}", f"--data={short}", f"--seq-len={SEQ}")
    _one_line_error(code, err, "tokens, fewer than one sequence", f"--seq-len={SEQ}", str(SEQ + 1))
    n = int(err.split(" has ")[1].split()[0])
    assert 0 < n < SEQ + 1


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer that is not the run's (nor the built-in one)."""
    from osp_jax.data.tokenizer import train_bpe

    path = str(tmp_path_factory.mktemp("other_tok") / "tokenizer.json")
    train_bpe(_docs(2, 300), 300, min_frequency=1).save(path)
    return path


def test_data_from_another_tokenizer_is_refused(run, capsys, tmp_path, other_tokenizer):
    """A run trained with another tokenizer, evaluated on prepared data or on builtin: ids that name other
    tokens must not be scored. Both the run's tokenizer file and its data_metadata.json can tell."""
    workdir = tmp_path / "other_run"
    shutil.copytree(run["workdir"], workdir)
    shutil.copyfile(other_tokenizer, workdir / "tokenizer.json")
    code, _, err = _main(capsys, f"--workdir={workdir}", f"--data={run['data']}")
    _one_line_error(code, err, f"--data={run['data']} was tokenised with {run['data']}/tokenizer.json",
                    f"not with the run's tokenizer {workdir}/tokenizer.json")
    with pytest.raises(ev.EvalError, match="--data=builtin was tokenised with .*builtin-"):
        ev.load_batches("builtin", str(workdir), vocab_size=4096, seq_len=SEQ, batch_size=8)

    from osp_jax.data.tokenizer import file_sha256

    os.remove(workdir / "tokenizer.json")  # only the data metadata train keeps beside it
    (workdir / "data_metadata.json").write_text(json.dumps(
        {"tokenizer": "tokenizer.json", "tokenizer_sha256": file_sha256(other_tokenizer)}))
    with pytest.raises(ev.EvalError, match=rf"run's tokenizer \(recorded in {workdir}/data_metadata.json\)"):
        ev.load_batches(run["data"], str(workdir), vocab_size=4096, seq_len=SEQ, batch_size=8)


def test_tokenizer_check_warns_when_the_run_keeps_no_tokenizer(run, capsys, tmp_path):
    ev.load_batches(run["data"], run["workdir"], vocab_size=4096, seq_len=SEQ, batch_size=8, max_tokens=64)
    assert "warning" not in capsys.readouterr().err  # the run's tokenizer: checked and equal
    batches = ev.load_batches(run["data"], str(tmp_path), vocab_size=4096, seq_len=SEQ, batch_size=8,
                              max_tokens=64)
    assert sum(float(b["weights"].sum()) for b in batches) == 64
    err = capsys.readouterr().err
    assert "warning" in err and f"{tmp_path} keeps no tokenizer" in err and "cannot check" in err


def test_json_is_strict_and_a_nan_loss_is_not_an_infinite_perplexity(tmp_path):
    """NaN and inf, at any depth, are written as null (Python's json would write bare NaN/Infinity);
    a NaN loss gives a NaN perplexity, a finite loss past float64's range an infinite one."""
    assert math.isnan(ev._perplexity(float("nan"), 10.0))
    assert ev._perplexity(1e4, 1.0) == math.inf and ev._perplexity(2.0, 2.0) == pytest.approx(math.e)
    nan, inf = float("nan"), float("inf")
    path = tmp_path / "eval.json"
    ev._write_json(str(path), {"loss": nan, "ppl": ev._perplexity(nan, 1.0), "quant_ppl": inf, "tokens": 3,
                               "kurtosis_per_layer": [1.5, nan, -inf], "setting": "W4A4KV4",
                               "linear_inputs": {"qkv_in": {"max_abs_per_layer": [inf, 2.0]}}})

    def reject(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    r = json.loads(path.read_text(), parse_constant=reject)
    assert r == {"loss": None, "ppl": None, "quant_ppl": None, "tokens": 3, "kurtosis_per_layer": [1.5, None, None],
                 "setting": "W4A4KV4", "linear_inputs": {"qkv_in": {"max_abs_per_layer": [None, 2.0]}}}


def test_module_entry_point_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "osp_jax.evaluate", f"--workdir={tmp_path}", "--data=builtin",
                           "--bits=4,4,99"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "kv bits 99" in proc.stderr
