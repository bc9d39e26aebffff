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


def test_a_restart_sets_aside_the_rows_it_will_log_again(tmp_path):
    """Rows past the step a run resumes from (an earlier attempt's, trained again) and a line cut off by a
    crash move to metrics.abandoned.jsonl, appended; the rows up to that step stay, in order."""
    from osp_jax.metrics import MetricWriter, progress_line

    run = tmp_path / "run"
    _write(run, [{"step": s, "loss": 9.0 - s} for s in (1, 2, 3, 4)], extra_lines=['{"step": 5, "lo'])
    (run / "metrics.abandoned.jsonl").write_text('{"step": 9, "loss": 0.5}\n')
    writer = MetricWriter(str(run), tensorboard=False, enabled=True, start_step=2)
    writer.write(3, {"loss": 1.0, "tokens_per_sec": None})
    writer.close()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 8.0), (2, 7.0), (3, 1.0)]
    assert rows[-1]["tokens_per_sec"] is None
    moved = (run / "metrics.abandoned.jsonl").read_text().splitlines()
    assert moved == ['{"step": 9, "loss": 0.5}', '{"step": 3, "loss": 6.0}', '{"step": 4, "loss": 5.0}',
                     '{"step": 5, "lo']
    # the first step after a start is mostly compilation: no throughput figure, said so
    line = progress_line(3, 10, {"loss": 1.0, "learning_rate": 1e-3, "tokens_per_sec": None, "mfu": None,
                                 "eta_seconds": None})
    assert "n/a tok/s" in line and "ETA n/a" in line
