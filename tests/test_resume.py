"""Never lose a run: exact resume after SIGKILL, SIGTERM saves, NaN steps, restore onto another mesh."""
import re
import signal
import socket
import time

import jax
import numpy as np
import pytest

from osp_jax import checkpoint
from tests.helpers import load_recipe
from tests.test_train import read_metrics, start_cli

SMALL = ["--config.model.dim=64", "--config.model.layers=2", "--config.model.ffn_dim=128",
         "--config.train.seq_len=64", "--config.train.global_batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.outlier_every=0", "--config.train.checkpoint_every=6",
         "--config.optimizer.warmup_steps=2"]


def _finish(proc, timeout=600):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}  # a re-run step keeps its last value


def _wait_for(predicate, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def _params(workdir, step):
    got_step, params, _ = checkpoint.restore_params_only(str(workdir), step=step)
    assert got_step == step
    return params


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_exact_resume_after_sigkill(tmp_path):
    """N steps straight == N/2 steps, SIGKILL, resume to N: same loss at every step, same parameters."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    fixed = [*SMALL, "--config.optimizer.decay_steps=12"]  # the schedule must not depend on train.steps
    victim = start_cli(killed, *fixed, "--config.train.steps=100000")
    _wait_for(lambda: (killed / "checkpoints" / "6" / "commit_success.txt").exists(), victim)
    victim.send_signal(signal.SIGKILL)  # not polite: no handler runs
    victim.wait()
    assert not (killed / "checkpoints" / "12").exists()
    runs = [start_cli(straight, *fixed, "--config.train.steps=12"),
            start_cli(killed, *fixed, "--config.train.steps=12")]
    _finish(runs[0])
    assert "resumed from step 6" in _finish(runs[1])

    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == list(range(1, 13)) and set(range(1, 13)) <= set(b)
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)], (a, b)  # bit-identical losses
    # one history: the rows the killed attempt logged past step 6 were moved aside, not repeated
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[6]["tokens_per_sec"] is None and rows[7]["tokens_per_sec"] > 0  # step 7 waited for compiling
    jax.tree.map(np.testing.assert_array_equal, _params(straight, 12), _params(killed, 12))


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    proc = start_cli(workdir, *SMALL, "--config.train.steps=100000", "--config.train.checkpoint_every=1000")
    _wait_for(lambda: (workdir / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    steps = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=1000, keep=3).all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
    assert f"stopped by SIGTERM at step {steps[0]}, saved" in out


@pytest.mark.slow  # two CLI runs on 8 and 4 devices: about 30 s on 2 otherwise idle cores
def test_restore_onto_a_different_mesh(tmp_path):
    workdir = tmp_path / "run"
    _finish(start_cli(workdir, *SMALL, "--config.train.steps=6", "--config.mesh.fsdp=8", devices=8))
    out = _finish(start_cli(workdir, *SMALL, "--config.train.steps=8", "--config.mesh.fsdp=4", devices=4))
    assert "resumed from step 6" in out
    assert max(_losses(workdir)) == 8


@pytest.mark.slow  # three CLI runs: about 20 s on 2 otherwise idle cores
def test_resume_switches_between_scanned_and_unrolled_layers(tmp_path):
    """A run checkpointed with its layers stacked (the default) goes on unrolled (the faster layout on
    one H100), then stacked again: each resume moves the layer stacks, optimizer state included."""
    workdir = tmp_path / "run"
    _finish(start_cli(workdir, *SMALL, "--config.train.steps=6"))
    out = _finish(start_cli(workdir, *SMALL, "--config.train.steps=8", "--config.model.scan_layers=False"))
    assert "resumed from step 6" in out and "has its layers stacked; moved to one module each" in out
    unrolled = _params(workdir, 8)
    assert "layers" not in unrolled and set(unrolled["layers_1"]) == {"attn", "attn_norm", "mlp", "mlp_norm"}
    out = _finish(start_cli(workdir, *SMALL, "--config.train.steps=10"))
    assert "resumed from step 8" in out and "has its layers unrolled; moved to a stack" in out
    assert max(_losses(workdir)) == 10 and all(np.isfinite(list(_losses(workdir).values())))
    stacked = _params(workdir, 10)
    assert stacked["layers"]["attn"]["q"]["kernel"].shape[0] == 2


def test_relayout_moves_the_whole_train_state_exactly():
    """relayout_layers turns an initialised stacked train state into exactly the unrolled model's tree
    (parameters and Muon / AdamW state, masked leaves included), leaf for leaf, and back."""
    from osp_jax.model import Transformer, relayout_layers
    from osp_jax.optim import make_optimizer
    from osp_jax.step import init_state

    cfg = _small_train_config()
    tx, _ = make_optimizer(cfg)
    state = init_state(cfg, Transformer(cfg.model), tx, jax.random.key(0))
    state = state._replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # moments not all zero
    cfg.model.scan_layers = False
    target = jax.eval_shape(lambda: init_state(cfg, Transformer(cfg.model), tx, jax.random.key(0)))
    unrolled = relayout_layers(state, False, cfg.model.layers)
    assert jax.tree.structure(unrolled) == jax.tree.structure(target)
    assert [x.shape for x in jax.tree.leaves(unrolled)] == [x.shape for x in jax.tree.leaves(target)]
    for i in range(cfg.model.layers):
        np.testing.assert_array_equal(unrolled.params[f"layers_{i}"]["mlp"]["up"]["kernel"],
                                      state.params["layers"]["mlp"]["up"]["kernel"][i])
    back = relayout_layers(unrolled, True, cfg.model.layers)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, back, state)
    with pytest.raises(ValueError, match="expected 3 layers"):
        relayout_layers(state, False, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three launches of two processes: about 70 s on 2 otherwise idle cores
def test_two_processes_train_checkpoint_resume_and_agree_on_preemption(tmp_path):
    """Two processes on localhost (gloo, 2 CPU devices each) form one 4-device job. A SIGTERM that
    reaches only one of them still makes both save the same step and exit 0: through jax's preemption
    service at the next step, whatever log_every is; without the service, at a multiple of log_every."""
    workdir = tmp_path / "run"

    def launch(steps, *flags, **env):
        port = _free_port()
        return [start_cli(workdir, *SMALL, f"--config.train.steps={steps}", "--config.mesh.fsdp=-1", *flags,
                          devices=2, OSP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OSP_NUM_PROCESSES="2",
                          OSP_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **env)
                for i in range(2)]

    def preempt(procs, after_step):
        """SIGTERM to process 1 once step `after_step` is saved; returns the step each process stopped at."""
        _wait_for(lambda: (workdir / "checkpoints" / str(after_step)).is_dir(), procs[0])
        procs[1].send_signal(signal.SIGTERM)
        outs = [_finish(p, timeout=300) for p in procs]
        assert all("resumed from step" in o for o in outs), outs[0][-3000:]
        return [int(re.search(r"SIGTERM: saving a checkpoint at step (\d+)", o).group(1)) for o in outs]

    for p in launch(6):
        _finish(p, timeout=600)
    ckpts = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=6, keep=3)
    assert ckpts.all_steps() == [6], ckpts.all_steps()
    assert sorted(_losses(workdir)) == list(range(1, 7))

    # Resumed from step 6. jax's preemption service: both stop within a few steps of the notice, and
    # log_every (1000) plays no part.
    stops = preempt(launch(100000, "--config.train.log_every=1000", "--config.train.checkpoint_every=10",
                           "--config.optimizer.decay_steps=40"), after_step=10)
    assert stops[0] == stops[1] and 10 < stops[0] < 1000, stops
    assert ckpts.all_steps()[-1] == stops[0], ckpts.all_steps()

    # Without the service: the Python handler's flag, agreed at the next multiple of log_every.
    start = stops[0]
    stops = preempt(launch(100000, "--config.train.log_every=3", f"--config.train.checkpoint_every={start + 2}",
                           "--config.optimizer.decay_steps=40", JAX_ENABLE_PREEMPTION_SERVICE="false"),
                    after_step=start + 2)
    assert stops[0] == stops[1] and stops[0] > start + 2 and stops[0] % 3 == 0, stops
    assert ckpts.all_steps()[-1] == stops[0], ckpts.all_steps()


@pytest.mark.slow  # three processes: about 30 s on 2 otherwise idle cores
def test_tensor_parallelism_across_two_processes_trains_as_one_process_does(tmp_path):
    """tp=2 over two processes of one CPU device each: the two hold the same batch rows, so both must
    read the same data (each read half of the batch before, and the step ran on 4 rows of 8)."""
    def launch(workdir, processes):
        port = _free_port()
        dist = lambda i: dict(OSP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OSP_NUM_PROCESSES=str(processes),
                              OSP_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        return [start_cli(workdir, *SMALL, "--config.train.steps=3", "--config.mesh.tp=2", "--config.mesh.fsdp=1",
                          devices=2 // processes, **(dist(i) if processes > 1 else {})) for i in range(processes)]

    runs = {"one": launch(tmp_path / "one", 1), "two": launch(tmp_path / "two", 2)}
    for procs in runs.values():
        for p in procs:
            _finish(p)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)


def test_processes_that_do_not_share_the_workdir_stop_with_an_error(tmp_path):
    """Each process given its own directory (a workdir on each host's own disk): both stop, naming the
    problem, instead of saving a checkpoint in parts on different disks (or hanging in a resume)."""
    port = _free_port()
    procs = [start_cli(tmp_path / f"host{i}", *SMALL, "--config.train.steps=2", "--config.mesh.fsdp=-1", devices=1,
                       OSP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OSP_NUM_PROCESSES="2", OSP_PROCESS_ID=str(i),
                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [o[-2000:] for o in outs]
    assert "is not one shared directory: process(es) [1] cannot see" in outs[0], outs[0][-2000:]
    assert not any((tmp_path / f"host{i}" / "checkpoints").exists() and
                   any((tmp_path / f"host{i}" / "checkpoints").iterdir()) for i in range(2))


def test_a_process_that_cannot_read_its_data_stops_them_all(tmp_path):
    """Process 1's data is missing: it stops with a data error, and process 0, which would wait for it
    in the first collective, stops too, saying why, instead of hanging."""
    port = _free_port()
    procs = [start_cli(tmp_path / "run", *SMALL, "--config.train.steps=2", "--config.mesh.fsdp=-1",
                       *(["--config.data.path=/nowhere"] if i else []), devices=1,
                       OSP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OSP_NUM_PROCESSES="2", OSP_PROCESS_ID=str(i),
                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[-2000:] for o in outs]
    assert "data error: another process could not set up its data" in outs[0], outs[0][-2000:]
    assert "data error: " in outs[1] and "/nowhere" in outs[1], outs[1][-2000:]


class _poisoned_batches:
    """An endless iterator of one batch; `bad` makes every loss NaN (jnp.take fills out-of-range ids with NaN)."""

    def __init__(self, cfg, bad: bool):
        n, s = cfg.train.global_batch_size, cfg.train.seq_len
        token = cfg.model.vocab_size + 7 if bad else 1
        self.batch = {"inputs": np.full((n, s), token, np.int32), "targets": np.ones((n, s), np.int32),
                      "segment_ids": np.ones((n, s), np.int32),
                      "positions": np.tile(np.arange(s, dtype=np.int32), (n, 1))}
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        return self.batch

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]


def _small_train_config(**train):
    cfg = load_recipe("tiny")
    cfg.model.dim, cfg.model.layers, cfg.model.ffn_dim = 64, 2, 128
    cfg.train.seq_len, cfg.train.global_batch_size = 32, 8
    cfg.train.eval_every = cfg.train.outlier_every = 0
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def test_nan_steps_are_skipped_then_training_stops(tmp_path, monkeypatch):
    from osp_jax import train as train_lib

    cfg = _small_train_config(steps=20, max_bad_steps=3, log_every=1, checkpoint_every=2)
    monkeypatch.setattr(train_lib, "make_data",
                        lambda config, mesh: (_poisoned_batches(cfg, bad=True), list(), None))
    monkeypatch.setattr(train_lib, "_evaluate", lambda *a: float("nan"))
    with pytest.raises(train_lib.TrainingError, match="3 consecutive steps"):
        train_lib.train(cfg, str(tmp_path))
    # Nothing non-finite was written: the parameters never changed, so any checkpoint holds finite state.
    ckpts = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2, keep=3)
    for step in ckpts.all_steps():
        _, params, _ = checkpoint.restore_params_only(str(tmp_path), step=step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_failed_async_save_still_closes_the_run_and_puts_sigterm_back(tmp_path, monkeypatch):
    """The loop's last wait() re-raises a failed asynchronous save; the checkpointer, the metrics writer
    and the SIGTERM handler are still closed and put back (they were skipped)."""
    import threading

    from osp_jax import train as train_lib

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    cfg = _small_train_config(steps=2, log_every=1, checkpoint_every=0)
    cfg.optimizer.warmup_steps = 1
    monkeypatch.setattr(train_lib, "make_data", lambda config, mesh: (_poisoned_batches(cfg, bad=False), [], None))
    closed = []
    real_close = checkpoint.Checkpointer.close
    monkeypatch.setattr(checkpoint.Checkpointer, "wait", lambda self: (_ for _ in ()).throw(
        checkpoint.CheckpointError("async save failed")))
    monkeypatch.setattr(checkpoint.Checkpointer, "close", lambda self: (closed.append(self), real_close(self)))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(checkpoint.CheckpointError, match="async save failed"):
        train_lib.train(cfg, str(tmp_path))
    assert closed and signal.getsignal(signal.SIGTERM) is before


def test_a_bad_step_is_skipped_and_training_goes_on():
    import functools
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.step import init_state, train_step

    cfg = _small_train_config()
    model = Transformer(cfg.model)
    tx, _ = make_optimizer(cfg)
    state = init_state(cfg, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))
    bad, good = next(_poisoned_batches(cfg, True)), next(_poisoned_batches(cfg, False))
    after_bad, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(after_bad.bad_steps) == 1
    jax.tree.map(np.testing.assert_array_equal, after_bad.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, after_bad.opt_state, state.opt_state)
    after_good, m = step(after_bad, good)
    assert int(m["skipped"]) == 0 and int(after_good.bad_steps) == 0
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("optimizer,accum", [("adamw", 1), ("muon", 1), ("adamw", 2)])
def test_the_skip_guard_updates_the_donated_state_in_place(optimizer, accum):
    """The non-finite guard must not make XLA copy the state: written as `where(finite, new, old)`
    on every leaf it did, the whole of it (parameters and moments, 15.82 GiB for the 1.4B) at the start
    of every step. No parameter of the compiled step (state or batch) may be copied."""
    from benchmarks.step_time import input_copies
    from osp_jax import sharding
    from osp_jax.train import lower_train_step

    cfg = _small_train_config()
    cfg.optimizer.name, cfg.optimizer.grad_accum_steps = optimizer, accum
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    copies = input_copies(lower_train_step(cfg, mesh)[0].compile().as_text())
    assert copies["count"] == 0, f"the step copies {copies['count']} of its inputs: {copies['names'][:6]}"


def test_sigterm_handler_is_put_back_after_training_and_a_late_notice_is_passed_on():
    """A script that trains several runs in one process (experiments/ablation.py) must stay killable:
    train() puts the previous SIGTERM handler back, and a notice that came after the last step
    reaches it instead of being swallowed."""
    import os
    import threading

    from osp_jax.preemption import PreemptionNotice

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    seen = []
    outer = lambda signum, frame: seen.append(signum)  # noqa: E731
    before = signal.signal(signal.SIGTERM, outer)
    try:
        with PreemptionNotice() as notice:  # the loop ends without stopping for the notice
            os.kill(os.getpid(), signal.SIGTERM)  # while training: only the flag is set
            assert notice.mode == "signal" and notice.flag and notice.reached(3) and seen == []
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is outer

        with PreemptionNotice() as notice:
            os.kill(os.getpid(), signal.SIGTERM)
            notice.stopped = True  # the loop saved and stopped: handled
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, before)


def _save_fresh_states(workdir, steps: dict, **model) -> None:
    """Checkpoints (with their configs) of fresh `_small_train_config` states, no training: {step: layers
    stacked?}; `model` changes the config's model section."""
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.step import init_state

    with checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=1, keep=10, async_save=False) as ckpt:
        for step, stacked in steps.items():
            cfg = _small_train_config()
            cfg.model.scan_layers = stacked
            for k, v in model.items():
                cfg.model[k] = v
            tx, _ = make_optimizer(cfg)
            init = jax.jit(lambda k: init_state(cfg, Transformer(cfg.model), tx, k))
            ckpt.save(step, init(jax.random.key(step)), config=cfg.to_dict())


def _restore(workdir, cfg):
    """train.restore_state as train() calls it, on the 8 test devices."""
    from osp_jax import sharding
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.train import restore_state, state_shardings

    mesh = sharding.make_mesh(cfg.mesh)
    tx, _ = make_optimizer(cfg, mesh)
    with checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=1, keep=10) as ckpt:
        return restore_state(ckpt, cfg, tx, state_shardings(cfg, Transformer(cfg.model), tx, mesh), mesh)


