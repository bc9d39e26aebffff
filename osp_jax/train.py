"""`python -m osp_jax.train --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]`

A thin loop over the pure step functions of step.py: config -> mesh -> model + optimizer ->
sharded state (fresh or restored) -> jitted step <- Grain batches; state -> Orbax. Re-running the
same command with the same workdir resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from osp_jax import config as config_lib
from osp_jax import metrics as metrics_lib
from osp_jax import sharding
from osp_jax.model import Transformer, abstract_params, count_params, flops_per_token, relayout_layers
from osp_jax.optim import make_optimizer
from osp_jax.preemption import PreemptionNotice
from osp_jax.step import TrainState, eval_step, hidden_states, init_state, train_step

log = logging.getLogger("osp_jax")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class DataError(ValueError):
    """The data cannot feed this run: missing, unreadable, or tokenised for another vocabulary or
    tokenizer. Found before anything is written to the workdir."""


def check_attention_backend(config) -> None:
    """Raises config.ConfigError if model.attention names a kernel this machine cannot run."""
    from osp_jax import attention

    wanted = config.model.attention
    if not attention.runnable_here(wanted):
        needs = "/".join(sorted({p.upper() for p, k in attention.PLATFORM_KERNELS.items() if k == wanted} - {"CUDA"}))
        raise config_lib.ConfigError(
            f"config.model.attention={wanted!r} is not allowed on this machine: it needs a {needs} and JAX's "
            f"backend here is {jax.default_backend()}; use 'auto' (splash on TPU, cuDNN on GPU, XLA elsewhere) "
            "or 'xla'")


# ---------------------------------------------------------------- shardings
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


def jit_train_step(config, model, tx, shardings: TrainState, mesh):
    """The train step, jitted with the state's and the batch's shardings and the state donated."""
    step = functools.partial(train_step, model=model, tx=tx, grad_accum_steps=config.optimizer.grad_accum_steps,
                             pack_mask=config.data.pack_mask)
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def abstract_batch(config, mesh) -> dict:
    """Shapes of one global batch, sharded as the loop feeds it: for compiling without data."""
    shape, sh = (config.train.global_batch_size, config.train.seq_len), sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sh)
            for k in ("inputs", "targets", "positions", "segment_ids")}


def abstract_state(config, model, tx, shardings: TrainState) -> TrainState:
    shapes = jax.eval_shape(functools.partial(init_state, config, model, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# What of a config shapes the train state (from its model and optimizer sections, plain dicts or ConfigDicts):
# a run resumes only from a checkpoint that agrees on all of it. Everything else (learning rates, schedule,
# train.steps, batch size, mesh, model.scan_layers, dtypes, remat, ...) may change between runs.
STATE_SHAPE = {
    **{f"model.{k}": (lambda m, o, k=k: m[k]) for k in
       ("vocab_size", "dim", "layers", "heads", "kv_heads", "ffn_dim", "norm_scale", "embed_proj", "tie_embeddings")},
    "model.head_dim": lambda m, o: m["head_dim"] or m["dim"] // m["heads"],
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
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
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


def lower_train_step(config, mesh):
    """The train step lowered from shapes alone (nothing allocated), as `train` would compile it for
    `mesh`; returns (lowered, abstract state). For compiler figures: memory, FLOPs, sharding."""
    check_mesh_fits(config, mesh)
    model = Transformer(config.model)
    tx, _ = make_optimizer(config, mesh)
    shardings = state_shardings(config, model, tx, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        state = abstract_state(config, model, tx, shardings)
        step_fn = jit_train_step(config, model, tx, shardings, mesh)
        return step_fn.lower(state, abstract_batch(config, mesh)), state


# ---------------------------------------------------------------- data
def make_data(config, mesh):
    """The training iterator and a fixed list of validation batches (host numpy): this process's data
    shard of `mesh` (sharding.data_shard; without a mesh, its own process's)."""
    from osp_jax.data import pipeline

    t, d = config.train, config.data
    # Processes whose devices hold the same batch rows (a tp group across hosts) read the same data.
    shard, shards = sharding.data_shard(mesh) if mesh is not None else (jax.process_index(), jax.process_count())
    feed = dict(process_index=shard, process_count=shards)
    if d.source == "seqio":
        from osp_jax.data.seqio_source import make_seqio_iterator
        train_iter = make_seqio_iterator(d.seqio_task, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                         seed=t.seed, split="train", vocab_size=config.model.vocab_size, **feed)
        val_iter = make_seqio_iterator(d.seqio_task, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                       seed=t.seed, split="validation", **feed)
        return train_iter, [next(val_iter) for _ in range(t.eval_batches)], None
    data_dir = pipeline.resolve_data_dir(d.path)
    meta = pipeline.load_metadata(data_dir)
    note = pipeline.check_vocab(meta, config.model.vocab_size)
    if note:
        log.info("%s", note)
    val_dir = data_dir
    if t.eval_data:
        val_dir = pipeline.resolve_data_dir(t.eval_data)
        try:
            pipeline.check_vocab(pipeline.load_metadata(val_dir), config.model.vocab_size)
        except ValueError as e:
            raise ValueError(f"train.eval_data={t.eval_data}: {e}") from None
    _log_epochs(t.steps * t.global_batch_size * t.seq_len, int(meta["splits"]["train"]["tokens"]), d.path)
    train_iter = pipeline.make_iterator(data_dir, "train", seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                        seed=t.seed, worker_count=d.worker_count, prefetch_buffer=d.prefetch, **feed)
    val_iter = pipeline.make_iterator(val_dir, "validation", seq_len=t.seq_len,
                                      global_batch_size=t.global_batch_size, seed=t.seed, shuffle=False,
                                      num_epochs=None, **feed)
    val_batches = [next(val_iter) for _ in range(t.eval_batches)]
    return train_iter, val_batches, data_dir


def _log_epochs(run_tokens: int, split_tokens: int, path: str) -> float:
    """Says how many passes over the training split the run makes; warns past one, where held-out
    loss and quantisation cost measure memorisation too (docs/ablation.md, the epochs sections)."""
    epochs = run_tokens / max(split_tokens, 1)
    if epochs > 1:
        log.warning("this run is %.2f epochs of %s's training split (%s tokens): documents repeat, so "
                    "held-out loss and 4-bit cost measure memorisation as well as learning", epochs, path,
                    f"{split_tokens:,}")
    else:
        log.info("this run is %.3f epoch of %s's training split (%s tokens)", epochs, path, f"{split_tokens:,}")
    return epochs


def to_global(batch: dict, batch_sharding, global_batch_size: int) -> dict:
    """Host batch (this process's rows) -> one global jax.Array per key, of `global_batch_size` rows
    (stated, not inferred: processes that share rows each give all of them)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v),
                                                      (global_batch_size,) + np.shape(v)[1:])
            for k, v in batch.items()}


# ---------------------------------------------------------------- the loop
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the last logged metrics."""
    from osp_jax.checkpoint import Checkpointer, agreed_latest_step, all_processes_ok, make_shared_directory

    config_lib.validate(config)
    for name, path in (("--workdir", workdir), ("config.data.path", config.data.path)):
        if "://" in str(path):
            raise FileNotFoundError(f"{name}={path}: URLs are not supported yet; use a local or mounted path "
                                    "(e.g. a Cloud Storage FUSE mount such as /gcs/BUCKET/...)")
    t = config.train
    is_main = jax.process_index() == 0
    check_attention_backend(config)
    mesh = sharding.make_mesh(config.mesh)
    check_mesh_fits(config, mesh)
    failed = None
    try:
        train_iter, val_batches, data_dir = make_data(config, mesh)
        if data_dir:
            _check_tokenizer(data_dir, workdir)
    except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: data.source='seqio' without seqio
        failed = DataError(str(e))
        failed.__cause__ = e
    except Exception as e:  # noqa: BLE001 - any other failure is re-raised as is, after the agreement
        failed = e
    # Every process stops if one cannot read its data: the others would wait for it in a collective.
    if not all_processes_ok(failed is None):
        raise failed or DataError("another process could not set up its data (its log says why)")
    # Several processes: made by all, one directory seen by all, or an error on every process (no hang).
    make_shared_directory(workdir)
    model = Transformer(config.model)
    tx, schedules = make_optimizer(config, mesh)
    shardings = state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    # seqio streams have no iterator state: after a restore they start again from the beginning.
    ckpt_iter = train_iter if hasattr(train_iter, "get_state") else None
    if ckpt_iter is None:
        log.warning("the %s input stream cannot be checkpointed: a resumed run restarts it", config.data.source)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every or t.steps,
                                keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    checkpointer.data_shards = sharding.data_shards(mesh)
    try:
        resuming = agreed_latest_step(checkpointer) is not None
    except BaseException:
        checkpointer.close()
        raise
    if resuming:
        try:
            start, state = restore_state(checkpointer, config, tx, shardings, mesh, data_iterator=ckpt_iter)
        except BaseException:
            checkpointer.close()
            raise
        log.info("resumed from step %d in %s", start, workdir)
    else:
        checkpointer.set_aside_torn()  # saves that never finished: their steps are saved again
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        if not resuming:
            init = jax.jit(functools.partial(init_state, config, model, tx), out_shardings=shardings)
            state = init(jax.random.key(t.seed))
            start = 0
        if is_main:  # only now: a resume that failed leaves the workdir's files as they were
            _write_config(config, workdir)
            if data_dir:
                _keep_tokenizer(data_dir, workdir)

        if start >= t.steps:
            log.info("the checkpoint in %s is at step %d, train.steps=%d: nothing to do (raise train.steps to "
                     "train on)", workdir, start, t.steps)
        n_params = count_params(state.params)
        fpt = flops_per_token(config.model, t.seq_len)
        tokens_per_step = t.global_batch_size * t.seq_len
        log.info("model: %.2f M parameters; mesh %s; %d devices; %d tokens per step",
                 n_params / 1e6, dict(mesh.shape), jax.device_count(), tokens_per_step)

        step_fn = jit_train_step(config, model, tx, shardings, mesh)
        eval_fn = jax.jit(functools.partial(eval_step, model=model, pack_mask=config.data.pack_mask),
                          in_shardings=(shardings.params, batch_sharding), out_shardings=repl)
        outlier_fn = jax.jit(lambda p, b: metrics_lib.outlier_stats(
            hidden_states(p, b, model=model, pack_mask=config.data.pack_mask), b["segment_ids"] > 0),
            in_shardings=(shardings.params, batch_sharding), out_shardings=repl)
        val_global = [to_global(b, batch_sharding, t.global_batch_size) for b in val_batches]

        writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard, start_step=start)
        throughput = metrics_lib.Throughput(fpt, t.steps, tokens_per_step,
                                            metrics_lib.peak_flops_per_device(t.peak_tflops), jax.device_count())
        notice = PreemptionNotice(every=t.log_every).__enter__()  # left in the `finally` below
        last: dict = {}
        last_step = None      # the step `last` was logged at
        pending = None        # (step, device metrics) of the previous step: read one step late
        skipped_total = 0
        step = start
        try:
            while step < t.steps:
                if notice.reached(step):
                    log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                    checkpointer.save(step, state, data_iterator=ckpt_iter, config=config.to_dict(), force=True)
                    checkpointer.wait()
                    notice.stopped = True
                    break
                batch = to_global(next(train_iter), batch_sharding, t.global_batch_size)
                if step == start and is_main:
                    log.info("compiling the train step (the first step waits for it)")
                state, device_metrics = step_fn(state, batch)
                step += 1
                if pending is not None:
                    skipped_total += _check_finite(pending, t.max_bad_steps)
                pending = (step, device_metrics)
                if step == start + 1:
                    jax.block_until_ready(device_metrics)
                    throughput.start(step)  # exclude compilation from throughput

                if step % t.log_every == 0 or step == t.steps:
                    skipped_total += _check_finite(pending, t.max_bad_steps)
                    pending = None
                    record = {k: float(v) for k, v in device_metrics.items() if k != "bad_steps"}
                    record.update({name: float(fn(step - 1)) for name, fn in schedules.items()})
                    if step > start + 1:
                        record.update(throughput.measure(step))
                    else:
                        record.update({"tokens_per_sec": None, "mfu": None, "eta_seconds": None})
                    record["skipped_steps"] = skipped_total
                    record["tokens"] = step * tokens_per_step
                    if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                        record["val_loss"] = _evaluate(eval_fn, state.params, val_global)
                    if t.outlier_every and (step % t.outlier_every == 0 or step == t.steps):
                        record.update({k: np.asarray(v) for k, v in
                                       outlier_fn(state.params, val_global[0]).items()})
                    writer.write(step, record)
                    if is_main:
                        print(metrics_lib.progress_line(step, t.steps, record), flush=True)
                    last, last_step = record, step
                    throughput.start(step)  # eval/outlier time is not training time

                if checkpointer.should_save(step) or step == t.steps:
                    if pending is not None:  # never save a state we have not checked
                        skipped_total += _check_finite(pending, t.max_bad_steps)
                        pending = None
                    checkpointer.save(step, state, data_iterator=ckpt_iter, config=config.to_dict(),
                                      force=step == t.steps)
        finally:
            with contextlib.ExitStack() as cleanup:  # each runs (last first), even if wait() raises
                cleanup.push(notice)  # its __exit__
                cleanup.callback(writer.close)
                cleanup.callback(checkpointer.close)
                checkpointer.wait()  # re-raises a failed asynchronous save
    if last and is_main:
        logged = (f"loss {last['loss']:.4f}" + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""))
        if notice.stopped:
            log.info("stopped by SIGTERM at step %d, saved; last logged at step %d: %s; checkpoints in %s", step,
                     last_step, logged, checkpointer.directory)
        else:
            log.info("done at step %d: %s; checkpoints in %s", step, logged, checkpointer.directory)
    return last


