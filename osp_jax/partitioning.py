"""How a run is laid out on its mesh: the train state's shardings and shapes, the jitted step functions,
and global batches from each process's rows.

Everything here works from shapes alone until a step is called, so the same functions serve the train
loop, resume (restore onto another mesh) and the compiler figures of benchmarks/ (`lower_train_step`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
import optax
from flax import linen as nn

from osp_jax import metrics as metrics_lib
from osp_jax import sharding
from osp_jax.model import Transformer, abstract_params
from osp_jax.optim import make_optimizer
from osp_jax.step import TrainState, eval_step, hidden_states, init_state, train_step

# The config key that sets the size of each logical axis the mesh splits (sharding.LOGICAL_AXIS_RULES).
_SPLIT_SIZES = (("train.global_batch_size", "batch"), ("model.vocab_size", "vocab"), ("model.dim", "embed"),
                ("model.ffn_dim", "mlp"), ("model.heads", "heads"), ("model.kv_heads", "kv_heads"))


def check_mesh_fits(config, mesh) -> None:
    """Raises sharding.MeshError, naming the key, its value and the mesh axes, if a size the mesh splits
    (the batch and each accumulated micro-batch over dp*op*fsdp and the processes; heads, kv_heads,
    ffn_dim and vocab_size over tp; dim over fsdp) does not divide evenly: found here, not as an
    IndivisibleError after compiling."""
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    for key, logical in _SPLIT_SIZES:
        axes = rules[logical] or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = int(np.prod([mesh.shape[a] for a in axes]))
        split = " * ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        feeds = sharding.data_shard(mesh)[1] if logical == "batch" else 1
        if feeds > 1:  # the processes feeding distinct rows (fewer than all when tp spans processes)
            parts = int(np.lcm(parts, feeds))
            split += f" and {feeds} processes"
        section, name = key.split(".")
        value = config[section][name]
        if value % parts:
            raise sharding.MeshError(f"config.{key}={value} is not allowed: expected a multiple of {parts}, "
                                     f"as it is split over {split}")
        accum = config.optimizer.grad_accum_steps
        if logical == "batch" and (value // accum) % parts:
            # Else a micro-batch leaves some batch shards with padding, or no rows, to compute.
            raise sharding.MeshError(
                f"config.optimizer.grad_accum_steps={accum} is not allowed: its micro-batches of "
                f"{value // accum} rows (train.global_batch_size={value} / {accum}) must be a multiple of "
                f"{parts}, as each is split over {split}")


@contextlib.contextmanager
def on_mesh(mesh):
    """The mesh and the logical-axis rules that tracing the model and the step functions needs."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        yield


def state_shardings(config, model, tx, mesh) -> TrainState:
    """NamedShardings for every leaf of the train state, from the model's logical axes."""
    boxed = abstract_params(config.model, config.train.seq_len)
    params = sharding.param_shardings(boxed, mesh)
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed))
    masked = optax.MaskedNode
    opt = optax.tree_map_params(tx, lambda p, s: p if isinstance(p, masked) else s, abstract_opt, params,
                                transform_non_params=lambda _: sharding.replicated(mesh),
                                is_leaf=lambda x: isinstance(x, (masked, jax.sharding.NamedSharding)))
    repl = sharding.replicated(mesh)
    return TrainState(step=repl, params=params, opt_state=opt, rng=repl, bad_steps=repl)


def abstract_state(config, model, tx, shardings: TrainState) -> TrainState:
    """The train state as ShapeDtypeStructs carrying `shardings`: a restore target, or for compiling."""
    shapes = jax.eval_shape(functools.partial(init_state, config, model, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_batch(config, mesh) -> dict:
    """Shapes of one global batch, sharded as the loop feeds it: for compiling without data."""
    shape, sh = (config.train.global_batch_size, config.train.seq_len), sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sh)
            for k in ("inputs", "targets", "positions", "segment_ids")}


def jit_init_state(config, model, tx, shardings: TrainState):
    """A fresh train state from a PRNG key, made directly in its shards."""
    return jax.jit(functools.partial(init_state, config, model, tx), out_shardings=shardings)


def jit_train_step(config, model, tx, shardings: TrainState, mesh):
    """The train step, jitted with the state's and the batch's shardings and the state donated."""
    step = functools.partial(train_step, model=model, tx=tx, grad_accum_steps=config.optimizer.grad_accum_steps,
                             pack_mask=config.data.pack_mask)
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(config, model, shardings: TrainState, mesh):
    """(params, batch) -> {"loss_sum", "tokens"}, replicated."""
    return jax.jit(functools.partial(eval_step, model=model, pack_mask=config.data.pack_mask),
                   in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def jit_outlier_stats(config, model, shardings: TrainState, mesh):
    """(params, batch) -> the residual stream's kurtosis and max |activation| (metrics.outlier_stats)."""
    def stats(params, batch):
        hidden = hidden_states(params, batch, model=model, pack_mask=config.data.pack_mask)
        return metrics_lib.outlier_stats(hidden, batch["segment_ids"] > 0)

    return jax.jit(stats, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def lower_train_step(config, mesh):
    """The train step lowered from shapes alone (nothing allocated), as `train` would compile it for
    `mesh`; returns (lowered, abstract state). For compiler figures: memory, FLOPs, sharding."""
    check_mesh_fits(config, mesh)
    model = Transformer(config.model)
    tx, _ = make_optimizer(config, mesh)
    shardings = state_shardings(config, model, tx, mesh)
    with on_mesh(mesh):
        state = abstract_state(config, model, tx, shardings)
        step_fn = jit_train_step(config, model, tx, shardings, mesh)
        return step_fn.lower(state, abstract_batch(config, mesh)), state


def to_global(batch: dict, batch_sharding, global_batch_size: int) -> dict:
    """Host batch (this process's rows) -> one global jax.Array per key, of `global_batch_size` rows
    (stated, not inferred: processes that share rows each give all of them)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                      (global_batch_size,) + np.shape(v)[1:])
            for k, v in batch.items()}