def _damage(step_dir, item: str) -> None:
    """Halves every array file of the step's state, or writes a config item that is not JSON."""
    if item == "config":
        (step_dir / "config" / "metadata").write_text('{"model": {"dim": 6')
        return
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("item", ["state", "config"])
def test_an_unreadable_newest_step_falls_back_across_a_layout_switch(tmp_path, item):
    """Step 3 unrolled, step 6 stacked and unreadable (its arrays, or its config item): the layout of each
    step is its own, so step 3 restores (into this run's stacked layout) and step 6 is moved aside."""
    _save_fresh_states(tmp_path, {3: False, 6: True})
    _damage(tmp_path / "checkpoints" / "6", item)
    step, state = _restore(tmp_path, _small_train_config())
    assert step == 3
    _, unrolled, _ = checkpoint.restore_params_only(str(tmp_path), step=3)
    np.testing.assert_array_equal(np.asarray(state.params["layers"]["mlp"]["up"]["kernel"][1]),
                                  unrolled["layers_1"]["mlp"]["up"]["kernel"])
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints").iterdir()] == ["3", "6"]
    assert not (tmp_path / "checkpoints" / "6").exists()


@pytest.mark.slow
def test_a_damaged_newest_step_is_reported_in_one_line(tmp_path):
    """The run falls back from a damaged step 6 to step 3, sets step 6 aside and trains it again, and says so in
    one line; no traceback (the failed read's other array reads printed dozens of "Event loop is closed"
    tracebacks, which read like a crash)."""
    _save_fresh_states(tmp_path, {3: True, 6: True})
    _damage(tmp_path / "checkpoints" / "6", "state")
    out = _finish(start_cli(tmp_path, *SMALL, "--config.train.steps=7"))
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if "step 6" in x and "checkpoint" in x and "saving" not in x]
    assert "corrupt or unreadable" in line and "falling back to step 3" in line, line
    assert "moved it aside to " + str(tmp_path / "checkpoints" / "6.unreadable-") in line, line
    assert "resumed from step 3" in out and max(_losses(tmp_path)) == 7
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=6, keep=3).all_steps() == [3, 6, 7]


