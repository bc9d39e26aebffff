"""Pure step functions: the train state, one optimizer step, one evaluation step.

Nothing here touches the host, the mesh or the file system; train.py and evaluate.py jit these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from osp_jax import metrics as metrics_lib
from osp_jax.model import LINEAR_INPUTS, Transformer, precast_weights
from osp_jax.optim import schedules_at


class TrainState(NamedTuple):
    step: jax.Array          # optimizer steps taken (int32 scalar)
    params: Any
    opt_state: Any
    rng: jax.Array           # raw uint32 key data, so Orbax stores it as a plain array
    bad_steps: jax.Array     # consecutive non-finite steps (int32 scalar)


def init_state(config: ml_collections.ConfigDict, model: Transformer, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
    """A fresh state; under `jax.jit(..., out_shardings=...)` it is created already sharded."""
    init_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
    params = nn.unbox(model.init(init_rng, tokens)["params"])
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng), bad_steps=jnp.zeros([], jnp.int32))


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in float32 (every position counts)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def _loss_mask(batch: dict):
    return (batch["segment_ids"] > 0).astype(jnp.float32)  # segment id 0 = padding


def window_layout(batch: dict, pack_mask: bool) -> dict:
    """The model's `positions` and `segment_ids` for a packed batch. With `data.pack_mask` each document
    is attended alone, its positions from 0; without, the window is one causal stream (as a plain
    causal LM, the exported Llama included, reads it), so its positions run 0..seq-1 too: restarting
    them per document while attending across documents put earlier tokens at later positions."""
    if pack_mask:
        return {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    return {"positions": None, "segment_ids": None}


def _apply_with_targets(model: Transformer, params, batch: dict, pack_mask: bool, **kwargs):
    return model.apply({"params": params}, batch["inputs"], **window_layout(batch, pack_mask),
                       targets=batch["targets"], **kwargs)


def token_losses(model: Transformer, params, batch: dict, pack_mask: bool):
    """Per-token next-token cross-entropy (float32) and the loss mask (segment id 0 = padding)."""
    return _apply_with_targets(model, params, batch, pack_mask), _loss_mask(batch)


def _forward_loss(model: Transformer, params, batch, pack_mask: bool, step_tokens):
    """This batch's share of the step's loss: the sum of its unmasked tokens' losses over `step_tokens`, the
    unmasked tokens of the whole step, as the model's weighted sum (weights = mask / step_tokens: known
    before the forward pass, which `model.loss_fused` relies on). Summed over micro-batches, it is the
    exact mean over the step's tokens however unevenly padding falls between them."""
    total, _ = _apply_with_targets(model, params, batch, pack_mask, loss_weights=_loss_mask(batch) / step_tokens)
    return total


