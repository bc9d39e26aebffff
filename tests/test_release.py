"""The release path end to end: train (the CLI's loop) -> export -> transformers loads it, generates
text from the tokenizer, and its perplexity on held-out text matches `osp_jax.evaluate` within 0.5%."""
import json
import lzma

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from osp_jax import evaluate as evaluate_lib  # noqa: E402
from osp_jax import export as export_lib  # noqa: E402
from osp_jax import train as train_lib  # noqa: E402
from osp_jax.data import pipeline  # noqa: E402
from tests.helpers import load_recipe  # noqa: E402


def _held_out_text() -> str:
    with lzma.open(pipeline.builtin_files()[0], "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return next(d["text"] for d in docs if d.get("split") == "validation" and len(d["text"]) > 4000)


def test_trained_model_exports_generates_and_matches_evaluate_perplexity(tmp_path):
    cfg = load_recipe("tiny")
    cfg.model.dim, cfg.model.layers, cfg.model.ffn_dim = 64, 2, 176
    cfg.train.steps, cfg.train.seq_len, cfg.train.global_batch_size = 30, 64, 8
    cfg.train.eval_every = cfg.train.outlier_every = 0
    cfg.optimizer.warmup_steps = 3
    workdir, hf_dir = tmp_path / "run", tmp_path / "hf"
    train_lib.train(cfg, str(workdir))
    export_lib.export(str(workdir), str(hf_dir), dtype="float32")

    text_file = tmp_path / "held_out.txt"
    text_file.write_text(_held_out_text(), encoding="utf-8")
    ours = evaluate_lib.evaluate(str(workdir), str(text_file), bits="16,16,16")

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tok(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    w = cfg.train.seq_len + 1
    windows = torch.tensor(np.asarray(ids[: len(ids) // w * w]).reshape(-1, w))
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    hf_ppl = float(torch.exp(loss))
    assert windows[:, 1:].numel() == ours["tokens"]
    print(f"\nperplexity: osp_jax.evaluate {ours['ppl']:.4f}, transformers {hf_ppl:.4f}")
    assert abs(hf_ppl - ours["ppl"]) / ours["ppl"] < 0.005

    prompt = tok("It is a truth universally acknowledged", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0][prompt["input_ids"].shape[1]:])
    assert out.shape[1] == prompt["input_ids"].shape[1] + 20 and isinstance(text, str)
    print("generated:", repr(text))