def test_resume_refuses_a_config_that_changes_the_state_shape(tmp_path, caplog):
    """A changed vocab_size or optimizer is named, old and new values, as a mismatch: not reported as a
    corrupt step, no older step tried, nothing moved aside. Learning rates and train.steps may change."""
    import logging

    _save_fresh_states(tmp_path, {3: True, 6: True})
    cfg = _small_train_config()
    cfg.model.vocab_size, cfg.optimizer.name = 8192, "adamw"
    with caplog.at_level(logging.WARNING):
        with pytest.raises(checkpoint.CheckpointMismatch,
                           match=r"step 6 .*model.vocab_size 4096 -> 8192, optimizer.name 'muon' -> 'adamw'"):
            _restore(tmp_path, cfg)
    assert "corrupt" not in caplog.text and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    cfg = _small_train_config(steps=1000)
    cfg.optimizer.learning_rate, cfg.optimizer.schedule = 1e-4, "wsd"
    assert _restore(tmp_path, cfg)[0] == 6


def test_state_shape_keys_are_exactly_those_that_change_the_train_state():
    """train.STATE_SHAPE against the real state: changing one model or optimizer key to another allowed
    value changes the state's leaves (paths, shapes) exactly when check_resume_config refuses the change
    (model.scan_layers aside: a resume moves the layers). Keeps the list true as the optimizer grows."""
    from osp_jax import config as config_lib
    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.step import init_state
    from osp_jax.train import check_resume_config
    from tests.helpers import small_config

    def leaves(cfg):
        tx, _ = make_optimizer(cfg)
        state = jax.eval_shape(lambda k: init_state(cfg, Transformer(cfg.model), tx, k), jax.random.key(0))
        return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}

    base = small_config()
    reference, saved = leaves(base), base.to_dict()
    other = {bool: lambda v: not v, int: lambda v: 2 * v, float: lambda v: 0.0 if v else 0.5}
    checked = []
    for section in ("model", "optimizer"):
        for name, value in base[section].items():
            key = f"{section}.{name}"
            if key == "model.scan_layers" or (value is None and key != "model.head_dim"):
                continue
            values = ([v for v in config_lib.CHOICES[key] if v != value] if key in config_lib.CHOICES
                      else [2 * base.model.dim // base.model.heads] if key == "model.head_dim"
                      else [other[type(value)](value)])
            for new in values:
                cfg = small_config()
                cfg[section][name] = new
                try:
                    changed = leaves(cfg) != reference
                except Exception:  # noqa: BLE001 - not buildable here (cuDNN / splash attention on CPU)
                    continue
                try:
                    check_resume_config(saved, cfg, "step 1")
                    refused = False
                except checkpoint.CheckpointMismatch as e:
                    refused = key in str(e)
                assert refused == changed, (key, value, new)
                checked.append(key)
    assert len(checked) > 40


def test_a_torn_final_checkpoint_is_saved_again(tmp_path, monkeypatch):
    """train.steps=6, and step 6 on disk is torn: the run resumes from step 3 and ends with its final model
    saved as step 6 (the torn one moved aside), instead of "already saved" and no final model."""
    from osp_jax import train as train_lib

    _save_fresh_states(tmp_path, {3: True, 6: True})
    (tmp_path / "checkpoints" / "6" / "commit_success.txt").unlink()
    cfg = _small_train_config(steps=6, checkpoint_every=3, log_every=3)
    cfg.optimizer.warmup_steps = 2
    monkeypatch.setattr(train_lib, "make_data", lambda config, mesh: (_poisoned_batches(cfg, bad=False), [], None))
    train_lib.train(cfg, str(tmp_path))
    ckpts = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=3, keep=3)
    assert ckpts.all_steps() == [3, 6]
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints").iterdir()].count("6") == 2
    assert max(r["step"] for r in read_metrics(tmp_path)) == 6


