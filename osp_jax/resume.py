"""Resuming a run: which config changes a checkpoint refuses, and reading its state onto this run's mesh
and layer layout."""

from __future__ import annotations

import logging

import jax
import ml_collections

from osp_jax.model import Transformer, relayout_layers
from osp_jax.partitioning import abstract_state, on_mesh, state_shardings
from osp_jax.step import TrainState

log = logging.getLogger("osp_jax")

# What of a config shapes the train state (from its model and optimizer sections, plain dicts or ConfigDicts):
# a run resumes only from a checkpoint that agrees on all of it. Everything else (learning rates, schedule,
# train.steps, batch size, mesh, model.scan_layers, dtypes, remat, ...) may change between runs.
STATE_SHAPE = {
    **{f"model.{k}": (lambda m, o, k=k: m[k]) for k in
       ("vocab_size", "dim", "layers", "heads", "kv_heads", "ffn_dim", "norm_scale", "embed_proj", "tie_embeddings")},
    "model.head_dim": lambda m, o: m["head_dim"] or m["dim"] // m["heads"],
    # Clipping and Muon's weight decay are links of the chain whether on or off (optim.make_optimizer):
    # turning them on or off leaves the state's shape as it is.
    "optimizer.name": lambda m, o: o["name"],
}


def check_resume_config(saved: dict | None, config, where: str) -> None:
    """Raises CheckpointMismatch naming every key of STATE_SHAPE on which `config` differs from `saved` (the
    config a checkpoint was saved with, None: unknown), with the old and new values. Keys that `saved`
    lacks (an older version's) are not compared."""
    from osp_jax.checkpoint import CheckpointMismatch

    if not saved:
        return
    differ = []
    for key, shape_of in STATE_SHAPE.items():
        try:
            old = shape_of(saved["model"], saved["optimizer"])
        except KeyError:
            continue
        section, name = key.split(".")
        # A key whose own value is unchanged differs through another one, named on its own.
        if old != shape_of(config.model, config.optimizer) and saved[section][name] != config[section][name]:
            differ.append(f"{key} {saved[section][name]!r} -> {config[section][name]!r}")
    if differ:
        raise CheckpointMismatch(f"{where} was saved with a train state of another shape than this run's: "
                                 f"{', '.join(differ)}; set these back to resume, or train into a new --workdir")


def restore_state(checkpointer, config, tx, target_shardings: TrainState, mesh, *, data_iterator=None):
    """(step, state) from the latest readable checkpoint, onto `target_shardings`.

    Each step tried is first checked against this run's config (`check_resume_config`), then read in the
    layer layout its saved tree has (`model.scan_layers`: stacked and scanned, or unrolled), so a run can
    switch between the two and an unreadable newest step still falls back to older ones of either layout.
    A step of the other layout has its layer stacks moved to this run's (`relayout_layers`), which holds
    the state twice on the devices for a moment."""
    targets, stacked_at = {}, {}  # layers stacked? -> abstract state; step -> layers stacked?

    def target(step: int, saved_tree):
        check_resume_config(checkpointer.read_config(step), config,
                            f"checkpoint step {step} in {checkpointer.directory}")
        stacked = stacked_at[step] = "layers" in saved_tree["params"]
        if stacked not in targets:
            read, shardings = config, target_shardings
            if stacked != config.model.scan_layers:
                read = ml_collections.ConfigDict(config.to_dict())
                read.model.scan_layers = stacked
                shardings = state_shardings(read, Transformer(read.model), tx, mesh)  # outside the mesh context
            with on_mesh(mesh):
                targets[stacked] = abstract_state(read, Transformer(read.model), tx, shardings)
        return targets[stacked]

    step, state = checkpointer.restore(target, data_iterator=data_iterator)
    saved = stacked_at[step]
    if saved == config.model.scan_layers:
        return step, state
    log.info("checkpoint step %d has its layers %s; moved to %s for this run (model.scan_layers=%s)", step,
             "stacked" if saved else "unrolled", "a stack" if config.model.scan_layers else "one module each",
             config.model.scan_layers)
    state = relayout_layers(state, config.model.scan_layers, config.model.layers)
    return step, jax.device_put(state, target_shardings)
