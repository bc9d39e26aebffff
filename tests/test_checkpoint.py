"""Checkpoint layer: round trip, retention, async, torn and corrupt steps, NaN refusal, restore onto other meshes."""
import logging
import os
import shutil
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from osp_jax.checkpoint import (CheckpointError, CheckpointMismatch, Checkpointer, find_checkpoint_dir,
                                restore_params_only)


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("fsdp",))


def _sharding(mesh, x):
    # The matrices are split over fsdp along their first axis; scalars and keys are replicated.
    return NamedSharding(mesh, P("fsdp") if getattr(x, "ndim", 0) >= 2 else P())


def make_state(step=0, seed=0, mesh=None):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w": jax.random.normal(k1, (8, 16), jnp.float32),
        "scale": jnp.float32(1.5 + seed),
        # Large enough that Orbax stores its chunk outside the OCDBT b-tree: the "array file" a garble hits.
        "emb": jax.random.normal(k2, (64, 64), jnp.float32).astype(jnp.bfloat16),
    }
    if mesh is not None:
        params = jax.tree.map(lambda x: jax.device_put(x, _sharding(mesh, x)), params)
    opt_state = optax.adamw(1e-3).init(params)
    return TrainState(jnp.int32(step), params, opt_state, jax.random.key(seed + 7))


def abstract_of(state, mesh):
    shapes = jax.eval_shape(lambda: state)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(mesh, x)), shapes)


def make_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path / "run")


def test_round_trip_values_dtypes_step_and_iterator(workdir):
    mesh = _mesh(8)
    state = make_state(step=10, mesh=mesh)
    config = {"model": {"dim": 64}, "optimizer": "muon", "betas": (0.9, 0.95)}
    it = make_iter()
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(find_checkpoint_dir(workdir), save_every=5, keep=3)
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, data_iterator=it, config=config)
    expected_next = next(it)  # what a resumed run must see first
    ckpt.close()

    ckpt = Checkpointer(find_checkpoint_dir(workdir), save_every=5, keep=3)
    it2 = make_iter()
    step, restored = ckpt.restore(abstract_of(state, mesh), data_iterator=it2)
    assert step == 10 and isinstance(restored, TrainState) and int(restored.step) == 10
    assert_trees_equal(restored, state)
    assert restored.params["w"].sharding == _sharding(mesh, state.params["w"])
    np.testing.assert_array_equal(next(it2), expected_next)
    assert ckpt.read_config() == {"model": {"dim": 64}, "optimizer": "muon", "betas": [0.9, 0.95]}
    ckpt.close()


def test_plain_iterator_state_round_trips(workdir):
    class Counter:  # not a grain iterator: any get_state/set_state with JSON-able state works
        def __init__(self):
            self.n = 0

        def get_state(self):
            return {"n": np.int64(self.n)}  # numpy scalars, as grain recommends

        def set_state(self, s):
            self.n = s["n"]

    it = Counter()
    it.n = 41
    with Checkpointer(find_checkpoint_dir(workdir), save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, make_state(), data_iterator=it)
        fresh = Counter()
        ckpt.restore(abstract_of(make_state(), _mesh(1)), data_iterator=fresh)
    assert fresh.n == 41


