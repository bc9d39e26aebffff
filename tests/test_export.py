"""Export to Hugging Face Llama and import back: logits and greedy parity with transformers, byte-identical
round trips, refusal of bad input, no partial output, no code execution from an imported directory."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from osp_jax import export as ex  # noqa: E402
from osp_jax.checkpoint import Checkpointer, restore_params_only  # noqa: E402
from osp_jax.config import defaults, validate  # noqa: E402
from osp_jax.data.tokenizer import train_bpe  # noqa: E402
from osp_jax.model import Transformer, abstract_params  # noqa: E402
from osp_jax.optim import make_optimizer  # noqa: E402
from osp_jax.step import TrainState  # noqa: E402

VOCAB, DIM, SEQ, PROMPT, NEW = 300, 48, 16, 8, 32
TEXTS = ["the quick brown fox jumps over the lazy dog", "outlier safe pre training keeps activations small",
         "hello world, this is a tiny tokenizer for tests", "muon orthogonalises the momentum of each matrix"]
COMBOS = list(itertools.product(("single", "channel"), (False, True), (False, True), (False, True)))
COMBO_IDS = [f"{n}-{'proj' if p else 'noproj'}-{'gqa' if g else 'mha'}-{'tied' if t else 'untied'}"
             for n, p, g, t in COMBOS]
# Combos that go the whole way: Checkpointer -> workdir -> `python -m osp_jax.export` entry point. Each
# setting appears twice on each side. The others convert the same parameters in memory (write_hf), which
# skips two Orbax checksum compiles each and keeps this file well inside its time budget.
THROUGH_CHECKPOINT = {("single", True, True, True), ("channel", False, False, False),
                      ("single", False, True, False), ("channel", True, False, True)}


def make_config(norm="single", embed_proj=True, gqa=True, tied=False, **model):
    c = defaults()
    m = c.model
    m.vocab_size, m.dim, m.layers, m.heads, m.ffn_dim = VOCAB, DIM, 2, 4, 64
    m.kv_heads = 2 if gqa else 4
    m.norm_scale, m.embed_proj, m.tie_embeddings = norm, embed_proj, tied
    m.dtype, m.remat, m.attention, m.init_std = "float32", "none", "xla", 0.05
    m.rope_theta = 500.0  # a small theta makes every rotary frequency matter within 48 positions
    for k, v in model.items():
        m[k] = v
    c.train.seq_len = PROMPT + NEW + 8
    return validate(c)


def make_params(config, seed):
    """Random parameters in the tree model.init builds, with norm scales and EmbProj perturbed away from
    their init values (ones, orthogonal), so that a wrong merge, norm or layout could not go unnoticed."""
    rng = np.random.RandomState(seed)
    shapes = nn.unbox(abstract_params(config.model, SEQ))  # model.init traced, not run: no compile
    params = jax.tree.map(lambda s: np.asarray(0.05 * rng.randn(*s.shape), np.float32), shapes)
    for node in (params["layers"]["attn_norm"], params["layers"]["mlp_norm"], params["final_norm"]):
        node["scale"] = np.asarray(rng.uniform(0.5, 2.0, node["scale"].shape), np.float32)
    for name in ("embed_proj", "head_proj"):  # well conditioned, far from orthogonal
        if name in params:
            params[name]["kernel"] = (np.eye(DIM) + 0.5 * rng.randn(DIM, DIM) / np.sqrt(DIM)).astype(np.float32)
    return params


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: torch's thread pool only fights XLA's for the two cores (10x slower generate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe(TEXTS * 8, 280, min_frequency=1).save(path)
    return path


def make_workdir(path, config, params, tokenizer_file, steps=(5,), opt_state=True):
    """A training workdir as osp_jax.train leaves it: config.json, tokenizer, data metadata, checkpoints.
    opt_state=False saves an empty optimizer state (export reads only the params): a faster save."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    with open(tokenizer_file, "rb") as src, open(os.path.join(path, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    with open(os.path.join(path, "data_metadata.json"), "w") as f:
        json.dump({"tokenizer": "tokenizer.json", "eos_id": 0, "pad_id": 1, "vocab_size": 280}, f)
    jparams = jax.tree.map(jnp.asarray, params)
    opt = make_optimizer(config)[0].init(jparams) if opt_state else ()
    state = TrainState(jnp.int32(0), jparams, opt, jax.random.key_data(jax.random.key(0)), jnp.int32(0))
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), save_every=1, keep=5, async_save=False)
    for s in steps:
        ckpt.save(s, state._replace(step=jnp.int32(s)), config=config.to_dict(), force=True)
    ckpt.close()
    return path


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def forward(config):
    model = Transformer(config.model)
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def jax_greedy(fwd, params, prompts, n):
    """Greedy decoding recomputing the full causal forward each step (a fixed-size buffer: one compile).
    Returns the new tokens and the smallest gap between the two best logits met on the way."""
    p = prompts.shape[1]
    buf = np.zeros((prompts.shape[0], p + n), np.int32)
    buf[:, :p] = prompts
    gap = np.inf
    for i in range(n):
        rows = np.asarray(fwd(params, buf))[:, p + i - 1]
        top = np.sort(rows, axis=-1)[:, -2:]
        gap = min(gap, float((top[:, 1] - top[:, 0]).min()))
        buf[:, p + i] = rows.argmax(-1)
    return buf[:, p:], gap


