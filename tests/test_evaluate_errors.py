"""`python -m osp_jax.evaluate`'s bad-input battery: the outputs it writes (--output, --plot), the run it reads
(--workdir, its config.json), the text it scores (--data), and flags a model cannot be evaluated with. Each case,
run in-process through `main(argv)`: exit code 2, one line on stderr naming the flag, file or value and why, no
traceback, nothing left behind (the tree under the test's directory as it was) and, where the flags alone tell,
the checkpoint never read."""
import gzip
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

from osp_jax import cli
from osp_jax import checkpoint as checkpoint_lib
from osp_jax import evaluate as ev
from osp_jax.checkpoint import Checkpointer
from osp_jax.config import defaults, validate
from osp_jax.data import pipeline
from osp_jax.model import abstract_params
from osp_jax.step import TrainState

SYS = "/sys/osp_jax_battery"  # a directory no one can create entries in, even root (sysfs)
SEQ, BATCH = 16, 2
EMPTY, NOT_UTF8, TRUNCATED = b"", b'{"a": "\xff\xfe"}', b'{"model": {"dim": 6'
TEXT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. " * 4


def _make_run(workdir, **model):
    """A workdir as train leaves it (checkpoint with its config, config.json, tokenizer.json) of a random
    one-layer model: evaluation needs a checkpoint it can read, not a trained one."""
    c = defaults()
    c.model.update({"vocab_size": 4096, "dim": 32, "layers": 1, "heads": 2, "kv_heads": 1, "ffn_dim": 48,
                    "dtype": "float32", "remat": "none", **model})
    c.train.update(seq_len=SEQ, global_batch_size=BATCH)
    validate(c)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                          nn.unbox(abstract_params(c.model, SEQ)))
    state = TrainState(step=np.int32(1), params=params, opt_state=optax.sgd(0.1).init(params),
                       rng=jax.random.key_data(jax.random.key(0)), bad_steps=np.int32(0))
    ckpt = Checkpointer(str(workdir / "checkpoints"), save_every=1, keep=1, async_save=False)
    ckpt.save(1, state, config=c.to_dict(), force=True)
    ckpt.close()
    cli.write_json(workdir / "config.json", c.to_dict())
    shutil.copyfile(pipeline.builtin_files()[1], workdir / "tokenizer.json")
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"run": _make_run(root / "run"), "wide_heads": _make_run(root / "wide", head_dim=192, heads=1)}


