"""What a pod run needs besides the model: JAX's persistent compilation cache (train.compilation_cache_dir),
a profiler trace of chosen steps (train.profile_steps), Weights & Biases (train.wandb_project)."""
import gzip
import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from osp_jax import cli, compilation_cache
from osp_jax import config as config_lib
from osp_jax.profiling import StepProfiler
from tests.conftest import require
from tests.helpers import load_recipe
from tests.test_train import read_metrics, start_cli

COMPILED = re.compile(r"compiled the train step in ([0-9.]+) s")


@pytest.fixture
def restore_compilation_cache():
    """Puts jax's compilation cache back as it was: train() turns it on for the whole process."""
    before = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    yield
    compilation_cache.enable(before)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value,fragment", [
    ("train.profile_steps", "5", "'START:STOP' with integers"),
    ("train.profile_steps", "a:b", "'START:STOP' with integers"),
    ("train.profile_steps", "3:3", "0 <= START < STOP <= train.steps=200"),
    ("train.profile_steps", "100:201", "0 <= START < STOP <= train.steps=200"),
    ("mesh.dcn_dp", 0, "a positive number of slices"),
    ("mesh.dcn_fsdp", -1, "a positive number of slices"),
    ("train.compilation_cache_dir", None, "a value of type str"),
])
def test_new_keys_are_validated(key, value, fragment):
    config = config_lib.defaults()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{key}={value!r} is not allowed")) as e:
        config_lib.validate(config)
    assert fragment in str(e.value)


def test_profile_window_and_defaults(monkeypatch):
    assert config_lib.profile_window("") is None and config_lib.profile_window("100:103") == (100, 103)
    defaults = config_lib.defaults()
    assert defaults.train.profile_steps == "" and defaults.train.wandb_project == ""
    assert defaults.train.tensorboard  # TensorBoard stays the default sink
    assert defaults.mesh.dcn_dp == defaults.mesh.dcn_fsdp == 1
    defaults.train.wandb_project = None  # None turns W&B off too
    config_lib.validate(defaults)
    monkeypatch.setenv("OSP_JAX_CACHE", "/somewhere")  # the root the built-in corpus is cached under
    assert compilation_cache.default_dir() == "/somewhere/jax_compilation"
    monkeypatch.delenv("OSP_JAX_CACHE")
    assert compilation_cache.default_dir() == os.path.expanduser("~/.cache/osp_jax/jax_compilation")


def test_enable_sets_jax_and_turns_off(tmp_path, restore_compilation_cache, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.enable("~/cache") == str(tmp_path / "cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") and jax.config.jax_enable_compilation_cache
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation_cache.MIN_COMPILE_TIME_SECS
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == compilation_cache.MIN_ENTRY_SIZE_BYTES
    assert compilation_cache.enable("") is None
    assert jax.config.jax_compilation_cache_dir is None and not jax.config.jax_enable_compilation_cache
    (tmp_path / "a_file").write_text("")
    with pytest.raises(cli.UserError, match=r"compilation cache directory .*a_file/cache cannot be used"):
        compilation_cache.enable(tmp_path / "a_file" / "cache")


def test_cache_in_a_gs_directory(gcs_bucket, restore_compilation_cache):
    """jax reads and writes the cache through etils.epath: on the GCS emulator, a program compiled once
    is written there, and compiled again (jax's in-memory caches cleared) it is read back."""
    from etils import epath

    directory = f"{gcs_bucket}/jax_cache"
    assert compilation_cache.enable(directory) == directory
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # a small program is enough here
    events = []

    def listen(name, **kwargs):
        events.append(name)

    def f(x):
        return jnp.sin(x) @ jnp.cos(x).T + 17.0

    x = jnp.ones((8, 8))
    jax.monitoring.register_event_listener(listen)
    try:
        np.testing.assert_allclose(jax.jit(f)(x), f(x))
        entries = [p.name for p in epath.Path(directory).iterdir()]  # this process has not listed it before
        assert any(name.startswith("jit_f-") for name in entries), entries
        assert "/jax/compilation_cache/cache_hits" not in events
        jax.clear_caches()
        np.testing.assert_allclose(jax.jit(f)(x), f(x))
        assert "/jax/compilation_cache/cache_hits" in events
    finally:
        jax.monitoring.unregister_event_listener(listen)


# ------------------------------------------------------------------------------------------- profiling
class _FakeProfiler:
    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(jax.profiler, "start_trace", lambda d: self.calls.append(("start", d)))
        monkeypatch.setattr(jax.profiler, "stop_trace", lambda: self.calls.append(("stop",)))
        monkeypatch.setattr(jax, "block_until_ready", lambda x: self.calls.append(("block", x)) or x)


def _loop(profiler, start, stop):
    """The train loop's calls, step `start` to `stop`; the state is the step number."""
    with profiler:
        for step in range(start, stop):
            profiler.before(step)
            profiler.after(step + 1, step + 1)


def test_profiler_traces_exactly_the_window(monkeypatch):
    fake = _FakeProfiler(monkeypatch)
    t = config_lib.defaults().train
    t.profile_steps = "3:5"
    _loop(StepProfiler(t, "/w", start_step=0), 0, 10)
    # Started before the step from 3 to 4; stopped once the state at 5 is computed, not before.
    assert fake.calls == [("start", "/w/profile"), ("block", 5), ("stop",)]


def test_profiler_process_0_only_unless_asked_and_not_after_a_resume(monkeypatch):
    fake = _FakeProfiler(monkeypatch)
    t = config_lib.defaults().train
    t.profile_steps = "3:5"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _loop(StepProfiler(t, "/w", start_step=0), 0, 10)
    assert fake.calls == []
    t.profile_all_processes = True
    _loop(StepProfiler(t, "/w", start_step=0), 0, 10)
    assert [c[0] for c in fake.calls] == ["start", "block", "stop"]
    fake.calls.clear()
    _loop(StepProfiler(t, "/w", start_step=4), 4, 10)  # resumed inside the window: no half trace
    assert fake.calls == []


def test_profiler_stops_a_trace_left_open(monkeypatch):
    fake = _FakeProfiler(monkeypatch)
    t = config_lib.defaults().train
    t.profile_steps = "0:5"
    with pytest.raises(RuntimeError), StepProfiler(t, "/w", start_step=0) as profiler:
        profiler.before(0)
        raise RuntimeError("a step failed")
    assert fake.calls == [("start", "/w/profile"), ("stop",)]


# ------------------------------------------------------------- two starts of one run (CLI, subprocesses)
TINY = ["--config.train.steps=3", "--config.optimizer.warmup_steps=1", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.outlier_every=0", "--config.train.checkpoint_every=0",
        "--config.train.profile_steps=1:3"]


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory):
    """The tiny config trained twice into fresh workdirs, one compilation cache: (outputs, workdirs,
    cache entries after each start)."""
    root = tmp_path_factory.mktemp("two_starts")
    cache = root / "cache"
    outputs, entries = [], []
    for i in range(2):
        proc = start_cli(root / f"run{i}", *TINY, f"--config.train.compilation_cache_dir={cache}")
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
        entries.append(sorted(os.listdir(cache)))
    return outputs, [root / "run0", root / "run1"], entries