def hf_greedy(hf, prompts, n):
    hf.generation_config.eos_token_id = None  # decode all n tokens, as the JAX loop does
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=1)
    return out[:, prompts.shape[1]:].numpy()


def read_dir(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,embed_proj,gqa,tied", COMBOS, ids=COMBO_IDS)
def test_logits_and_greedy_parity(tmp_path, tokenizer_file, norm, embed_proj, gqa, tied):
    config = make_config(norm, embed_proj, gqa, tied)
    seed = COMBOS.index((norm, embed_proj, gqa, tied))
    params = make_params(config, seed)
    out = str(tmp_path / "hf")
    if (norm, embed_proj, gqa, tied) in THROUGH_CHECKPOINT:
        workdir = make_workdir(str(tmp_path / "run"), config, params, tokenizer_file, opt_state=False)
        assert ex.main([f"--workdir={workdir}", f"--output={out}", "--dtype=float32"]) == 0
    else:
        tok = ex.TokenizerInfo(tokenizer_file, eos_id=0, bos_id=0, pad_id=1)
        ex.write_hf(params, config, tok, out, dtype="float32")

    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["tie_word_embeddings"] == (tied and not embed_proj)
    assert hf_cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
    hf = load_hf(out)
    assert hf.config.num_key_value_heads == (2 if gqa else 4)

    # Logits on random tokens, in the shape the greedy loop uses too (one compile per model).
    fwd = forward(config)
    rng = np.random.RandomState(100 + seed)
    tokens = rng.randint(0, VOCAB, (2, PROMPT + NEW))
    ours = np.asarray(fwd(params, tokens))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    print(f"max relative logit error {rel:.2e}")
    assert rel < 1e-4

    prompts = rng.randint(0, VOCAB, (2, PROMPT))
    ours_gen, gap = jax_greedy(fwd, params, prompts, NEW)
    assert gap > 10 * np.abs(ours - theirs).max()  # no near tie that float rounding could flip
    np.testing.assert_array_equal(hf_greedy(hf, prompts, NEW), ours_gen)


def test_parity_would_catch_a_rope_layout_mistake(tmp_path, tokenizer_file):
    """Control for the parity test: q/k rows re-laid as interleaved pairs (GPT-J style) break the logits."""
    config = make_config("channel", False, False, False)
    params = make_params(config, 11)
    out = str(tmp_path / "hf")
    ex.write_hf(params, config, ex.TokenizerInfo(tokenizer_file, 0, 0, 1), out, dtype="float32")
    hf = load_hf(out)
    hd = DIM // 4
    half_to_pairs = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], 1).reshape(-1)
    rows = torch.tensor((np.arange(DIM).reshape(4, hd)[:, half_to_pairs]).reshape(-1))
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight[rows])
        tokens = np.random.RandomState(0).randint(0, VOCAB, (1, SEQ))
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(config)(params, tokens))
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    print(f"relative logit error with interleaved RoPE rows: {rel:.2e}")  # about 0.16
    assert rel > 1e-2