def _check_finite(pending, max_bad_steps: int) -> int:
    """Reads a finished step's skip flag; raises after `max_bad_steps` non-finite steps in a row."""
    step, m = pending
    skipped, bad = int(m["skipped"]), int(m["bad_steps"])
    if skipped:
        log.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s): update skipped",
                    step, float(m["loss"]), float(m["grad_norm"]))
    if bad >= max_bad_steps:
        raise TrainingError(f"{bad} consecutive steps had non-finite loss or gradients (last at step {step}); "
                            f"stopping (train.max_bad_steps={max_bad_steps}). The last checkpoint holds finite state.")
    return skipped


def _evaluate(eval_fn, params, batches) -> float:
    total, tokens = 0.0, 0.0
    for b in batches:
        out = eval_fn(params, b)
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return total / max(tokens, 1.0)


def _check_tokenizer(data_dir: str, workdir: str) -> None:
    """Raises ValueError if the run already has a tokenizer (WORKDIR's file named by its data_metadata.json, else
    by the data's; without the file, the sha256 data_metadata.json records) that is not the data's (sha256):
    its ids would mean other tokens."""
    from osp_jax.data.tokenizer import data_tokenizer_sha256, run_tokenizer_sha256

    meta = _read_json(os.path.join(data_dir, "metadata.json"))
    run_sha, mine = run_tokenizer_sha256(workdir, os.path.basename(meta["tokenizer"]))
    if run_sha is None:
        return
    mine = mine or f"(the one {os.path.join(workdir, 'data_metadata.json')} records)"
    data_sha, theirs = data_tokenizer_sha256(data_dir, meta)
    if run_sha != data_sha:
        raise ValueError(f"the run's tokenizer {mine} is not the data's {theirs} (their sha256 differ): "
                         "train this data into a new --workdir, or use data prepared with the run's tokenizer")