def test_cli_refuses_a_changed_state_shape_with_exit_2_and_keeps_config_json(tmp_path):
    """One line, exit 2, like any config error; the workdir's config.json stays the one of the checkpoints."""
    _save_fresh_states(tmp_path, {3: True})
    (tmp_path / "config.json").write_text('{"kept": true}')
    proc = start_cli(tmp_path, *SMALL, "--config.model.vocab_size=8192")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("osp_jax.train:")]
    assert "config error: checkpoint step 3" in line and "model.vocab_size 4096 -> 8192" in line
    assert "Traceback" not in out and (tmp_path / "config.json").read_text() == '{"kept": true}'


# ---------------------------------------------------------------------------------------------------- data position


def _tiny_state():
    import jax.numpy as jnp

    return {"w": jnp.arange(4.0)}


def _tiny_target():
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=dev)}


def _builtin_streams(shard, shards, seed=0):
    from osp_jax.data import pipeline
    from osp_jax.data.streams import DataStreams

    data_dir = pipeline.resolve_data_dir("builtin")

    def open_stream(stream, count, global_batch):
        return pipeline.make_iterator(data_dir, "train", seq_len=16, global_batch_size=global_batch, seed=seed,
                                      process_index=stream, process_count=count, prefetch_buffer=0)

    return DataStreams(open_stream, shard=shard, shards=shards, global_batch_size=4)