def test_tokenizer_loads_with_auto_tokenizer(small_run, tmp_path, tokenizer_file):
    import tokenizers

    from osp_jax.data.tokenizer import load_tokenizer

    out = str(tmp_path / "hf")
    ex.export(small_run, out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox says hello"
    assert tok(text).input_ids == tokenizers.Tokenizer.from_file(tokenizer_file).encode(text).ids  # no BOS added
    # A special token's string inside a document is text, as in training: not the EOS that ends it.
    code = 'SEP = "<|endoftext|>"  # split on <|pad|>'
    ours = load_tokenizer(tokenizer_file).encode(code)
    assert tok(code).input_ids == ours and 0 not in ours and 1 not in ours
    assert tok.decode(ours) == code
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == "bfloat16" and cfg["max_position_embeddings"] == PROMPT + NEW + 8


def test_exported_tokenizer_adds_no_bos_the_model_never_saw(tmp_path, tokenizer_file, capsys):
    """A tokenizer whose post-processor adds a BOS (as Llama's do): the released one encodes `tok(text)`,
    the default call, exactly as osp_jax does (add_special_tokens=False); ByteLevel offsets stay."""
    import tokenizers
    from tokenizers import processors

    from osp_jax.data.tokenizer import load_tokenizer

    raw = tokenizers.Tokenizer.from_file(tokenizer_file)
    raw.add_special_tokens(["<s>"])
    raw.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 280)])])
    with_bos = str(tmp_path / "tokenizer.json")
    raw.save(with_bos)
    assert raw.encode("hello").ids[0] == 280  # the template is live
    out = tmp_path / "hf"
    out.mkdir()
    ex.write_tokenizer(str(out), ex.TokenizerInfo(with_bos, eos_id=0, bos_id=0, pad_id=1), 64)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ("the lazy fox says hello", "outlier safe pre training, muon!"):
        assert tok(text).input_ids == load_tokenizer(with_bos).encode(text)
    assert tok(["hello world"]).input_ids == [load_tokenizer(with_bos).encode("hello world")]
    assert "removed TemplateProcessing(<s> $A)" in capsys.readouterr().out
    assert json.load(open(out / "tokenizer.json"))["post_processor"]["type"] == "ByteLevel"

    plain = tmp_path / "plain"  # nothing to remove: copied byte for byte, nothing logged
    plain.mkdir()
    ex.write_tokenizer(str(plain), ex.TokenizerInfo(tokenizer_file, 0, 0, 1), 64)
    assert (plain / "tokenizer.json").read_bytes() == open(tokenizer_file, "rb").read()
    assert "removed" not in capsys.readouterr().out


