"""Training curves from metrics.jsonl."""
import json

import pytest

from osp_jax import plot

pytest.importorskip("matplotlib")


def _write(workdir, records, extra_lines=()):
    workdir.mkdir()
    with open(workdir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_curves_of_two_runs(tmp_path, capsys):
    a, b = tmp_path / "adam", tmp_path / "osp"
    _write(a, [{"step": s, "loss": 8 - s / 10, "learning_rate": 1e-3, "kurtosis": 1.0 * s, "max_abs": 10.0 * s}
               for s in (10, 20, 30)] + [{"step": 20, "loss": 1.5, "learning_rate": 1e-3}],  # a resumed run
           extra_lines=['{"step": 40, "loss"'])  # cut off by a crash
    _write(b, [{"step": s, "loss": 7 - s / 10, "learning_rate": 1e-3, "val_loss": 7.0} for s in (10, 20, 30)])
    assert [r["loss"] for r in plot.read_metrics(str(a))] == [7.0, 1.5, 5.0]
    out = tmp_path / "curves.png"
    assert plot.main([f"--workdir={a}", f"--compare={b}", f"--output={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not JSON" in capsys.readouterr().err


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    assert plot.main([f"--workdir={tmp_path}"]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
