"""Learning-rate schedules: a linear warmup to the peak, then each decay ends at its floor on time."""
import numpy as np
import pytest

from osp_jax.config import defaults
from osp_jax.optim import schedule


def _optimizer(kind, warmup, **extra):
    o = defaults().optimizer
    o.schedule, o.warmup_steps = kind, warmup
    for k, v in extra.items():
        o[k] = v
    return o


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [10, 190])  # 190 of 200: the warmup eats into WSD's 40 decay steps
def test_schedule_warms_up_then_reaches_its_floor_at_the_last_step(kind, warmup):
    total, peak = 200, 1.0
    lr = np.array([float(schedule(peak, _optimizer(kind, warmup), total)(i)) for i in range(total + 1)])
    np.testing.assert_allclose(lr[: warmup + 1], np.linspace(0, peak, warmup + 1), atol=1e-6)
    after = lr[warmup:]
    assert np.all(np.diff(after) <= 1e-7), "no rise after the warmup"
    floor = 0.1 * peak if kind != "constant" else peak
    assert lr[total] == pytest.approx(floor, abs=1e-6)
    if kind == "wsd":  # linear decay over min(40, steps left after warmup): the last update is one notch above
        decay = min(40, total - warmup)
        assert lr[total - 1] == pytest.approx(floor + (peak - floor) / decay, abs=1e-6)
        assert np.sum(after == peak) == total - warmup - decay + 1


# ------------------------------------------------------------------------------------------------
# The optimizer state's tree does not depend on options that only switch a link on or off.

def _optimizer_config(name, clip_norm, muon_weight_decay):
    from tests.helpers import small_config

    cfg = small_config()
    cfg.optimizer.name, cfg.optimizer.clip_norm, cfg.optimizer.muon_weight_decay = name, clip_norm, muon_weight_decay
    return cfg


def _stepped_state(cfg, abstract=False):
    """A state after one update (momenta and counts away from their initial values), and the optimizer;
    `abstract`: only its shapes (traced, not run)."""
    import jax
    import jax.numpy as jnp
    import optax

    from osp_jax.model import Transformer
    from osp_jax.optim import make_optimizer
    from osp_jax.step import init_state

    tx, _ = make_optimizer(cfg)

    def stepped(key):
        state = init_state(cfg, Transformer(cfg.model), tx, key)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)

    key = jax.random.key(0)
    return (jax.eval_shape(stepped, key) if abstract else jax.jit(stepped)(key)), tx


SWITCHES = [(1.0, 0.1), (0.0, 0.1), (1.0, 0.0), (0.0, 0.0)]  # (clip_norm, muon_weight_decay)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_clipping_and_muon_weight_decay_on_or_off_keep_the_state_tree(name):
    import jax

    trees = []
    for clip, wd in SWITCHES:
        state, _ = _stepped_state(_optimizer_config(name, clip, wd), abstract=True)
        trees.append((jax.tree.structure(state.opt_state), jax.tree.map(lambda x: (x.shape, x.dtype), state.opt_state)))
    assert all(t == trees[0] for t in trees[1:])


@pytest.mark.slow  # about 20-30 s on 2 cores: two compiles and an Orbax round trip
def test_a_checkpoint_saved_with_clipping_and_decay_resumes_without_them(tmp_path):
    """Saved with clip_norm=1, muon_weight_decay=0.1; resumed with both off: the resume check lets it
    through, Orbax restores every leaf exactly, and the next update runs on it."""
    import jax
    import numpy as np

    from osp_jax.checkpoint import Checkpointer
    from osp_jax.train import check_resume_config

    cfg_a, cfg_b = _optimizer_config("muon", 1.0, 0.1), _optimizer_config("muon", 0.0, 0.0)
    state, _ = _stepped_state(cfg_a)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2, async_save=False)
    ckpt.save(1, state, config=cfg_a.to_dict(), force=True)
    ckpt.close()
    check_resume_config(cfg_a.to_dict(), cfg_b, "step 1")  # not refused
    fresh, tx_b = _stepped_state(cfg_b, abstract=True)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), fresh)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2)
    step, restored = ckpt.restore(abstract)
    ckpt.close()
    assert step == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    updates, _ = jax.jit(tx_b.update)(jax.tree.map(lambda p: p * 0 + 0.01, restored.params), restored.opt_state,
                                      restored.params)
    assert all(bool(np.isfinite(np.asarray(u)).all()) for u in jax.tree.leaves(updates))