def test_export_import_export_is_byte_identical_and_resumable(tmp_path, tokenizer_file):
    """SSNorm + EmbProj + tied, sharded bf16 export -> import -> export: every file byte for byte."""
    config = make_config("single", True, True, True)
    params = make_params(config, 3)
    workdir = make_workdir(str(tmp_path / "run"), config, params, tokenizer_file, opt_state=False)
    first, second, imported = (str(tmp_path / n) for n in ("hf1", "hf2", "imported"))
    shard = ["--max-shard-size=20KB"]
    assert ex.main([f"--workdir={workdir}", f"--output={first}"] + shard) == 0
    files = read_dir(first)
    assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)

    assert ex.main([f"--from-hf={first}", f"--workdir={imported}", "--optimizer=muon"]) == 0
    cfg = json.load(open(os.path.join(imported, "config.json")))
    assert cfg["model"]["norm_scale"] == "channel" and cfg["model"]["embed_proj"] is False
    assert cfg["model"]["tie_embeddings"] is False and cfg["optimizer"]["name"] == "muon"
    assert ex.main([f"--workdir={imported}", f"--output={second}"] + shard) == 0
    assert files == read_dir(second)

    # The sharded export loads in transformers and matches the original model (bf16 weights).
    tokens = np.random.RandomState(0).randint(0, VOCAB, (1, SEQ))
    ours = np.asarray(forward(config)(params, tokens))
    with torch.no_grad():
        theirs = load_hf(first)(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 3e-2

    # The imported workdir resumes as osp_jax.train does: Checkpointer.restore onto the abstract state.
    from osp_jax import config as config_lib
    from osp_jax.step import init_state

    icfg = config_lib.from_dict(cfg)
    model = Transformer(icfg.model)
    tx, _ = make_optimizer(icfg)
    shapes = jax.eval_shape(lambda k: init_state(icfg, model, tx, k), jax.random.key(0))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)
    ckpt = Checkpointer(os.path.join(imported, "checkpoints"), save_every=1, keep=3)
    step, state = ckpt.restore(abstract)
    ckpt.close()
    assert step == 0 and int(state.step) == 0
    merged = np.asarray(state.params["embed"]["embedding"], np.float64)
    want = np.asarray(params["embed"]["embedding"], np.float64) @ params["embed_proj"]["kernel"]
    np.testing.assert_allclose(merged, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert os.path.isfile(os.path.join(imported, ex.RECIPE_FILE))
    meta = json.load(open(os.path.join(imported, "data_metadata.json")))
    assert (meta["eos_id"], meta["pad_id"], meta["tokenizer"]) == (0, 1, "tokenizer.json")


def test_import_at_a_step_trains_on_with_the_schedule_at_that_step(small_run, tmp_path):
    """`--from-hf --step=50`: the checkpoint's schedules stand at step 50 and the moments' counts at 0 (they
    are fresh), so the first step applies the schedules' rates at step 50, the ones train logs for it: the
    update equals one from constant rates of those values. (It applied step 0's, 0 in the warmup.)"""
    import ml_collections

    from osp_jax import config as config_lib
    from osp_jax.step import init_state, train_step

    workdir = str(tmp_path / "imported")
    assert ex.main([f"--from-hf={_hf_dir(tmp_path, small_run)}", f"--workdir={workdir}", "--step=50",
                    "--optimizer=muon"]) == 0
    cfg = config_lib.from_dict(json.load(open(os.path.join(workdir, "config.json"))))
    model = Transformer(cfg.model)
    tx, schedules = make_optimizer(cfg)
    shapes = jax.eval_shape(lambda k: init_state(cfg, model, tx, k), jax.random.key(0))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=3) as ckpt:
        step, state = ckpt.restore(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                                                shapes))
    assert step == 50 and int(state.step) == 50
    counts = {}
    for node in jax.tree.leaves(state.opt_state, is_leaf=lambda n: "count" in getattr(n, "_fields", ())):
        counts.setdefault(type(node).__name__, set()).add(int(node.count))
    assert counts == {"ScaleByScheduleState": {50}, "ScaleByAdamState": {0}, "ScaleByMuonState": {0}}, counts

    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ + 1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((2, SEQ), np.int32),
             "positions": np.tile(np.arange(SEQ), (2, 1))}
    const = ml_collections.ConfigDict(cfg.to_dict())
    const.optimizer.schedule, const.optimizer.warmup_steps = "constant", 0
    const.optimizer.learning_rate = float(schedules["learning_rate"](50))
    const.optimizer.muon_learning_rate = float(schedules["muon_learning_rate"](50))
    assert 0 < const.optimizer.learning_rate < cfg.optimizer.learning_rate  # on the cosine, after the warmup
    ref_tx, _ = make_optimizer(const)
    fresh = state._replace(step=jnp.int32(0), opt_state=ref_tx.init(state.params))
    got, _ = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx))(state, batch)
    want, _ = jax.jit(lambda s, b: train_step(s, b, model=model, tx=ref_tx))(fresh, batch)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got.params, want.params)


def test_import_reads_bin_and_matches_safetensors(tmp_path, tokenizer_file):
    config = make_config("channel", False, False, False)
    workdir = make_workdir(str(tmp_path / "run"), config, make_params(config, 7), tokenizer_file, opt_state=False)
    out = str(tmp_path / "hf")
    ex.export(workdir, out, dtype="float32")
    from_st = ex.read_hf_weights(out)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in from_st.items()}, str(bin_dir / "pytorch_model.bin"))
    (bin_dir / "config.json").write_bytes(open(os.path.join(out, "config.json"), "rb").read())
    from_bin = ex.read_hf_weights(str(bin_dir))
    assert sorted(from_bin) == sorted(from_st)
    for k in from_st:
        np.testing.assert_array_equal(from_bin[k], from_st[k])
    assert ex.main([f"--from-hf={bin_dir}", f"--workdir={tmp_path / 'imported'}"]) == 0
    _, params, _ = restore_params_only(str(tmp_path / "imported"))
    _, orig, _ = restore_params_only(workdir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(orig)):
        np.testing.assert_array_equal(a, b)