@pytest.mark.slow
def test_second_start_loads_the_compiled_steps_from_the_cache(two_starts):
    outputs, workdirs, entries = two_starts
    assert any(name.startswith("jit_train_step-") for name in entries[0]), entries[0]
    assert entries[1] == entries[0]  # every program of the second start was found there
    first, second = (float(COMPILED.search(out).group(1)) for out in outputs)
    print(f"\nfirst step (train step compiled): {first:.1f} s; second start (loaded): {second:.1f} s")
    assert second < first / 2
    assert [r["loss"] for r in read_metrics(workdirs[0])] == [r["loss"] for r in read_metrics(workdirs[1])]


@pytest.mark.slow
def test_profile_steps_writes_a_trace_of_those_steps(two_starts):
    outputs, workdirs, _ = two_starts
    assert "profiling steps 2-3 into" in outputs[0]
    runs = list((workdirs[0] / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    (xplane,) = runs[0].glob("*.xplane.pb")  # the file TensorBoard's profile plugin and XProf open
    assert xplane.stat().st_size > 0
    (trace,) = runs[0].glob("*.trace.json.gz")
    events = [e for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
              if "train_step" in str(e.get("name", "")) and e.get("ph") == "X"]
    # The two steps of the window, each an outer event (the profiler nests a second one in each call).
    outer = [e for e in events if not any(o is not e and o["ts"] <= e["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"]
                                          for o in events)]
    assert len(outer) == 2, events


# ----------------------------------------------------------------------------------------------- W&B
def wandb_records(path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_logs_what_metrics_jsonl_logs_and_a_resume_continues_the_run(tmp_path, monkeypatch,
                                                                           restore_compilation_cache):
    require("wandb")
    import wandb

    from osp_jax import train as train_lib

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb_files", "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_CONSOLE": "off",
                       "WANDB_ERROR_REPORTING": "false"}.items():
        monkeypatch.setenv(key, str(value))
    cfg = load_recipe("tiny")
    cfg.model.dim, cfg.model.layers, cfg.model.ffn_dim = 64, 2, 176
    cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.log_every = 64, 8, 2
    cfg.train.eval_every, cfg.train.outlier_every, cfg.train.checkpoint_every = 4, 4, 4
    cfg.train.steps, cfg.optimizer.warmup_steps = 4, 2
    cfg.train.compilation_cache_dir = ""
    cfg.train.wandb_project = "osp-jax-test"
    workdir = tmp_path / "run"
    try:
        train_lib.train(cfg, str(workdir))
        run_id = (workdir / "wandb_run_id").read_text().strip()
        cfg.train.steps = 6  # the same workdir: resumed from step 4
        train_lib.train(cfg, str(workdir))
    finally:
        wandb.teardown()
    assert (workdir / "wandb_run_id").read_text().strip() == run_id

    files = sorted((tmp_path / "wandb_files" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # two starts, one W&B run
    history, configs = {}, []
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "run":
                assert record.run.run_id == run_id and record.run.project == "osp-jax-test"
                configs.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.run.config.update})
    assert [c["train"]["steps"] for c in configs] == [4, 6]  # the resolved config of each start
    assert configs[1]["model"] == cfg.to_dict()["model"]

    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == sorted(history) == [2, 4, 6]
    for row in rows:
        expected = {}
        for key, value in row.items():
            if isinstance(value, list):
                expected.update({f"{key}/{i}": v for i, v in enumerate(value)})
            elif value is not None and key != "step":
                expected[key] = value
        logged = history[row["step"]]
        assert set(logged) == set(expected), (row["step"], set(logged) ^ set(expected))
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-6), key
    assert "val_loss" in history[4] and "kurtosis_per_layer/0" in history[4]


class _FakeWandb:
    """The part of the wandb module WandbSink uses: init() -> a run with id, step, log(), finish()."""

    def __init__(self, step=0, fail=None):
        self.inits, self.logged, self.finished, self.step, self.fail = [], [], [], step, fail

    def init(self, **kwargs):
        if self.fail:
            raise self.fail
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs["id"]
            step = fake.step

            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self, exit_code):
                fake.finished.append(exit_code)

        return Run()


