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

from osp_jax.checkpoint import CheckpointError, Checkpointer, find_checkpoint_dir, restore_params_only


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
    step, state = ckpt.restore(abstract)
    assert step == 2
    assert_trees_equal(state.params, make_state(2, seed=2).params)
    with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
        step, _ = ckpt.restore(abstract, step=4)
    assert step == 2 and "step 4" in caplog.text and "incomplete" in caplog.text
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ckpt.restore(abstract, step=7)
    ckpt.close()


# Orbax leaves a failed read's asyncio future behind; its "event loop is closed" is noise, not our error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
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

    ckpt = Checkpointer(directory, save_every=1, keep=5)
    with caplog.at_level(logging.WARNING, logger="osp_jax.checkpoint"):
        step, state = ckpt.restore(abstract_of(make_state(), _mesh(8)))
    assert step == 1
    assert_trees_equal(state.params, make_state(1, seed=1).params)
    assert "step 2" in caplog.text and "falling back to step 1" in caplog.text
    assert os.path.isdir(os.path.join(directory, "2"))  # never deleted
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()

    step, params, _ = restore_params_only(workdir)  # the export path falls back the same way
    assert step == 1


def test_nothing_restores_raises_listing_steps(workdir):
    directory = find_checkpoint_dir(workdir)
    with Checkpointer(directory, save_every=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        with pytest.raises(CheckpointError, match="no checkpoint .* could be restored; tried step 1"):
            wrong = {"params": {"other": jax.ShapeDtypeStruct((3,), jnp.float32)}}
            ckpt.restore(wrong)
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