def test_iterator_state_is_restored_only_onto_the_same_data_shards(workdir, caplog):
    """Iterator states are per process; processes that share a data shard (a tp group across hosts) must
    stay in step, so a resume onto another layout of shards (another mesh) leaves the iterators as they
    are. A checkpoint from before the layout was saved counts as each process its own shard."""
    class Counter:
        def __init__(self, n=0):
            self.n = n

        def get_state(self):
            return {"n": np.int64(self.n)}

        def set_state(self, s):
            self.n = s["n"]

    with Checkpointer(find_checkpoint_dir(workdir), save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.data_shards = [0]
        ckpt.save(1, make_state(), data_iterator=Counter(41))
        ckpt.data_shards = None  # written as before data_shards existed
        ckpt.save(2, make_state(), data_iterator=Counter(42))
        for step, layout, want in ((1, [0], 41), (1, [1], 0), (2, [0], 42), (2, [3], 0)):
            fresh = Counter()
            ckpt.data_shards = layout
            ckpt.restore(abstract_of(make_state(), _mesh(1)), step=step, data_iterator=fresh)
            assert fresh.n == want, (step, layout)
    assert "this job's are [1] (another mesh)" in caplog.text


def test_keep_two_keeps_the_last_two(workdir):
    state = make_state()
    with Checkpointer(find_checkpoint_dir(workdir), save_every=2, keep=2, async_save=False) as ckpt:
        saved = [s for s in range(1, 9) if ckpt.save(s, state)]
        assert saved == [2, 4, 6, 8]
        assert not ckpt.should_save(8) and not ckpt.should_save(9) and ckpt.should_save(10)
        assert ckpt.all_steps() == [6, 8]
    assert sorted(os.listdir(find_checkpoint_dir(workdir))) == ["6", "8"]


def test_async_save_visible_after_wait(workdir):
    state = make_state(mesh=_mesh(8))
    ckpt = Checkpointer(find_checkpoint_dir(workdir), save_every=3, keep=2, async_save=True)
    assert ckpt.save(3, state)
    ckpt.wait()
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    assert not ckpt.save(3, state, force=True)  # an existing step is never overwritten
    ckpt.close()


def test_an_async_save_holds_the_state_it_was_given_when_the_next_step_donates_it(workdir):
    """save returns while the checksums and the writes go on, and the next train step donates the state's
    buffers: the checkpoint still holds the state save was given, and its checksums match it (a restore
    checks them)."""
    mesh = _mesh(8)
    state = make_state(step=4, seed=4, mesh=mesh)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, s),
                   donate_argnums=0)
    with Checkpointer(find_checkpoint_dir(workdir), save_every=4, keep=2, async_save=True) as ckpt:
        assert ckpt.save(4, state)
        for _ in range(3):
            state = bump(state)
        ckpt.wait()
        step, restored = ckpt.restore(abstract_of(state, mesh))
    assert step == 4
    assert_trees_equal(restored, make_state(step=4, seed=4, mesh=mesh))


def test_torn_checkpoint_is_never_chosen(workdir, caplog):
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, make_state(1, seed=1))
        ckpt.save(2, make_state(2, seed=2))
    # An interrupted save leaves Orbax's temporary directory behind (the rename to "3" never happened) ...
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp"))
    os.remove(os.path.join(directory, "3.orbax-checkpoint-tmp", "commit_success.txt"))
    # ... and a step directory without the commit marker (e.g. a partial copy) is not complete either.
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "4"))
    os.remove(os.path.join(directory, "4", "commit_success.txt"))

    ckpt = Checkpointer(directory, save_every=1, keep=5)
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    abstract = abstract_of(make_state(), _mesh(8))
    with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
        step, _ = ckpt.restore(abstract, step=4)
    assert step == 2 and "step 4" in caplog.text and "incomplete" in caplog.text
    step, state = ckpt.restore(abstract)
    assert step == 2
    assert_trees_equal(state.params, make_state(2, seed=2).params)
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ckpt.restore(abstract, step=7)
    ckpt.close()


# A failed read's other array reads are drained, not left to report "Event loop is closed" one by one.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_corrupt_checkpoint_falls_back_and_is_kept(workdir, caplog, damage):
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, make_state(1, seed=1))
        ckpt.save(2, make_state(2, seed=2))
    state_dir = os.path.join(directory, "2", "state")
    data_files = [
        os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files if os.path.basename(root) == "d"
    ]
    if damage == "garble":  # flip a few bytes of the out-of-line array chunks: decodes fine, wrong numbers
        data_files = [f for f in data_files if "ocdbt.process_" in f]
    assert data_files
    for path in data_files:
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        if damage == "garble":
            mid = len(raw) // 2
            raw[mid : mid + 4] = bytes(b ^ 0xFF for b in raw[mid : mid + 4])
        else:
            raw = raw[: len(raw) // 2]
        with open(path, "wb") as f:
            f.write(raw)

    step, params, _ = restore_params_only(workdir)  # the export path falls back the same way, moving nothing
    assert step == 1 and os.path.isdir(os.path.join(directory, "2"))

    ckpt = Checkpointer(directory, save_every=1, keep=5)
    with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
        step, state = ckpt.restore(abstract_of(make_state(), _mesh(8)))
    assert step == 1
    assert_trees_equal(state.params, make_state(1, seed=1).params)
    assert "step 2" in caplog.text and "falling back to step 1" in caplog.text
    _assert_moved_aside(directory, 2, caplog.text)
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, make_state(2, seed=5))  # the step is saved again, not taken as done
    ckpt.close()
    assert Checkpointer(directory, save_every=1, keep=5).all_steps() == [1, 2]


