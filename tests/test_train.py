"""The training CLI end to end: files written, loss falls. (Muon against AdamW, a research claim, is
experiments/muon_vs_adamw.py.)"""
import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def cli_env(devices: int = 1, **extra) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.update(extra)
    return env


def start_cli(workdir, *flags, config="configs/tiny.py", devices=1, cwd=ROOT, **env):
    cmd = [sys.executable, "-m", "osp_jax.train", f"--config={ROOT / config}", f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=cwd, env=cli_env(devices, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_cli_trains_writes_its_files_and_the_loss_falls(tmp_path):
    flags = ["--config.train.steps=60", "--config.train.eval_every=30", "--config.train.outlier_every=30"]
    # A relative --workdir, as in the README (run from tmp_path).
    proc = start_cli("run", *flags, cwd=tmp_path)  # the recipe's optimizer: Muon
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]

    workdir = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "tokenizer.json", "data_metadata.json"):
        assert (workdir / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 60
    assert "step 60/60" in out and "tok/s" in out and "ETA" in out
    assert "this run is 0.044 epoch of builtin's training split" in out  # 60 x 16 x 128 tokens

    records = read_metrics(workdir)
    for key in ("step", "loss", "learning_rate", "tokens_per_sec", "mfu"):
        assert all(key in r for r in records), key
    assert records[-1]["tokens_per_sec"] > 0
    assert "val_loss" in records[-1] and "kurtosis_per_layer" in records[-1]
    assert len(records[-1]["kurtosis_per_layer"]) == 5  # embedding + 4 layers
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"


def test_a_gs_workdir_without_credentials_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """No emulator and no credentials: google-auth finds none without reaching the network (no metadata server
    is asked), and train stops at the workdir's lock, before the data or the mesh."""
    import pytest

    from osp_jax import cli
    from osp_jax import train as train_lib
    from tests.helpers import load_recipe

    for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    with pytest.raises(cli.UserError, match="--workdir=gs://bucket/run: cannot write there: no usable Google "
                                            "Cloud credentials"):
        train_lib.train(load_recipe("tiny"), "gs://bucket/run")


def test_a_run_past_one_epoch_is_flagged(caplog):
    import logging

    from osp_jax import run_setup

    with caplog.at_level(logging.INFO, logger="osp_jax"):
        assert run_setup.log_epochs(3_000, 1_000, "DATA") == 3.0
    (record,) = [r for r in caplog.records if "epochs of DATA" in r.getMessage()]
    assert record.levelno == logging.WARNING and "memorisation" in record.getMessage()


def test_mesh_sizes_that_do_not_divide_are_config_errors():
    """Checked when the mesh is made, before compiling (an IndivisibleError after it, exit 1, before)."""
    import pytest

    from osp_jax import sharding
    from osp_jax.train import check_mesh_fits
    from tests.helpers import load_recipe

    def check(**keys):
        cfg = load_recipe("tiny")
        for key, value in keys.items():
            section, name = key.split("__")
            cfg[section][name] = value
        check_mesh_fits(cfg, sharding.make_mesh(cfg.mesh))

    check()
    check(mesh__tp=2)
    check(optimizer__grad_accum_steps=2)
    for keys, message in [
        (dict(train__global_batch_size=12), r"config.train.global_batch_size=12 .* multiple of 8, .* mesh.dp=1 \* "
                                            r"mesh.op=1 \* mesh.fsdp=8"),
        (dict(mesh__tp=8, mesh__fsdp=1, model__heads=8, model__kv_heads=4), r"config.model.kv_heads=4 .* mesh.tp=8"),
        (dict(mesh__tp=2, model__vocab_size=4097), r"config.model.vocab_size=4097 .* multiple of 2"),
        (dict(model__dim=68, model__heads=2, model__kv_heads=2), r"config.model.dim=68 .* mesh.fsdp=8"),
        # 16 rows in 4 micro-batches of 4: half the fsdp=8 devices would compute padding
        (dict(optimizer__grad_accum_steps=4), r"config.optimizer.grad_accum_steps=4 .* micro-batches of 4 rows "
                                              r".* multiple of 8"),
    ]:
        with pytest.raises(sharding.MeshError, match=message):
            check(**keys)


def test_cli_batch_that_does_not_divide_over_the_mesh_exits_2(tmp_path):
    proc = start_cli(tmp_path / "run", "--config.train.global_batch_size=12", devices=8)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("osp_jax.train: config error: config.train.global_batch_size=12")
    assert not (tmp_path / "run").exists()


def test_a_workdir_tokenizer_that_is_not_the_datas_is_refused(tmp_path):
    import pytest

    from osp_jax import run_setup
    from osp_jax import train as train_lib
    from osp_jax.data import pipeline
    from tests.helpers import load_recipe

    cfg = load_recipe("tiny")
    cfg.train.steps, cfg.optimizer.warmup_steps = 1, 0
    data_dir = pipeline.resolve_data_dir("builtin")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"tokenizer {workdir / 'tokenizer.json'} is not the data's "
                                         f"{os.path.join(data_dir, 'tokenizer.json')}"):
        train_lib.train(cfg, str(workdir))
    assert sorted(os.listdir(workdir)) == ["tokenizer.json"]
    (workdir / "tokenizer.json").write_bytes(open(os.path.join(data_dir, "tokenizer.json"), "rb").read())
    run_setup.check_tokenizer(data_dir, str(workdir))  # the same file: accepted
    (workdir / "tokenizer.json").unlink()  # no file, but the run's data_metadata.json records another one
    (workdir / "data_metadata.json").write_text(json.dumps({"tokenizer": "tokenizer.json", "tokenizer_sha256": "0"}))
    with pytest.raises(ValueError, match="the one .*data_metadata.json records"):
        run_setup.check_tokenizer(data_dir, str(workdir))


def test_eval_data_vocabulary_is_checked(tmp_path):
    import pytest

    from osp_jax import train as train_lib
    from tests.helpers import load_recipe

    (tmp_path / "metadata.json").write_text(json.dumps({"vocab_size": 100000, "eos_id": 0, "dtype": "uint32",
                                                        "splits": {}}))
    cfg = load_recipe("tiny")
    cfg.train.eval_data = str(tmp_path)
    with pytest.raises(ValueError, match=f"train.eval_data={tmp_path}: .* vocabulary 100000 .* vocab_size is 4096"):
        train_lib.make_data(cfg, None)


def test_validation_is_one_finite_pass_warned_when_the_split_is_short(caplog):
    """train.eval_batches beyond what the validation split fills: every validation token is read once, in the
    split's order (never wrapped round to be read again), the last batch padded, and a warning gives the
    split's size."""
    import logging

    import numpy as np

    from osp_jax import train as train_lib
    from osp_jax.data import pipeline
    from tests.helpers import load_recipe
    from tests.test_data import records, stream

    cfg = load_recipe("tiny")
    cfg.train.eval_batches = 1000
    with caplog.at_level(logging.WARNING, logger="osp_jax"):
        train_iter, batches, data_dir = train_lib.make_data(cfg, None)
    train_iter.close()
    assert 0 < len(batches) < 1000
    np.testing.assert_array_equal(stream(batches), np.concatenate(records(data_dir, "validation")))
    assert (batches[-1]["segment_ids"] == 0).any()
    split = pipeline.load_metadata(data_dir)["splits"]["validation"]
    (message,) = [r.getMessage() for r in caplog.records if "train.eval_batches=1000" in r.getMessage()]
    assert f"({split['documents']} documents, {split['tokens']:,} tokens) fills only {len(batches)} batch" in message