def _next_global(iterators, n=2):
    batches = [[next(it) for _ in range(n)] for it in iterators]
    return [np.concatenate([b[i]["inputs"] for b in batches]) for i in range(n)]


def _as_saved_by_two_processes(step_dir, states) -> None:
    """Rewrites a step saved by this one process as two processes (data shards 0 and 1) would have saved it."""
    import json

    for p in (step_dir / "data").glob("process_*"):
        p.unlink()
    for i, state in enumerate(states):
        (step_dir / "data" / f"process_{i}-of-2.json").write_text(json.dumps({"json": state}))
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta.update(process_count=2, data_shards=[0, 1])
    meta_file.write_text(json.dumps(meta))


def test_a_data_position_saved_by_two_processes_goes_on_in_one(tmp_path):
    """A checkpoint whose data position two processes saved restores onto one process at the same global
    position (Checkpointer.restore -> iterator_state -> DataStreams.set_state_from); an input that cannot map a
    position between layouts is refused, naming train.allow_data_restart, unless that allows a restart."""
    two = [_builtin_streams(p, 2) for p in range(2)]
    _next_global(two, 3)
    saved = [it.get_state() for it in two]
    want = _next_global(two)
    with checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.data_shards = [0]
        ckpt.save(1, _tiny_state(), data_iterator=two[0])
        _as_saved_by_two_processes(tmp_path / "1", saved)
        one = _builtin_streams(0, 1)
        ckpt.restore(_tiny_target(), data_iterator=one)
        for got, expected in zip(_next_global([one]), want):
            np.testing.assert_array_equal(got, expected)

        class Plain:  # get_state/set_state only: no way to map a position between layouts
            state = None

            def get_state(self):
                return {}

            def set_state(self, state):
                self.state = state

        ckpt.allow_data_restart = False
        with pytest.raises(checkpoint.CheckpointMismatch,
                           match=r"saved by 2 processes, but this job has 1.*set train.allow_data_restart=True"):
            ckpt.restore(_tiny_target(), data_iterator=Plain())
        ckpt.allow_data_restart = True
        plain = Plain()
        ckpt.restore(_tiny_target(), data_iterator=plain)
        assert plain.state is None