def _assert_moved_aside(directory, step, log_text):
    """`step`'s directory was renamed `<step>.unreadable-<UTC time>`, whole, and the warning names it."""
    (aside,) = [n for n in os.listdir(directory) if n.startswith(f"{step}.unreadable-")]
    assert not os.path.exists(os.path.join(directory, str(step)))
    assert {"state", "meta"} <= set(os.listdir(os.path.join(directory, aside)))
    assert os.path.join(directory, aside) in log_text and "moved it aside" in log_text


def test_a_torn_newest_step_is_moved_aside_and_saved_again(workdir, caplog):
    """A newest step without its commit marker was still listed by Orbax: should_save and save refused that
    step up to and at its number, so the retrained state (and a run's final model) was never saved."""
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=3, keep=2, async_save=False) as ckpt:
        ckpt.save(3, make_state(3, seed=3))
        ckpt.save(6, make_state(6, seed=6))
    os.remove(os.path.join(directory, "6", "commit_success.txt"))

    with Checkpointer(directory, save_every=3, keep=2) as ckpt:
        with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
            step, _ = ckpt.restore(abstract_of(make_state(), _mesh(1)))
        assert step == 3
        _assert_moved_aside(directory, 6, caplog.text)
        assert ckpt.should_save(6) and ckpt.save(6, make_state(6, seed=7), force=True)
    with Checkpointer(directory, save_every=3, keep=2) as ckpt:
        assert ckpt.all_steps() == [3, 6]
        assert_trees_equal(ckpt.restore(abstract_of(make_state(), _mesh(1)))[1].params, make_state(6, seed=7).params)


def test_a_torn_step_with_nothing_to_restore_is_set_aside_and_saved_again(workdir, caplog):
    """Only a torn step on disk: nothing restores, so a fresh start (train) sets it aside, and that
    step is saved again instead of being taken as done."""
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=3, keep=2, async_save=False) as ckpt:
        ckpt.save(3, make_state(3, seed=3))
    os.remove(os.path.join(directory, "3", "commit_success.txt"))
    with Checkpointer(directory, save_every=3, keep=2, async_save=False) as ckpt:
        assert ckpt.all_steps() == [] and not ckpt.should_save(3)
        with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
            ckpt.set_aside_torn()
        _assert_moved_aside(directory, 3, caplog.text)
        assert ckpt.should_save(3) and ckpt.save(3, make_state(3, seed=4))
    with Checkpointer(directory, save_every=3, keep=2) as ckpt:
        assert_trees_equal(ckpt.restore(abstract_of(make_state(), _mesh(1)))[1].params, make_state(3, seed=4).params)


def test_nothing_restores_raises_listing_steps(workdir):
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
    os.remove(os.path.join(directory, "1", "state", "_METADATA"))
    with Checkpointer(directory, save_every=1, keep=5) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint .* could be restored; tried step 1"):
            ckpt.restore(abstract_of(make_state(), _mesh(1)))
    assert os.listdir(directory) == ["1"]  # nothing restored: nothing moved aside
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(os.path.join(workdir, "empty"), save_every=1, keep=1).restore(abstract_of(make_state(), _mesh(1)))


def test_nan_state_is_never_written(workdir):
    directory = find_checkpoint_dir(workdir)
    ckpt = Checkpointer(directory, save_every=1, keep=5, async_save=True)
    ckpt.save(1, make_state(1))
    ckpt.wait()
    bad = make_state(2, mesh=_mesh(8))
    bad = bad._replace(params={**bad.params, "w": bad.params["w"].at[3, 5].set(jnp.nan)})
    with pytest.raises(CheckpointError, match=r"refusing to save step 2.*NaN or Inf.*params/w"):
        ckpt.save(2, bad)
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    assert sorted(os.listdir(directory)) == ["1"]  # no step dir, no temporary dir
    ckpt.close()


