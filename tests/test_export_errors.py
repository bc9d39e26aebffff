"""`python -m osp_jax.export`'s bad-input battery: every output it would write and every input file it reads,
broken as a user might break it, in both directions. Each case: exit code 2, one line on stderr naming the
flag or file and why, no traceback, and nothing left behind (no output, no staging directory, no parent made)."""
import json
import os
import shutil

import pytest

from tests.test_export import ex, small_run, tokenizer_file  # noqa: F401 - module fixtures

SYS = "/sys/osp_jax_battery"  # a directory no one can create entries in, even root (sysfs)


@pytest.fixture(scope="module")
def hf_src(small_run, tmp_path_factory):  # noqa: F811 - the fixture imported above
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert ex.main([f"--workdir={small_run}", f"--output={out}", "--dtype=float32"]) == 0
    return out


def _run_copy(small_run, tmp):  # noqa: F811
    run = tmp / "run"
    shutil.copytree(small_run, run)
    return run


def _hf_copy(hf_src, tmp):
    hf = tmp / "hf"
    shutil.copytree(hf_src, hf)
    return hf


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


EMPTY, NOT_UTF8, TRUNCATED = b"", b'{"a": "\xff\xfe"}', b'{"tokenizer": "tokenizer.json", "eos'


def _export(t, run, out=None, *extra):
    return [f"--workdir={run}", f"--output={out or t / 'out'}", *extra]


def _import(t, hf, workdir=None):
    return [f"--from-hf={hf}", f"--workdir={workdir or t / 'imported'}"]


# (id, setup(tmp, small_run, hf_src) -> argv, what the line must name)
CASES = [
    ("output-is-a-file", lambda t, r, h: _export(t, r, _write(t / "out", b"x")), "out exists and is not a directory"),
    ("output-parent-is-a-file", lambda t, r, h: _export(t, r, _write(t / "f", b"x") / "out"),
     "is a file, not a directory"),
    ("output-not-writable", lambda t, r, h: _export(t, r, f"{SYS}/out"), "is not writable"),
    ("workdir-missing", lambda t, r, h: _export(t, t / "nowhere"), "nowhere is not a directory"),
    ("workdir-is-a-file", lambda t, r, h: _export(t, _write(t / "run", b"x")), "run is not a directory"),
    ("data-metadata-empty", lambda t, r, h: _export(t, _broken(r, t, "data_metadata.json", EMPTY)),
     "data_metadata.json is empty"),
    ("data-metadata-not-utf8", lambda t, r, h: _export(t, _broken(r, t, "data_metadata.json", NOT_UTF8)),
     "data_metadata.json is not UTF-8"),
    ("data-metadata-truncated", lambda t, r, h: _export(t, _broken(r, t, "data_metadata.json", TRUNCATED)),
     "data_metadata.json is not valid JSON (truncated"),
    ("tokenizer-empty", lambda t, r, h: _export(t, _broken(r, t, "tokenizer.json", EMPTY)), "tokenizer.json"),
    ("tokenizer-truncated", lambda t, r, h: _export(t, _broken(r, t, "tokenizer.json", TRUNCATED)),
     "tokenizer.json"),
    ("config-empty", lambda t, r, h: _export(t, _without_saved_config(r, t, EMPTY)), "config.json is empty"),
    ("config-not-utf8", lambda t, r, h: _export(t, _without_saved_config(r, t, NOT_UTF8)),
     "config.json is not UTF-8"),
    ("checkpoint-truncated", lambda t, r, h: _export(t, _truncated_checkpoint(r, t)), "could be restored"),
    ("bad-shard-size", lambda t, r, h: _export(t, r, None, "--max-shard-size=lots"), "--max-shard-size='lots'"),
    ("hf-missing", lambda t, r, h: _import(t, t / "nowhere"), "nowhere is not a directory"),
    ("hf-config-empty", lambda t, r, h: _import(t, _broken(h, t, "config.json", EMPTY, hf=True)),
     "config.json is empty"),
    ("hf-config-not-utf8", lambda t, r, h: _import(t, _broken(h, t, "config.json", NOT_UTF8, hf=True)),
     "config.json is not UTF-8"),
    ("hf-config-truncated", lambda t, r, h: _import(t, _broken(h, t, "config.json", TRUNCATED, hf=True)),
     "config.json is not valid JSON"),
    ("safetensors-empty", lambda t, r, h: _import(t, _broken(h, t, "model.safetensors", EMPTY, hf=True)),
     "model.safetensors is empty"),
    ("safetensors-truncated", lambda t, r, h: _import(t, _cut(h, t, "model.safetensors")), "model.safetensors"),
    ("safetensors-garbage", lambda t, r, h: _import(t, _broken(h, t, "model.safetensors", b"\x00" * 64, hf=True)),
     "model.safetensors is not a safetensors file"),
    ("index-truncated", lambda t, r, h: _import(t, _index_only(h, t, TRUNCATED)),
     "model.safetensors.index.json is not valid JSON"),
    ("hf-tokenizer-truncated", lambda t, r, h: _import(t, _broken(h, t, "tokenizer.json", TRUNCATED, hf=True)),
     "tokenizer.json"),
    ("generation-config-empty", lambda t, r, h: _import(t, _broken(h, t, "generation_config.json", EMPTY, hf=True)),
     "generation_config.json is empty"),
    ("import-workdir-is-a-file", lambda t, r, h: _import(t, h, _write(t / "w", b"x")),
     "w exists and is not a directory"),
    ("import-workdir-parent-is-a-file", lambda t, r, h: _import(t, h, _write(t / "f", b"x") / "w"),
     "is a file, not a directory"),
    ("import-workdir-not-writable", lambda t, r, h: _import(t, h, f"{SYS}/w"), "is not writable"),
]