def _file(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _text(t, name="val.txt", data: bytes = TEXT.encode()):
    return _file(t / name, data)


def _gz_cut(t):
    whole = gzip.compress((json.dumps({"text": TEXT}) + "\n").encode() * 8)
    return _file(t / "val.jsonl.gz", whole[: len(whole) // 2])


def _run_with(t, runs, name, data: bytes):
    run = shutil.copytree(runs["run"], t / "run")
    (run / name).write_bytes(data)
    return run


def _args(t, runs, *, run=None, data=None, out=None, plot=None, extra=()):
    args = [f"--workdir={run or runs['run']}", f"--data={data or _text(t)}", f"--seq-len={SEQ}",
            f"--batch-size={BATCH}", "--max-tokens=32", *extra]
    return args + ([f"--output={out}"] if out else []) + ([f"--plot={plot}"] if plot else [])


# (id, setup(tmp, runs) -> argv, what the line must name, whether the checkpoint may be read first)
CASES = [
    ("output-is-a-directory", lambda t, r: _args(t, r, out=(t / "o").mkdir() or t / "o"),
     "--output=", False),
    ("output-under-a-file", lambda t, r: _args(t, r, out=_file(t / "f", b"x") / "eval.json"),
     "f is a file, not a directory", False),
    ("output-not-writable", lambda t, r: _args(t, r, out=f"{SYS}/eval.json"), "is not writable", False),
    ("plot-is-a-directory", lambda t, r: _args(t, r, plot=(t / "p").mkdir() or t / "p"), "--plot=", False),
    ("plot-under-a-file", lambda t, r: _args(t, r, plot=_file(t / "f", b"x") / "eval.png"),
     "f is a file, not a directory", False),
    ("plot-not-writable", lambda t, r: _args(t, r, plot=f"{SYS}/eval.png"), "is not writable", False),
    ("plot-unknown-format", lambda t, r: _args(t, r, plot=t / "eval.xyz"), "--plot=", False),
    ("workdir-missing", lambda t, r: _args(t, r, run=t / "nowhere"), "nowhere: no such directory", False),
    ("workdir-is-a-file", lambda t, r: _args(t, r, run=_file(t / "run", b"x")), "run: a file, not a directory",
     False),
    ("workdir-without-checkpoints", lambda t, r: _args(t, r, run=(t / "run").mkdir() or t / "run"),
     "no complete checkpoint", True),
    ("config-empty", lambda t, r: _args(t, r, run=_run_with(t, r, "config.json", EMPTY)),
     "config.json is empty", False),
    ("config-not-utf8", lambda t, r: _args(t, r, run=_run_with(t, r, "config.json", NOT_UTF8)),
     "config.json is not UTF-8", False),
    ("config-truncated", lambda t, r: _args(t, r, run=_run_with(t, r, "config.json", TRUNCATED)),
     "config.json is not valid JSON (truncated", False),
    ("data-missing", lambda t, r: _args(t, r, data=t / "none.txt"), "none.txt: no such file", True),
    ("data-empty", lambda t, r: _args(t, r, data=_text(t, "val.txt", EMPTY)), "val.txt: skipped (empty)", True),
    ("data-jsonl-empty", lambda t, r: _args(t, r, data=_text(t, "val.jsonl", EMPTY)),
     "val.jsonl: no valid documents: the file holds no record", True),
    ("data-not-utf8", lambda t, r: _args(t, r, data=_text(t, "val.txt", b"caf\xe9 " * 40)),
     "val.txt:1: skipped (bad_utf8): byte 3 is not UTF-8", True),
    ("data-jsonl-not-utf8", lambda t, r: _args(t, r, data=_text(t, "val.jsonl", b'{"text": "caf\xe9"}\n' * 40)),
     "val.jsonl:1: skipped (bad_utf8)", True),
    ("data-corrupt-gz", lambda t, r: _args(t, r, data=_text(t, "val.jsonl.gz", b"\x1f\x8b\x08\x00garbage" * 8)),
     "val.jsonl.gz", True),
    ("data-truncated-gz", lambda t, r: _args(t, r, data=_gz_cut(t)), "val.jsonl.gz", True),
    ("method-unknown", lambda t, r: _args(t, r, extra=["--method=awq"]), "--method='awq': expected one of", False),
    ("head-dim-the-kv-quantiser-cannot-take", lambda t, r: _args(t, r, run=r["wide_heads"], extra=["--bits=4,4,4"]),
     "--bits=4,4,4: keys and values are quantised in groups of 128 along head_dim, and this model's head_dim 192",
     False),
]


def _tree(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def restores(monkeypatch):
    """How many times a checkpoint was read."""
    calls = []
    real = checkpoint_lib.restore_params_only
    monkeypatch.setattr(checkpoint_lib, "restore_params_only", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _refused(argv, tmp_path, capsys, named):
    before = _tree(tmp_path)
    capsys.readouterr()
    assert ev.main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("osp_jax.evaluate: error: ") and named in err, err
    assert _tree(tmp_path) == before  # no output, no parent made, no temporary file; inputs unchanged
    assert not os.path.exists(SYS)
    return err


@pytest.mark.parametrize("case,setup,named,reads", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_2_and_leaves_nothing(case, setup, named, reads, runs, tmp_path, capsys,
                                                              restores):
    argv = setup(tmp_path, runs)
    if any(SYS in str(a) for a in argv) and not os.path.isdir("/sys"):
        pytest.skip("no /sys to stand for an unwritable directory")
    _refused(argv, tmp_path, capsys, named)
    if not reads:
        assert not restores, "refused only after reading the checkpoint"


def test_unknown_task_is_one_line_before_the_checkpoint_is_read(runs, tmp_path, capsys, restores):
    pytest.importorskip("lm_eval")
    _refused([f"--workdir={runs['run']}", "--tasks=no_such_task_anywhere"], tmp_path, capsys,
             "--tasks: unknown task 'no_such_task_anywhere'")
    assert not restores


def _scored(argv, capsys) -> dict:
    capsys.readouterr()
    code = ev.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    out = next(a.split("=", 1)[1] for a in map(str, argv) if a.startswith("--output="))
    return json.loads(open(os.path.expanduser(out)).read())


def test_a_bom_is_read_through_and_a_missing_output_parent_is_made(runs, tmp_path, capsys):
    """A UTF-8 BOM (editors write one) starts no document: the text scores as it does without it."""
    plain = _scored(_args(tmp_path, runs, data=_text(tmp_path, "a.txt"), out=tmp_path / "a.json"), capsys)
    bom = _scored(_args(tmp_path, runs, data=_text(tmp_path, "b.txt", b"\xef\xbb\xbf" + TEXT.encode()),
                        out=tmp_path / "new" / "parent" / "b.json"), capsys)
    assert bom["tokens"] == plain["tokens"] == 32 and bom["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    lines = [json.dumps({"text": TEXT}) + "\n"] * 2
    jsonl = _text(tmp_path, "c.jsonl", ("\ufeff" + "".join(lines)).encode())
    assert _scored(_args(tmp_path, runs, data=jsonl, out=tmp_path / "c.json"), capsys)["tokens"] == 32


def test_a_home_relative_path_and_a_name_with_glob_characters(runs, tmp_path, capsys, monkeypatch):
    """--data=~/x is the file under $HOME, and a file whose name holds [ ] is that file, not a pattern."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _text(tmp_path, "home.txt")
    r = _scored(_args(tmp_path, runs, data="~/home.txt", out="~/home.json"), capsys)
    assert r["tokens"] == 32 and (tmp_path / "home.json").is_file()
    odd = _text(tmp_path, "val[1].txt")
    _text(tmp_path, "val1.txt", b"other text that a pattern would match " * 8)
    r = _scored(_args(tmp_path, runs, data=odd, out=tmp_path / "odd.json"), capsys)
    plain = _scored(_args(tmp_path, runs, data=_text(tmp_path, "same.txt"), out=tmp_path / "same.json"), capsys)
    assert r["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_kv_bits_16_evaluate_a_head_dim_the_kv_quantiser_cannot_group(runs, tmp_path, capsys):
    r = _scored(_args(tmp_path, runs, run=runs["wide_heads"], out=tmp_path / "w.json", extra=["--bits=4,4,16"]),
                capsys)
    assert r["tokens"] == 32 and r["bits"]["kv"] == 16