def train_step(state: TrainState, batch: dict, *, model: Transformer, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1, pack_mask: bool = True) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` (micro-batches accumulated in float32 when grad_accum_steps > 1): the
    loss and gradient are the mean over the batch's unmasked tokens, each micro-batch weighted by its own.

    A step whose loss or gradients are not finite changes nothing but the step and bad-step
    counters: parameters and optimizer state are kept, so a NaN never reaches a checkpoint. The learning-rate
    schedules read `state.step` (`optim.schedules_at`), so a skipped step moves them on all the same.
    """
    step_tokens = jnp.maximum(_loss_mask(batch).sum(), 1.0)  # counted from the batch, before any forward pass
    grad_fn = jax.value_and_grad(lambda p, b: _forward_loss(model, p, b, pack_mask, step_tokens))
    # model.precast_weights: the matmul weights in the compute dtype once a step, before the
    # accumulation loop and outside the layers' remat; their gradients come back in that dtype, as the
    # model's own casts would have made them, and are cast up with the rest below.
    params = precast_weights(state.params, model.config) if model.config.precast_weights else state.params
    if grad_accum_steps == 1:
        loss, grads = grad_fn(params, batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    else:
        # Micro-batch i takes rows i, i + A, i + 2A, ... (A = grad_accum_steps): every device's block of
        # the batch gives each micro-batch its share, so no row moves between devices. Consecutive rows
        # put each micro-batch on a few devices and made XLA reshard the batch every step.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, mb):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, mb)
            return (loss_sum + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros([], jnp.float32), zeros), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)  # sums of token-weighted shares

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    new_step = state.step + 1

    def update(params, opt_state, grads):
        # The schedules read new_step - 1, not state.step: reading the donated step inside the branch made
        # XLA copy its buffer (test_the_skip_guard_updates_the_donated_state_in_place).
        updates, new_opt_state = tx.update(grads, schedules_at(opt_state, new_step - 1), params)
        return optax.apply_updates(params, updates), new_opt_state

    # A branch, not `where(finite, new, old)` on every leaf: the select kept the old optimizer state
    # alive next to the new one, and XLA then copied the whole donated state (parameters and moments)
    # at the start of each step (15.82 GiB for the 1.4B with AdamW, CPU compiler; docs/benchmarks.md).
    # The branch updates it in place.
    new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o, g: (p, o),
                                             state.params, state.opt_state, grads)
    new_state = TrainState(
        step=new_step,
        params=new_params,
        opt_state=new_opt_state,
        rng=state.rng,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32),
               "bad_steps": new_state.bad_steps,
               "param_norm": optax.tree.norm(new_params)}
    return new_state, metrics


def token_weights(batch: dict):
    """Each target's weight in the evaluation loss (float32): the batch's own `weights` where it carries
    them (evaluate's, cut at --max-tokens), else 1 on every real token and 0 on padding (segment id 0)."""
    if "weights" in batch:
        return batch["weights"].astype(jnp.float32)
    return _loss_mask(batch)


def eval_step(params, batch: dict, *, model: Transformer, pack_mask: bool = True, outliers: bool = False) -> dict:
    """Summed float32 loss and scored-token count (`token_weights`), so batches of any size combine exactly.

    With `outliers`, from the same forward pass, the `metrics.outlier_sums` of the residual stream
    (after the embedding and every layer: `kurtosis_sum`, `max_abs`, (layers + 1,)) and of every linear
    layer's input as the activation quantiser sees it (`qkv_in.kurtosis_sum`, ..., (layers,)).
    """
    weights = token_weights(batch)
    if not outliers:
        losses = _apply_with_targets(model, params, batch, pack_mask)
        return {"loss_sum": (losses * weights).sum(), "tokens": weights.sum()}
    (logits, hidden), state = model.apply({"params": params}, batch["inputs"], **window_layout(batch, pack_mask),
                                          return_hidden=True, mutable=["intermediates"])
    # The model returns per-token losses or logits with hidden states, never both: this is its own loss
    # (`model.chunked_cross_entropy` in one chunk) on the logits it returned.
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    stats = {"loss_sum": (losses * weights).sum(), "tokens": weights.sum(),
             **metrics_lib.outlier_sums(*metrics_lib.token_outliers(hidden), weights)}
    for name, (kurtosis, max_abs) in linear_inputs(state.get("intermediates", {})).items():
        sums = metrics_lib.outlier_sums(kurtosis, max_abs, weights)
        stats.update({f"{name}.{k}": v for k, v in sums.items()})
    return stats


def linear_inputs(intermediates) -> dict:
    """`model.observe`d per-token (kurtosis, max |x|) of the linear layers' inputs -> {name: (kurtosis,
    max_abs)}, each (layers, batch, seq), from the scanned stack or from layers_0, layers_1, ..."""
    found: dict = {}

    def visit(tree, layer):
        for key, value in tree.items():
            if key in LINEAR_INPUTS:
                ((kurt, max_abs),) = value
                found.setdefault(key, []).append((layer, kurt, max_abs))
            elif isinstance(value, Mapping):
                visit(value, int(key.split("_", 1)[1]) if key.startswith("layers_") else layer)

    visit(intermediates, None)
    out = {}
    for key, items in found.items():
        if len(items) == 1 and items[0][0] is None:  # scanned: already stacked over layers
            out[key] = items[0][1:]
        else:
            items.sort(key=lambda t: t[0])
            out[key] = (jnp.stack([t[1] for t in items]), jnp.stack([t[2] for t in items]))
    return out


def hidden_states(params, batch: dict, *, model: Transformer, pack_mask: bool = True):
    """Residual stream after the embedding and every layer: (layers + 1, batch, seq, dim)."""
    _, hidden = model.apply({"params": params}, batch["inputs"], **window_layout(batch, pack_mask),
                            return_hidden=True)
    return hidden