def test_wandb_sink_keeps_the_run_id_and_logs_the_records_numbers(tmp_path, monkeypatch):
    """Without wandb installed (a stand-in module): the id written once to WORKDIR/wandb_run_id and passed
    with resume="allow" at every start; the numbers MetricWriter logs; steps below the W&B run's last one
    left out; failures reported to W&B; an init that fails is one UserError line."""
    import sys

    from osp_jax.metrics import MetricWriter

    monkeypatch.delenv("WANDB_DIR", raising=False)
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    workdir = tmp_path / "run"
    with MetricWriter(str(workdir), tensorboard=False, enabled=True, wandb_project="p", run_config={"a": 1}) as w:
        w.write(2, {"loss": np.asarray(1.5, np.float32), "per_layer": np.array([1.0, 2.0]), "tokens_per_sec": None,
                    "grad_norm": float("nan")})
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert fake.inits == [{"project": "p", "id": run_id, "resume": "allow", "config": {"a": 1}, "name": "run",
                           "dir": str(workdir)}]
    ((step, values),) = fake.logged
    assert step == 2 and set(values) == {"loss", "per_layer/0", "per_layer/1", "grad_norm"}
    assert values["loss"] == 1.5 and values["per_layer/1"] == 2.0 and np.isnan(values["grad_norm"])
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [2]

    fake.step = 4  # the resumed W&B run had logged up to step 4; this start trains from step 2 again
    with pytest.raises(RuntimeError), MetricWriter(str(workdir), tensorboard=False, enabled=True,
                                                   wandb_project="p") as w:
        w.write(2, {"loss": 1.0})
        w.write(6, {"loss": 0.5})
        raise RuntimeError("training failed")
    assert fake.inits[1]["id"] == run_id and fake.logged[1:] == [(6, {"loss": 0.5})]
    assert fake.finished == [0, 1]

    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail=RuntimeError("api_key not configured")))
    with pytest.raises(cli.UserError, match=rf"wandb_project='p': W&B could not start run {run_id}: api_key not"):
        MetricWriter(str(workdir), tensorboard=False, enabled=True, wandb_project="p")


def test_unusable_settings_stop_before_any_work(tmp_path, monkeypatch, restore_compilation_cache):
    """An unusable cache directory, or W&B asked for but not installed: one line, exit 2, before the data
    is opened or the workdir made."""
    import importlib.util
    import subprocess
    import sys

    from osp_jax import train as train_lib
    from tests.helpers import ROOT

    (tmp_path / "a_file").write_text("")
    cfg = load_recipe("tiny")
    cfg.train.compilation_cache_dir = str(tmp_path / "a_file" / "cache")
    with pytest.raises(cli.UserError, match="compilation cache directory"):
        train_lib.train(cfg, str(tmp_path / "run"))
    cfg.train.compilation_cache_dir, cfg.train.wandb_project = "", "p"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(config_lib.ConfigError, match=r"wandb_project='p' needs the wandb package"):
        train_lib.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()

    (tmp_path / "run").mkdir()  # evaluate checks its workdir first: one there, so the cache is what is refused
    proc = subprocess.run([sys.executable, "-m", "osp_jax.evaluate", f"--workdir={tmp_path / 'run'}", "--data=builtin",
                           f"--compilation-cache-dir={tmp_path / 'a_file' / 'cache'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("osp_jax.evaluate: error: compilation cache directory"), proc.stderr
