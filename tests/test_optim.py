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
