"""gs:// end to end on the GCS emulator (tests/gcs_emulator.py): prepare, train, SIGKILL, resume, evaluate, export
and import, every path a gs:// one, and nothing reaching the internet."""
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_resume import SMALL, _finish, _wait_for
from tests.test_train import start_cli


def test_epath_and_orbax_read_and_write_on_the_emulator(gcs_bucket):
    import orbax.checkpoint as ocp
    from etils import epath

    from osp_jax import cli

    run = epath.Path(gcs_bucket) / "run"
    cli.write_json(run / "a.json", {"x": 1.5, "nan": float("nan")})
    assert cli.read_json(run / "a.json") == {"x": 1.5, "nan": None}
    assert [p.name for p in run.iterdir()] == ["a.json"]

    with ocp.CheckpointManager(run / "ckpt", options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(6.0)})))
        mngr.wait_until_finished()
        target = {"w": jax.ShapeDtypeStruct((6,), jnp.float32)}
        restored = mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    np.testing.assert_array_equal(restored.state["w"], np.arange(6.0))


def _read_metrics(workdir: str) -> list[dict]:
    from etils import epath

    return [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _prepare(data: str) -> None:
    from osp_jax.data import pipeline, prepare

    corpus, tok = pipeline.builtin_files()
    assert prepare.main(["--input", corpus, "--output", data, "--tokenizer", tok, "--val-fraction", "0.05",
                         "--quiet"]) == 0


@pytest.mark.slow
def test_prepare_train_kill_resume_evaluate_export_and_import_on_gcs(gcs_emulator, gcs_bucket, tmp_path, capsys):
    from osp_jax import evaluate, export

    bucket = gcs_bucket
    data, straight, killed = f"{bucket}/data", f"{bucket}/straight", f"{bucket}/killed"
    _prepare(data)
    assert "data/metadata.json" in gcs_emulator.objects(bucket, "data/")

    # The shards are read from gs:// by array_record itself; the schedule must not depend on train.steps.
    fixed = [*SMALL, "--config.optimizer.decay_steps=12", f"--config.data.path={data}"]
    runs = [start_cli(straight, *fixed, "--config.train.steps=12") for _ in range(2)]  # two at once: one trains
    victim = start_cli(killed, *fixed, "--config.train.steps=100000")
    commit = "killed/checkpoints/6/commit_success.txt"
    _wait_for(lambda: commit in gcs_emulator.objects(bucket, "killed/checkpoints/6/"), victim, timeout=600)
    victim.send_signal(signal.SIGKILL)  # no handler runs: its lock object stays behind
    victim.wait()
    assert "killed/train.lock" in gcs_emulator.objects(bucket, "killed/")
    # Step 12's save may have begun (its first objects) but not finished: the rerun resumes from step 6.
    assert "killed/checkpoints/12/commit_success.txt" not in gcs_emulator.objects(bucket, "killed/checkpoints/")

    outs = [p.communicate(timeout=900)[0] for p in runs]
    refused = [o for p, o in zip(runs, outs) if p.returncode == 2]
    assert len(refused) == 1 and sorted(p.returncode for p in runs) == [0, 2], [o[-2000:] for o in outs]
    assert "error: the workdir is in use: gs://" in refused[0] and "train.lock is held by host" in refused[0]
    out = _finish(start_cli(killed, *fixed, "--config.train.steps=12"))
    assert "resumed from step 6" in out and "took over the stale lock" in out

    a = {r["step"]: r["loss"] for r in _read_metrics(straight)}
    rows = _read_metrics(killed)
    assert [r["step"] for r in rows] == list(range(1, 13)) == sorted(a)  # one history: no row twice
    assert [r["loss"] for r in rows] == [a[s] for s in range(1, 13)]  # bit-identical losses
    names = gcs_emulator.objects(bucket, "killed/")
    assert "killed/metrics.abandoned.jsonl" in names and "killed/train.lock" not in names
    assert any(n.startswith("killed/tensorboard/events.out.tfevents") for n in names)
    assert {"killed/config.json", "killed/tokenizer.json", "killed/data_metadata.json"} <= set(names)

    # evaluate and export read the gs:// workdir and write gs:// outputs.
    assert evaluate.main([f"--workdir={killed}", f"--data={data}", "--bits=4,4,16", "--max-tokens=512",
                          "--batch-size=2", "--seq-len=64", f"--output={bucket}/eval/e.json",
                          f"--plot={bucket}/eval/e.png", "--compilation-cache-dir="]) == 0
    from osp_jax import cli
    result = cli.read_json(f"{bucket}/eval/e.json")
    assert result["step"] == 12 and result["workdir"] == killed and np.isfinite(result["ppl"])
    assert "eval/e.png" in gcs_emulator.objects(bucket, "eval/")

    local = tmp_path / "hf"
    assert export.main([f"--workdir={killed}", f"--output={local}"]) == 0
    assert export.main([f"--workdir={killed}", f"--output={bucket}/hf"]) == 0
    hf = {n.removeprefix("hf/") for n in gcs_emulator.objects(bucket, "hf/")}
    assert hf == {p.name for p in local.iterdir()}
    from etils import epath
    for name in hf:  # the same bytes as an export to a local disk
        assert (epath.Path(bucket) / "hf" / name).read_bytes() == (local / name).read_bytes(), name
    capsys.readouterr()
    assert export.main([f"--workdir={killed}", f"--output={bucket}/hf"]) != 0  # never overwritten unasked
    assert f"--output={bucket}/hf is not empty" in capsys.readouterr().err

    assert export.main([f"--from-hf={bucket}/hf", f"--workdir={bucket}/imported", "--step=12"]) == 0
    imported = gcs_emulator.objects(bucket, "imported/")
    assert "imported/checkpoints/12/commit_success.txt" in imported and "imported/config.json" in imported


@pytest.mark.slow
def test_a_save_cut_off_by_the_storage_going_away_is_never_taken_for_a_checkpoint(tmp_path):
    """An emulator of its own, keeping its objects on disk, is killed as soon as the first object of step 4
    appears (its commit file comes about 0.4 s later), then the trainer; started again on the same objects, it
    serves an unfinished step 4, which is not listed as complete, and the next run falls back to step 2 and
    sets step 4 aside before saving it again."""
    import subprocess
    import sys

    from tests.gcs_emulator import GcsEmulator
    from tests.test_train import ROOT, cli_env

    emulator = GcsEmulator(root=str(tmp_path / "objects")).start()
    try:
        bucket = emulator.make_bucket("cut-off")
        env = {**emulator.env(), "PYTHONPATH": str(ROOT)}
        flags = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.outlier_every=0",
                 "--config.train.checkpoint_every=2", "--config.optimizer.warmup_steps=2"]
        run = f"{bucket}/run"
        victim = start_cli(run, *flags, "--config.train.steps=100000", **env)
        _wait_for(lambda: emulator.objects(bucket, "run/checkpoints/4/"), victim, timeout=600)
        emulator.kill()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        emulator.start()
        step4 = emulator.objects(bucket, "run/checkpoints/4/")
        assert step4 and "run/checkpoints/4/commit_success.txt" not in step4, step4  # cut off mid-save

        listing = subprocess.run(
            [sys.executable, "-c", "import sys; from osp_jax.checkpoint import steps; d = steps.absolute(sys.argv[1]); "
             "print(steps.complete_steps(d), steps.unfinished_steps(d))", f"{run}/checkpoints"],
            env=cli_env(**env), capture_output=True, text=True, timeout=300)
        assert listing.stdout.strip() == "[2] [4]", listing.stdout + listing.stderr[-2000:]
        out = _finish(start_cli(run, *flags, "--config.train.steps=6", **env))
        assert "resumed from step 2" in out and "checkpoint step 4" in out and "moved it aside" in out, out[-3000:]
        names = emulator.objects(bucket, "run/checkpoints/")
        assert "run/checkpoints/4/commit_success.txt" in names and "run/checkpoints/6/commit_success.txt" in names
        assert any(n.startswith("run/checkpoints/4.unreadable-") for n in names)
    finally:
        emulator.stop()