def test_a_data_position_is_applied_only_to_the_data_it_was_saved_on(tmp_path, caplog):
    """meta records train.seed, data.path and the data's content; a resume with another seed or other content
    refuses the position (CheckpointMismatch naming the key and train.allow_data_restart), or with the restart
    allowed starts the data again; a moved data.path with the same content goes on, with a warning."""
    import logging

    content = {"tokenizer_sha256": "a" * 64, "train_documents": 10}
    ident = {"train.seed": 0, "data.path": "/data/a", "data.content": content}
    it = _builtin_streams(0, 1)
    _next_global([it], 3)
    want = _next_global([it])
    fresh = _next_global([_builtin_streams(0, 1)])
    it = _builtin_streams(0, 1)
    _next_global([it], 3)
    with checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.data_shards, ckpt.data_identity, ckpt.allow_data_restart = [0], ident, False
        ckpt.save(1, _tiny_state(), data_iterator=it)
        for changed, match in (({"train.seed": 1}, r"train.seed 0 -> 1"),
                               ({"data.content": {**content, "train_documents": 11}},
                                r"the content of data.path='/data/a' \(train_documents 10 -> 11\)")):
            ckpt.data_identity = {**ident, **changed}
            with pytest.raises(checkpoint.CheckpointMismatch, match=match + r".*train.allow_data_restart=True"):
                ckpt.restore(_tiny_target(), data_iterator=_builtin_streams(0, 1))
        ckpt.allow_data_restart = True
        restarted = _builtin_streams(0, 1)
        ckpt.restore(_tiny_target(), data_iterator=restarted)
        assert all(np.array_equal(a, b) for a, b in zip(_next_global([restarted]), fresh))
        ckpt.data_identity, ckpt.allow_data_restart = {**ident, "data.path": "/mnt/a"}, False
        moved = _builtin_streams(0, 1)
        with caplog.at_level(logging.WARNING):
            ckpt.restore(_tiny_target(), data_iterator=moved)
        assert "data.path '/data/a' -> '/mnt/a', the same content" in caplog.text
        assert all(np.array_equal(a, b) for a, b in zip(_next_global([moved]), want))