def _keep_tokenizer(data_dir: str, workdir: str) -> None:
    """Copies the data's tokenizer and metadata into the workdir where missing: export and evaluate read them there."""
    import shutil

    meta = _read_json(os.path.join(data_dir, "metadata.json"))
    for src, dst in ((os.path.join(data_dir, meta["tokenizer"]), os.path.basename(meta["tokenizer"])),
                     (os.path.join(data_dir, "metadata.json"), "data_metadata.json")):
        target = os.path.join(workdir, dst)
        if not os.path.exists(target):
            shutil.copyfile(src, target + ".tmp")
            os.replace(target + ".tmp", target)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_config(config, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    new = config.to_dict()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        if changed:
            log.warning("config differs from the one in %s: %s", path, ", ".join(changed))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------- CLI
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config(), e.g. configs/tiny.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, not TPU/SLURM).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our own INFO lines; libraries (Orbax, Grain, JAX) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    try:
        recipe = _CONFIG.value
        if recipe is not None:
            recipe.keys()  # the file is loaded lazily, on first use
    except OSError as e:  # the recipe file: missing, or failing as it loads
        _die(f"config error: --config cannot be loaded: {_one_line(_root_cause(e))}")
    if recipe is None or _WORKDIR.value is None:
        _die("both --config=FILE and --workdir=DIR are required, e.g. "
             "python -m osp_jax.train --config=configs/tiny.py --workdir=runs/tiny")
    try:
        sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    except ValueError as e:  # an address without the process count and id
        _die(f"config error: {e}")
    from osp_jax.checkpoint import CheckpointError, CheckpointMismatch

    try:
        config = config_lib.validate(_CONFIG.value)
        train(config, _WORKDIR.value)
    except (config_lib.ConfigError, sharding.MeshError, CheckpointMismatch) as e:
        _die(f"config error: {e}")
    except DataError as e:
        _die(f"data error: {e}")
    except (FileNotFoundError, TrainingError, CheckpointError) as e:
        _die(f"{type(e).__name__}: {e}", code=1)
    except ValueError as e:  # anything else refused by a check; the traceback kept at debug level
        log.debug("traceback", exc_info=True)
        _die(f"{type(e).__name__}: {e}", code=1)


def _die(message: str, code: int = 2) -> None:
    print(f"osp_jax.train: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line, without the quotes a KeyError adds."""
    return " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"") or type(e).__name__


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:  # the config loader chains the real reason
        e = e.__cause__ or e.__context__
    return e


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with what it leaves as a traceback or a bare "FATAL" (an unknown or misspelled
    `--config.KEY`, a value of the wrong type) turned into one line naming the problem, exit code 2, like
    every other config error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _die(f"config error: {e}")
    except (AttributeError, KeyError) as e:
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        _die(f"config error: unknown config key {_one_line(e).replace(chr(39), '')} (in {overrides})")
    except (TypeError, ValueError) as e:
        _die(f"config error: {_one_line(e)} (in {' '.join(argv[1:])})")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