def test_restore_onto_smaller_mesh_and_without_mesh(workdir):
    mesh8, mesh4 = _mesh(8), _mesh(4)
    state = make_state(step=20, seed=3, mesh=mesh8)
    assert state.params["w"].sharding.mesh.size == 8 and len(state.params["w"].addressable_shards) == 8
    with Checkpointer(find_checkpoint_dir(workdir), save_every=10, keep=2) as ckpt:
        ckpt.save(20, state, config={"name": "tiny"})

    with Checkpointer(find_checkpoint_dir(workdir), save_every=10, keep=2) as ckpt:
        step, restored = ckpt.restore(abstract_of(state, mesh4))
    assert step == 20
    assert_trees_equal(restored, state)
    w = restored.params["w"]
    assert w.sharding == NamedSharding(mesh4, P("fsdp")) and {s.data.shape for s in w.addressable_shards} == {(2, 16)}

    step, params, config = restore_params_only(workdir)
    assert step == 20 and config == {"name": "tiny"}
    assert set(params) == {"w", "scale", "emb"}
    for name in params:
        assert isinstance(params[name], np.ndarray)
        assert params[name].dtype == state.params[name].dtype
        np.testing.assert_array_equal(params[name], np.asarray(state.params[name]))


def test_a_state_that_does_not_fit_is_a_mismatch_not_corruption(workdir, caplog):
    """A readable step holding another tree (another model or optimizer config) stops the restore at once:
    no "corrupt" warning, no fall back to older steps, nothing moved aside."""
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, make_state(2))
    wider = make_state()._replace(params={**make_state().params, "w": jnp.zeros((8, 32))})
    wider = abstract_of(wider, _mesh(1))
    with Checkpointer(directory, save_every=1, keep=5) as ckpt:
        with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
            with pytest.raises(CheckpointMismatch, match=r"step 2 .*params/w: saved \(8, 16\), asked for \(8, 32\)"):
                ckpt.restore(wider)
            asked = []

            def refuse(step, _saved_tree):
                asked.append(step)
                raise CheckpointMismatch(f"step {step}: refused")

            with pytest.raises(CheckpointMismatch, match="step 2: refused"):
                ckpt.restore(refuse)
    assert asked == [2] and "corrupt" not in caplog.text
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_restore_takes_a_target_per_step(workdir):
    """`abstract_state` may be a function of the step: each step is read as its own tree (train.py reads a
    step of either layer layout this way), and a step that falls back gets the older step's tree."""
    directory = find_checkpoint_dir(workdir)
    small, big = make_state(1, seed=1), make_state(2, seed=2)
    big = big._replace(params={**big.params, "extra": jnp.ones((4,))})
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, small)
        ckpt.save(2, big)
    os.remove(os.path.join(directory, "2", "state", "manifest.ocdbt"))  # step 2 unreadable
    trees = {1: abstract_of(small, _mesh(1)), 2: abstract_of(big, _mesh(1))}
    with Checkpointer(directory, save_every=1, keep=5) as ckpt:
        step, state = ckpt.restore(lambda s, _saved_tree: trees[s])
    assert step == 1
    assert_trees_equal(state.params, small.params)


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_save_benchmark_smoke(tmp_path):
    """benchmarks/checkpoint_save.py --smoke (and --parts) runs and prints its figures (nothing about speed)."""
    import json

    from tests.test_benchmarks import _run

    out = tmp_path / "save.jsonl"
    record = json.loads(_run("benchmarks/checkpoint_save.py", "--smoke", "--saves=2", "--every=2",
                             "--set=model.layers=2", f"--output={out}")[-1])
    assert record["benchmark"] == "checkpoint_save" and record["saves"] == 2 and len(record["save_all_s"]) == 2
    assert record["save_s"] > 0 and record["step_s"] > 0 and record["write_s"] >= record["save_s"]
    assert json.loads(out.read_text()) == record
    parts = json.loads(_run("benchmarks/checkpoint_save.py", "--smoke", "--parts", "--saves=2",
                            "--set=model.layers=2")[-1])
    assert parts["benchmark"] == "checkpoint_save_parts" and len(parts["finite_all_s"]) == 2
    assert parts["finite_s"] > 0 and parts["checksums_ready_s"] >= 0
