"""The optimizer a config asks for: Muon/AdamW routing, schedules and clipping.

`optimizer.name`:
  muon      Muon for every hidden matrix and the EmbProj matrices; AdamW for the token embedding,
            the LM head and the norm scales (the paper's decoupled embedding optimisation).
  muon_all  Muon for the embedding and LM head too (the paper's Muon-only ablation).
  adamw     AdamW everywhere.
Gradient accumulation is done inside the train step (step.py), not here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from osp_jax import roles
from osp_jax.muon import muon as muon_transform

MUON, ADAMW = roles.MUON, roles.ADAMW


def param_labels(params, name: str):
    """Which optimizer updates each leaf for `optimizer.name` = `name`: 'muon' or 'adamw', from its
    role (osp_jax.roles). A matrix without a role is an error naming its path, never a guess."""
    return roles.labels(params, name)


def _decay_mask(params):
    """AdamW decays matrices (embedding, head), never norm scales (osp_jax.roles)."""
    return roles.decay_mask(params)


def schedule(peak: float, config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to `min_lr_ratio * peak`, WSD (stable, then linear decay), or constant."""
    o = config
    total = o.decay_steps or steps
    warm = o.warmup_steps
    floor = peak * o.min_lr_ratio
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total, warm + 1), end_value=floor)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm])
    # The decay ends at `total` even when the warmup leaves it less than its fraction of the run.
    decay = max(1, min(int(round(total * o.wsd_decay_fraction)), total - warm))
    stable = max(0, total - warm - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak),
         optax.linear_schedule(peak, floor, decay)],
        [warm, warm + stable])


def _counted(node) -> bool:
    return isinstance(node, tuple) and "count" in getattr(node, "_fields", ())


def schedules_at(opt_state, step):
    """`opt_state` with the step every learning-rate schedule in it reads set to `step` (the train state's).

    The train step calls it before each update, so the train state's step is the one counter the schedules
    follow: a skipped (non-finite) step, which keeps the optimizer state, cannot make them lag it, and a
    checkpoint imported at step N (`export --from-hf --step=N`) resumes at the schedule's step N. The other
    counts are left as they are: Adam's bias correction and Muon's count the updates their moments have seen,
    which after a skip or an import is fewer. Reaches optax's schedule states at any depth of any chain:
    `scale_by_schedule`'s (every optax optimizer given a schedule, Muon's learning rate too) and
    `inject_hyperparams`' (its own and its schedules'); a custom transform keeping a step elsewhere is not
    reached."""
    def at(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        if isinstance(node, optax.InjectStatefulHyperparamsState):
            hyper = jax.tree.map(lambda n: n._replace(count=jnp.asarray(step, n.count.dtype)) if _counted(n) else n,
                                 node.hyperparams_states, is_leaf=_counted)
            return node._replace(count=jnp.asarray(step, node.count.dtype), hyperparams_states=hyper,
                                 inner_state=schedules_at(node.inner_state, step))
        return node

    schedule_state = (optax.ScaleByScheduleState, optax.InjectStatefulHyperparamsState)
    return jax.tree.map(at, opt_state, is_leaf=lambda n: isinstance(n, schedule_state))


# The mesh axes the Newton–Schulz work is split over: op, the paper's optimizer parallelism, and the
# axes that already split the momentum (fsdp, tp). Left to the partitioner, an fsdp- or tp-split stack
# ran Newton–Schulz split along its matrix dimensions, with collectives in every iteration (4.8 GB a
# step per device for the 124M on fsdp=8, against 0.6 GB split by matrix; docs/benchmarks.md). Not dp:
# replicas, often across slices on the slower network.
NS_SHARD_AXES = ("op", "fsdp", "tp")


def make_optimizer(config: ml_collections.ConfigDict, mesh=None
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """The full update for `config` and the learning-rate schedules to log (name -> step -> lr). The update
    expects `schedules_at(opt_state, step)` (the train step does it): its schedules read that step."""
    o = config.optimizer
    steps = config.train.steps
    adam_lr = schedule(o.learning_rate, o, steps)
    adamw = optax.adamw(adam_lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask)
    schedules = {"learning_rate": adam_lr}
    if o.name == "adamw":
        inner = adamw
    else:
        muon_lr = schedule(o.muon_learning_rate, o, steps)
        schedules["muon_learning_rate"] = muon_lr
        muon = muon_transform(muon_lr, beta=o.muon_beta, nesterov=o.muon_nesterov, ns_steps=o.ns_steps,
                             weight_decay=o.muon_weight_decay, rms_scale=o.rms_scale,
                             scale_mode=o.muon_scale_mode, shard_axis=NS_SHARD_AXES, mesh=mesh,
                             ns_method=o.ns_method)
        inner = optax.multi_transform({MUON: muon, ADAMW: adamw},
                                      lambda params: param_labels(params, o.name))
    # Always a link (identity when off, with the same empty state), so clipping on or off keeps the
    # optimizer state's tree: a checkpoint saved with one resumes with the other.
    clip = optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity()
    return optax.chain(clip, inner), schedules