def test_unrolled_and_consumed_trees_export_the_same_files(tmp_path, tokenizer_file):
    """The unrolled layout (`layers_<i>`) exports the same bytes as the scanned stack, sharded, also when
    export consumes the tree (each leaf released once its tensors exist: consume=True empties it). Every
    file gets the mode an ordinary write gives (safetensors' own is 0600)."""
    from osp_jax.model import relayout_layers

    config = make_config("single", True, True, False)
    params = make_params(config, 5)
    tok = ex.TokenizerInfo(tokenizer_file, eos_id=0, bos_id=0, pad_id=1)
    scanned, unrolled_out = str(tmp_path / "scanned"), str(tmp_path / "unrolled")
    ex.write_hf(params, config, tok, scanned, max_shard_size=20_000)
    unrolled_cfg = make_config("single", True, True, False, scan_layers=False)
    unrolled = relayout_layers(jax.tree.map(np.array, params), False, config.model.layers)
    assert "layers_1" in unrolled
    ex.write_hf(unrolled, unrolled_cfg, tok, unrolled_out, max_shard_size=20_000, consume=True)
    files = read_dir(scanned)
    assert "model.safetensors.index.json" in files and files == read_dir(unrolled_out)
    assert jax.tree.leaves(unrolled) == [] and jax.tree.leaves(params)  # only the consumed tree is emptied
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(os.path.join(scanned, f)).st_mode & 0o777 for f in files} == {0o666 & ~umask}


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tokenizer_file):
    config = make_config(layers=1)
    path = str(tmp_path_factory.mktemp("small") / "run")
    return make_workdir(path, config, make_params(config, 1), tokenizer_file, steps=(2, 4))


def _error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert ex.main([f"--workdir={tmp_path / 'empty'}", f"--output={tmp_path / 'out'}"]) == 2
    assert "no checkpoint in" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_step_lists_the_steps_there_are(small_run, tmp_path, capsys):
    assert ex.main([f"--workdir={small_run}", "--step=3", f"--output={tmp_path / 'out'}"]) == 2
    err = _error(capsys)
    assert "step 3" in err and "[2, 4]" in err
    assert ex.main([f"--workdir={small_run}", "--step=2", f"--output={tmp_path / 'out'}"]) == 0


