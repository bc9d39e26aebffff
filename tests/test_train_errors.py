"""`python -m osp_jax.train`'s bad-input battery: the recipe, the workdir it writes, the run's own files, the data
and validation data it reads, the built-in data cache, a diverging run. Each case, run as a user runs it: exit
code 2, one line naming the file, flag or key and why, no traceback, and nothing written (the tree under the
test's directory as it was)."""
import json
import os
import shutil

import pytest

from osp_jax.data import pipeline
from tests.test_train import start_cli

SYS = "/sys/osp_jax_battery"  # a directory no one can create entries in, even root (sysfs)
FAST = ["--config.train.steps=2", "--config.optimizer.warmup_steps=0", "--config.model.dim=64",
        "--config.model.layers=1", "--config.model.ffn_dim=128", "--config.train.seq_len=32",
        "--config.train.global_batch_size=8", "--config.train.eval_every=1", "--config.train.outlier_every=0"]
EMPTY, NOT_UTF8, TRUNCATED = b"", b'{"a": "\xff\xfe"}', b'{"model": {"dim": 6'


def _file(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _recipe(t, text: str):
    return {"config": str(_file(t / "recipe.py", text.encode()))}


def _workdir_with(t, name, data: bytes):
    _file(t / "run" / name, data)
    return {}


def _data_with_metadata(t, data: bytes | None = None, **changes):
    """A data directory holding only metadata.json: `data`, or the built-in data's with `changes` to it."""
    if data is None:
        meta = json.loads(open(os.path.join(pipeline.resolve_data_dir("builtin"), "metadata.json")).read())
        for key, value in changes.items():
            node = meta
            *path, last = key.split(".")
            for k in path:
                node = node[k]
            node[last] = value
        data = json.dumps(meta).encode()
    _file(t / "data" / "metadata.json", data)
    return str(t / "data")


def _cache(path):
    """$OSP_JAX_CACHE at `path`, the compilation cache (by default inside it) off: the data cache's own error."""
    return {"env": {"OSP_JAX_CACHE": str(path)}, "flags": ["--config.train.compilation_cache_dir="]}


def _flag(key, value):
    return {"flags": [f"--config.{key}={value}"]}


# (id, setup(tmp) -> {"flags": [...], "config": recipe, "workdir": path, "env": {...}}, what the line must name)
CASES = [
    ("recipe-missing", lambda t: {"config": str(t / "none.py")}, "none.py: no such file"),
    ("recipe-empty", lambda t: _recipe(t, ""), "recipe.py: the file is empty"),
    ("recipe-directory", lambda t: {"config": str(_file(t / "r.py" / "x", b"").parent)}, "r.py: a directory"),
    ("recipe-syntax-error", lambda t: _recipe(t, "def get_config(:\n"), "recipe.py: line 1: SyntaxError"),
    ("recipe-raises", lambda t: _recipe(t, "def get_config():\n    raise RuntimeError('boom')\n"),
     "recipe.py: line 2: RuntimeError while loading it: boom"),
    ("recipe-returns-none", lambda t: _recipe(t, "def get_config():\n    pass\n"), "get_config() returned NoneType"),
    ("recipe-without-get-config", lambda t: _recipe(t, "x = 1\n"), "defines no get_config()"),
    ("workdir-is-a-file", lambda t: {"workdir": _file(t / "run", b"x")}, "run exists and is not a directory"),
    ("workdir-under-a-file", lambda t: {"workdir": _file(t / "f", b"x") / "run"}, "f is a file, not a directory"),
    ("workdir-not-writable", lambda t: {"workdir": f"{SYS}/run"}, "is not writable"),
    ("workdir-config-empty", lambda t: _workdir_with(t, "config.json", EMPTY), "config.json is empty"),
    ("workdir-config-not-utf8", lambda t: _workdir_with(t, "config.json", NOT_UTF8), "config.json is not UTF-8"),
    ("workdir-config-truncated", lambda t: _workdir_with(t, "config.json", TRUNCATED),
     "config.json is not valid JSON (truncated"),
    ("workdir-data-metadata-truncated", lambda t: _workdir_with(t, "data_metadata.json", TRUNCATED),
     "data_metadata.json is not valid JSON"),
    ("data-missing", lambda t: {"flags": [f"--config.data.path={t / 'nowhere'}"]}, "nowhere' does not exist"),
    ("data-is-a-file", lambda t: {"flags": [f"--config.data.path={_file(t / 'd', b'x')}"]}, "has no metadata.json"),
    ("data-metadata-empty", lambda t: {"flags": [f"--config.data.path={_data_with_metadata(t, EMPTY)}"]},
     "metadata.json is empty"),
    ("data-metadata-not-utf8", lambda t: {"flags": [f"--config.data.path={_data_with_metadata(t, NOT_UTF8)}"]},
     "metadata.json is not UTF-8"),
    ("data-metadata-truncated", lambda t: {"flags": [f"--config.data.path={_data_with_metadata(t, TRUNCATED)}"]},
     "metadata.json is not valid JSON"),
    ("no-validation-split", lambda t: _flag("data.path", _data_with_metadata(t, **{"splits.validation.documents": 0})),
     "no validation documents (prepared with --val-fraction=0?)"),
    ("eval-data-other-tokenizer", lambda t: _flag("train.eval_data", _data_with_metadata(t, tokenizer_sha256="0" * 64)),
     "it was tokenised with"),
    ("eval-data-metadata-truncated", lambda t: _flag("train.eval_data", _data_with_metadata(t, TRUNCATED)),
     "metadata.json is not valid JSON"),
    ("builtin-cache-not-writable", lambda t: _cache(f"{SYS}/cache"), "cannot write the built-in data cache"),
    ("builtin-cache-under-a-file", lambda t: _cache(_file(t / "c", b"x") / "cache"),
     "cannot write the built-in data cache"),
]


def _tree(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,setup,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(case, setup, named, tmp_path):
    got = setup(tmp_path)
    if SYS in json.dumps({k: str(v) for k, v in got.items()}) and not os.path.isdir("/sys"):
        pytest.skip("no /sys to stand for an unwritable directory")
    before = _tree(tmp_path)
    proc = start_cli(got.get("workdir", tmp_path / "run"), *FAST, *got.get("flags", []),
                     config=got.get("config", "configs/tiny.py"), **got.get("env", {}))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("osp_jax.train:")]
    assert len(lines) == 1 and lines[0] == out.strip().splitlines()[-1], out[-3000:]
    assert named in lines[0], lines[0]
    assert _tree(tmp_path) == before  # no workdir, no cache, no temporary file made; inputs unchanged
    assert not os.path.exists(SYS)


def test_a_diverging_run_stops_with_one_line_and_exit_2(tmp_path):
    """train.max_bad_steps non-finite steps in a row (a learning rate of 1e30): exit 2, one line naming the key."""
    proc = start_cli(tmp_path / "run", *FAST, "--config.train.eval_every=0", "--config.train.steps=6",
                     "--config.optimizer.learning_rate=1e30", "--config.optimizer.muon_learning_rate=1e30",
                     "--config.optimizer.clip_norm=0", "--config.train.max_bad_steps=1")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("osp_jax.train: training error: ") and "train.max_bad_steps=1" in last, out[-3000:]


def test_data_without_a_validation_split_trains_when_nothing_is_evaluated(tmp_path):
    """--val-fraction=0 data (no validation documents) trains with train.eval_every=0 and outlier_every=0."""
    data = shutil.copytree(pipeline.resolve_data_dir("builtin"), tmp_path / "data")
    meta = json.loads((data / "metadata.json").read_text())
    meta["splits"]["validation"] = {"documents": 0, "tokens": 0, "shards": []}
    (data / "metadata.json").write_text(json.dumps(meta))
    proc = start_cli(tmp_path / "run", *FAST, f"--config.data.path={data}", "--config.train.eval_every=0")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