@pytest.mark.slow
def test_a_resume_onto_another_process_count_reads_on_from_the_same_position(tmp_path):
    """Two processes -> one, and one -> two (gloo, two CPU devices in all): a run's checkpoint at step 4, resumed
    on the other process count, trains steps 5 and 6 on the batches the run that stayed trained them on (the same
    losses), where it used to warn and start the data again. Validation reads the whole split once on either
    layout (more batches asked for than it fills; each process its own documents, the counts made equal with
    padding), so the validation loss at step 6 is the same too."""
    import shutil

    flags = [*SMALL, "--config.train.steps=6", "--config.train.checkpoint_every=4", "--config.mesh.fsdp=-1",
             "--config.optimizer.decay_steps=6", "--config.train.eval_every=6", "--config.train.eval_batches=1000"]

    def launch(workdir, processes):
        port = _free_port()
        dist = lambda i: dict(OSP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", OSP_NUM_PROCESSES=str(processes),
                              OSP_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        return [start_cli(workdir, *flags, devices=2 // processes, **(dist(i) if processes > 1 else {}))
                for i in range(processes)]

    stayed = {"two": launch(tmp_path / "two", 2), "one": launch(tmp_path / "one", 1)}
    for procs in stayed.values():
        for p in procs:
            _finish(p)
    moved = {}
    for name, other in (("two", 1), ("one", 2)):
        workdir = tmp_path / f"{name}-then-{other}"
        shutil.copytree(tmp_path / name, workdir)
        shutil.rmtree(workdir / "checkpoints" / "6")
        moved[name] = (workdir, launch(workdir, other))
    for name, (workdir, procs) in moved.items():
        out = [_finish(p) for p in procs][0]
        assert "resumed from step 4" in out and "goes on in this job's" in out, out[-3000:]
        want, got = _losses(tmp_path / name), _losses(workdir)
        np.testing.assert_allclose([got[5], got[6]], [want[5], want[6]], rtol=1e-5, err_msg=name)
        val = [[r["val_loss"] for r in read_metrics(w) if r["step"] == 6][-1] for w in (tmp_path / name, workdir)]
        # The same tokens, batched over another device count: the sums run in another order (1e-4 seen).
        np.testing.assert_allclose(val[1], val[0], rtol=1e-3, err_msg=name)
        assert "fills only" in out


@pytest.mark.slow
def test_cli_refuses_a_data_position_of_another_seed_unless_a_restart_is_allowed(tmp_path):
    """Resumed with another train.seed: exit 2, one line naming the key, its old and new value and
    train.allow_data_restart, the workdir's config.json as it was; with the key set, the run goes on from
    the checkpoint with the data started again, and says so."""
    workdir = tmp_path / "run"
    _finish(start_cli(workdir, *SMALL, "--config.train.steps=2"))
    config = (workdir / "config.json").read_text()
    proc = start_cli(workdir, *SMALL, "--config.train.steps=3", "--config.train.seed=1")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("osp_jax.train: config error: checkpoint step 2") and "train.seed 0 -> 1" in last, last
    assert "set train.allow_data_restart=True" in last and (workdir / "config.json").read_text() == config
    out = _finish(start_cli(workdir, *SMALL, "--config.train.steps=3", "--config.train.seed=1",
                            "--config.train.allow_data_restart=True"))
    assert "resumed from step 2" in out and "the data starts again from its beginning" in out