def _broken(src, t, name, data: bytes, hf=False):
    copy = _hf_copy(src, t) if hf else _run_copy(src, t)
    (copy / name).write_bytes(data)
    return copy


def _without_saved_config(small_run, t, data: bytes):  # noqa: F811
    """A run whose checkpoint keeps no config, so export reads WORKDIR/config.json: `data`."""
    run = _run_copy(small_run, t)
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step / "config")
    (run / "config.json").write_bytes(data)
    return run


def _truncated_checkpoint(small_run, t):  # noqa: F811
    run = _run_copy(small_run, t)
    for path in (run / "checkpoints").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the arrays' files
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return run


def _cut(hf_src, t, name):
    hf = _hf_copy(hf_src, t)
    (hf / name).write_bytes((hf / name).read_bytes()[: (hf / name).stat().st_size // 2])
    return hf


def _index_only(hf_src, t, data: bytes):
    hf = _hf_copy(hf_src, t)
    os.remove(hf / "model.safetensors")
    (hf / "model.safetensors.index.json").write_bytes(data)
    return hf


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case,setup,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_2_and_leaves_nothing(case, setup, named, small_run, hf_src, tmp_path,  # noqa: F811
                                                               capsys):
    argv = setup(tmp_path, small_run, hf_src)
    if any(SYS in a for a in argv) and not os.path.isdir("/sys"):
        pytest.skip("no /sys to stand for an unwritable directory")
    before = _tree(tmp_path)
    capsys.readouterr()
    assert ex.main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("osp_jax.export: error: ") and named in err, err
    assert _tree(tmp_path) == before  # no output, no staging directory, no parent made
    assert not os.path.exists(SYS)


def test_a_bom_is_read_through_and_a_missing_parent_is_made(small_run, hf_src, tmp_path):  # noqa: F811
    """A UTF-8 BOM (editors write one) is no error in a JSON input; a missing parent of --output is made."""
    run = _run_copy(small_run, tmp_path)
    meta = run / "data_metadata.json"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    assert ex.main(_export(tmp_path, run, tmp_path / "new" / "parent" / "out")) == 0
    hf = _hf_copy(hf_src, tmp_path)
    (hf / "config.json").write_bytes(b"\xef\xbb\xbf" + (hf / "config.json").read_bytes())
    assert ex.main(_import(tmp_path, hf)) == 0
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["model"]["dim"] > 0