def test_non_empty_output_needs_overwrite(small_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert ex.main([f"--workdir={small_run}", f"--output={out}"]) == 2
    assert "not empty" in _error(capsys) and (out / "keep.txt").read_text() == "mine"
    assert ex.main([f"--workdir={small_run}", f"--output={out}", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_output_that_would_delete_the_run_is_refused(small_run, tmp_path, capsys):
    """--overwrite never replaces the workdir being exported, an ancestor of it (also through a symlink),
    or its checkpoints; a fresh subdirectory of the workdir is fine."""
    workdir = tmp_path / "runs" / "run"
    shutil.copytree(small_run, workdir)
    (tmp_path / "alias").symlink_to(tmp_path / "runs")
    before = sorted(os.listdir(workdir))
    for output, why in ((workdir, "is --workdir"), (tmp_path / "runs", "contains --workdir"),
                        (tmp_path / "alias" / "run", "is --workdir"), (f"{workdir}/sub/..", "is --workdir"),
                        (workdir / "checkpoints", "own checkpoints"),
                        (workdir / "checkpoints" / "4", "own checkpoints")):
        assert ex.main([f"--workdir={workdir}", f"--output={output}", "--overwrite"]) == 2, output
        assert why in _error(capsys), output
        assert sorted(os.listdir(workdir)) == before and restore_params_only(str(workdir))[0] == 4
    assert ex.main([f"--workdir={workdir}", f"--output={workdir / 'hf'}", "--overwrite"]) == 0
    assert (workdir / "hf" / "model.safetensors").exists() and restore_params_only(str(workdir))[0] == 4


def test_import_refuses_to_write_over_its_source(small_run, tmp_path, capsys):
    out = _hf_dir(tmp_path, small_run)
    before = read_dir(out)
    for workdir, why in ((out, "is --from-hf"), (tmp_path, "contains --from-hf")):
        assert ex.main([f"--from-hf={out}", f"--workdir={workdir}"]) == 2
        assert why in _error(capsys)
    assert read_dir(out) == before


def test_failure_mid_write_leaves_no_output(small_run, tmp_path, monkeypatch):
    calls = []
    real = ex.write_safetensors

    def fail_on_second_shard(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, *args)

    monkeypatch.setattr(ex, "write_safetensors", fail_on_second_shard)
    with pytest.raises(OSError, match="simulated"):
        ex.export(small_run, str(tmp_path / "out"), max_shard_size="10KB")
    assert len(calls) == 2 and os.path.exists(calls[0]) is False
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        ex.export(small_run, str(tmp_path / "new" / "parent" / "out"), max_shard_size="10KB")
    assert list(tmp_path.iterdir()) == []  # nor the parents the export made for it


def test_cli_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "osp_jax.export", f"--workdir={tmp_path / 'nothing'}",
                           f"--output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("osp_jax.export: error: --workdir=")


# ---------------------------------------------------------------------------------------------------- import safety


def _hf_dir(tmp_path, small_run, **config_changes):
    out = tmp_path / "hf"
    ex.export(small_run, str(out), dtype="float32")
    cfg = json.load(open(out / "config.json"))
    cfg.update(config_changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


class _Payload:
    """Unpickling this runs open(MARKER, "w"): a harmless stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_refuses_a_malicious_pickle(small_run, tmp_path, capsys):
    out = _hf_dir(tmp_path, small_run)
    os.remove(out / "model.safetensors")
    marker = str(tmp_path / "pwned")
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, str(out / "pytorch_model.bin"))
    live = str(tmp_path / "live")  # the payload is real: an unrestricted load runs it
    torch.save({"x": _Payload(live)}, str(tmp_path / "live.bin"))
    torch.load(str(tmp_path / "live.bin"), weights_only=False)
    assert os.path.exists(live)
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'imported'}"]) == 2
    assert "weights_only=True" in _error(capsys)
    assert not os.path.exists(marker) and not (tmp_path / "imported").exists()


def test_import_refuses_remote_code_and_other_architectures(small_run, tmp_path, capsys):
    out = _hf_dir(tmp_path, small_run, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'a'}"]) == 2
    assert "auto_map" in _error(capsys) and not (tmp_path / "a").exists()
    cfg = json.load(open(out / "config.json"))
    del cfg["auto_map"]
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (out / "config.json").write_text(json.dumps(cfg))
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'b'}"]) == 2
    assert "only Llama" in _error(capsys) and not (tmp_path / "b").exists()


def test_import_names_a_weight_whose_shape_the_config_contradicts(small_run, tmp_path, capsys):
    out = _hf_dir(tmp_path, small_run, num_key_value_heads=4)  # the weights have 2 KV heads of 12
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'a'}"]) == 2
    err = _error(capsys)
    assert "model.layers.0.self_attn.k_proj.weight has shape [24, 48]" in err and "implies [48, 48]" in err
    cfg = json.load(open(out / "config.json"))
    cfg.update(num_key_value_heads=2, intermediate_size=32)  # 64 in the weights: only a transpose, no reshape
    (out / "config.json").write_text(json.dumps(cfg))
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'b'}"]) == 2
    assert "mlp.gate_proj.weight has shape [64, 48]" in _error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_names_a_missing_or_unreadable_weight_file(small_run, tmp_path, capsys):
    out = tmp_path / "hf"
    ex.export(small_run, str(out), dtype="float32", max_shard_size="10KB")
    shard = sorted(json.load(open(out / ex.INDEX_FILE))["weight_map"].values())[-1]
    os.remove(out / shard)
    assert ex.main([f"--from-hf={out}", f"--workdir={tmp_path / 'a'}"]) == 2
    assert f"lists the shard {shard}, which is missing" in _error(capsys)
    for reader, name in ((ex.read_safetensors, "x.safetensors"), (ex._read_bin, "pytorch_model.bin")):
        with pytest.raises(ex.ExportError, match=f"cannot read .*{name}"):
            reader(str(tmp_path / name))
        with pytest.raises(ex.ExportError, match=f"cannot read {tmp_path}"):
            reader(str(tmp_path))  # a directory: IsADirectoryError
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ex.ExportError, match="not a plain tensor file"):
        ex._read_bin(str(tmp_path / "empty.bin"))


def test_safetensors_writer_reads_back_with_the_safetensors_package(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    specs = [ex.TensorSpec("a", (3, 4), lambda: a), ex.TensorSpec("b", (5,), lambda: np.ones(5, np.float32))]
    ex.write_safetensors(str(tmp_path / "x.safetensors"), specs, np.dtype(np.float32))
    back = load_file(str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers writes and expects
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(ex.read_safetensors(str(tmp_path / "x.safetensors"))["b"], np.ones(5))
    assert ex.parse_size("5GB") == 5 * 10**9 and ex.parse_size("2GiB") == 2 * 2**30 and ex.parse_size("123") == 123
