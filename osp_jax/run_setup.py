"""Setting up a training run: everything `osp_jax.train`'s loop needs, built once, in one `Run`.

In order: the config checked; the gs:// paths' buckets and credentials checked; JAX's persistent compilation
cache turned on; the mesh made and checked against the config's sizes; the workdir locked for this run
(osp_jax.workdir_lock: one writer per workdir); the data opened and its tokenizer checked against the run's,
agreed by every process; the workdir made; model, optimizer and shardings; the train state restored from the latest checkpoint (onto this
mesh and layer layout) or made fresh; config.json and the tokenizer written to the workdir; the step
functions jitted; the metrics writer (with its TensorBoard and W&B sinks) and the step profiler opened.
Anything refused is refused before the workdir's files change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
from etils import epath

from osp_jax import cli, compilation_cache, sharding, storage
from osp_jax import config as config_lib
from osp_jax import metrics as metrics_lib
from osp_jax.model import Transformer, count_params, flops_per_token
from osp_jax.optim import make_optimizer
from osp_jax.partitioning import (check_mesh_fits, jit_eval_step, jit_init_state, jit_outlier_stats, jit_train_step,
                                  on_mesh, state_shardings, to_global)
from osp_jax.profiling import StepProfiler
from osp_jax.resume import restore_state
# The data's half of the set-up, in its own module; these names stay importable here.
from osp_jax.run_data import DataError, data_identity, log_epochs, make_data, same_batch_count  # noqa: F401
from osp_jax.step import TrainState
from osp_jax.workdir_lock import WorkdirBusy, WorkdirLock

log = logging.getLogger("osp_jax")


class Run(NamedTuple):
    """What the train loop needs besides the train state, built by `set_up`. The checkpointer and the
    writer are open: the loop closes them."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    is_main: bool                  # process 0: prints progress and writes the workdir's files
    start_step: int
    train_iter: Any                # host batches of this process's rows
    ckpt_iter: Any                 # train_iter where its position can be checkpointed, else None
    val_batches: list              # global arrays, fixed for the whole run
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Callable              # (state, batch) -> (state, device metrics); donates the state
    eval_fn: Callable              # (params, batch) -> {"loss_sum", "tokens"}
    outlier_fn: Callable           # (params, batch) -> kurtosis and max |activation|
    schedules: dict                # name -> step -> value, logged (learning rates)
    tokens_per_step: int
    throughput: metrics_lib.Throughput
    checkpointer: Any              # osp_jax.checkpoint.Checkpointer
    writer: metrics_lib.MetricWriter
    profiler: StepProfiler         # traces train.profile_steps
    lock: WorkdirLock              # held by process 0 until the loop releases it


def set_up(config: ml_collections.ConfigDict, workdir: str, *,
           make_data_fn: Callable | None = None) -> tuple[Run, TrainState]:
    """The run of `config` in `workdir` and its train state at `Run.start_step`: restored from the latest
    checkpoint if there is one, else fresh. `make_data_fn(config, mesh)` -> (train iterator, validation
    batches, data dir or None) opens the data (default `make_data`). The state is apart from the run: the
    loop's train step donates it."""
    from osp_jax.checkpoint import make_shared_directory

    t = config.train
    is_main = jax.process_index() == 0
    mesh = _checked_mesh(config, workdir)
    lock = _locked_workdir(workdir)
    with contextlib.ExitStack() as undo:  # on a failure, closes what set-up opened; else the loop does
        undo.callback(lock.release)
        train_iter, val_batches, data_dir = _agreed_data(config, workdir, mesh, make_data_fn or make_data)
        val_batches = same_batch_count(val_batches, t.global_batch_size // sharding.data_shard(mesh)[1], t.seq_len)
        # Several processes: made by all, one directory seen by all, or an error on every process (no hang).
        make_shared_directory(workdir)
        model = Transformer(config.model)
        tx, schedules = make_optimizer(config, mesh)
        shardings = state_shardings(config, model, tx, mesh)
        # seqio streams have no iterator state: after a restore they start again from the beginning.
        ckpt_iter = train_iter if hasattr(train_iter, "get_state") else None
        if ckpt_iter is None:
            log.warning("the %s input stream cannot be checkpointed: a resumed run restarts it", config.data.source)
        checkpointer = undo.enter_context(_checkpointer(config, workdir, mesh, data_dir))
        start, state = _restore_or_init(checkpointer, config, model, tx, shardings, mesh, ckpt_iter, workdir)
        if is_main:  # only now: a resume that failed leaves the workdir's files as they were
            write_config(config, workdir)
            if data_dir:
                keep_tokenizer(data_dir, workdir)
        if start >= t.steps:
            log.info("the checkpoint in %s is at step %d, train.steps=%d: nothing to do (raise train.steps to "
                     "train on)", workdir, start, t.steps)
        tokens_per_step = t.global_batch_size * t.seq_len
        log.info("model: %.2f M parameters; mesh %s; %d devices; %d tokens per step",
                 count_params(state.params) / 1e6, dict(mesh.shape), jax.device_count(), tokens_per_step)
        batch_sharding = sharding.batch_sharding(mesh)
        throughput = metrics_lib.Throughput(flops_per_token(config.model, t.seq_len), t.steps, tokens_per_step,
                                            metrics_lib.peak_flops_per_device(t.peak_tflops), jax.device_count())
        run = Run(
            config=config, mesh=mesh, is_main=is_main, start_step=start, train_iter=train_iter,
            ckpt_iter=ckpt_iter, val_batches=[to_global(b, batch_sharding, t.global_batch_size) for b in val_batches],
            batch_sharding=batch_sharding, step_fn=jit_train_step(config, model, tx, shardings, mesh),
            eval_fn=jit_eval_step(config, model, shardings, mesh),
            outlier_fn=jit_outlier_stats(config, model, shardings, mesh), schedules=schedules,
            tokens_per_step=tokens_per_step, throughput=throughput, checkpointer=checkpointer,
            writer=metrics_lib.MetricWriter(str(workdir), tensorboard=t.tensorboard, start_step=start,
                                            wandb_project=t.wandb_project, run_config=config.to_dict()),
            profiler=StepProfiler(t, str(workdir), start), lock=lock)
        undo.pop_all()
    return run, state


def _checked_mesh(config, workdir: str):
    """The config's mesh, after every check that needs no data: the config's values, the gs:// inputs'
    buckets and credentials, the attention kernel, W&B installed where asked for, the sizes the mesh splits.
    Turns the compilation cache on (train.compilation_cache_dir) before anything is compiled."""
    config_lib.validate(config)
    if config.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise config_lib.ConfigError(f"config.train.wandb_project={config.train.wandb_project!r} needs the wandb "
                                     "package: pip install 'osp_jax[wandb]' (or set it to '' for no W&B)")
    # gs:// first (bucket, credentials, a write probe: one line, no retries against an unreachable server), then
    # what a local disk can refuse; seqio's data.path is unused.
    storage.check_all(writes={"--workdir": workdir},
                      reads={"config.data.path": config.data.path if config.data.source != "seqio" else "",
                             "config.train.eval_data": config.train.eval_data})
    cli.check_output_dir(workdir, "--workdir")
    _check_workdir_files(workdir)
    check_attention_backend(config)
    where = compilation_cache.enable(config.train.compilation_cache_dir)
    log.info("compilation cache: %s", where or "off (train.compilation_cache_dir='')")
    mesh = sharding.make_mesh(config.mesh)
    check_mesh_fits(config, mesh)
    return mesh


def _check_workdir_files(workdir: str) -> None:
    """The run's own JSON files, where a resume finds them: each readable (cli.UserError naming it otherwise)."""
    for name, what in (("config.json", "the run's config"), ("data_metadata.json", "the run's data metadata")):
        path = epath.Path(workdir) / name
        if storage.is_file(path):
            cli.read_json(path, what)


def _locked_workdir(workdir: str) -> WorkdirLock:
    """The workdir's lock, taken by process 0 (the others hold an unacquired one); its error (WorkdirBusy, or
    cli.UserError for a gs:// workdir that cannot be written) on every process if process 0 could not take it."""
    from osp_jax.checkpoint import all_processes_ok

    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except cli.UserError as e:  # WorkdirBusy, or a gs:// workdir that cannot be written
            error = e
    if not all_processes_ok(error is None):
        raise error or WorkdirBusy(f"--workdir={workdir}: process 0 could not lock it (its log says why)")
    return lock


def _checkpointer(config, workdir: str, mesh, data_dir: str | None):
    """WORKDIR/checkpoints: saved every train.checkpoint_every steps (0: only at the end), the newest
    train.keep_checkpoints kept; each with the data position, which a resume applies only to the same data
    (seed, path, content) and refuses to drop unless train.allow_data_restart."""
    from osp_jax.checkpoint import Checkpointer

    t = config.train
    checkpointer = Checkpointer(str(epath.Path(workdir) / "checkpoints"), save_every=t.checkpoint_every or t.steps,
                                keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    checkpointer.data_shards = sharding.data_shards(mesh)
    checkpointer.data_identity = data_identity(config, data_dir)
    checkpointer.allow_data_restart = bool(t.allow_data_restart)
    return checkpointer


def _restore_or_init(checkpointer, config, model, tx, shardings: TrainState, mesh, ckpt_iter, workdir: str):
    """(start step, state): the latest checkpoint's, agreed by every process, or a fresh state at step 0."""
    from osp_jax.checkpoint import agreed_latest_step

    if agreed_latest_step(checkpointer) is not None:
        start, state = restore_state(checkpointer, config, tx, shardings, mesh, data_iterator=ckpt_iter)
        log.info("resumed from step %d in %s", start, workdir)
        return start, state
    checkpointer.set_aside_torn()  # saves that never finished: their steps are saved again
    with on_mesh(mesh):
        return 0, jit_init_state(config, model, tx, shardings)(jax.random.key(config.train.seed))


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


# ---------------------------------------------------------------- data
def _agreed_data(config, workdir: str, mesh, make_data_fn: Callable):
    """`make_data_fn(config, mesh)`, with the data's tokenizer checked against the run's. Every process
    stops if one cannot read its data (DataError): the others would wait for it in a collective."""
    from osp_jax.checkpoint import all_processes_ok

    failed = None
    try:
        train_iter, val_batches, data_dir = make_data_fn(config, mesh)
        if data_dir:
            check_tokenizer(data_dir, workdir)
    except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: data.source='seqio' without seqio
        failed = DataError(str(e))
        failed.__cause__ = e
    except Exception as e:  # noqa: BLE001 - any other failure is re-raised as is, after the agreement
        failed = e
    if not all_processes_ok(failed is None):
        raise failed or DataError("another process could not set up its data (its log says why)")
    return train_iter, val_batches, data_dir


# ---------------------------------------------------------------- the workdir's files
def check_tokenizer(data_dir: str, workdir: str) -> None:
    """Raises ValueError if the run already has a tokenizer (WORKDIR's file named by its data_metadata.json, else
    by the data's; without the file, the sha256 data_metadata.json records) that is not the data's (sha256):
    its ids would mean other tokens."""
    from osp_jax.data.tokenizer import data_tokenizer_sha256, run_tokenizer_sha256

    meta = cli.read_json(epath.Path(data_dir) / "metadata.json", "data metadata", error=DataError)
    run_sha, mine = run_tokenizer_sha256(workdir, epath.Path(meta["tokenizer"]).name)
    if run_sha is None:
        return
    mine = mine or f"(the one {epath.Path(workdir) / 'data_metadata.json'} records)"
    data_sha, theirs = data_tokenizer_sha256(data_dir, meta)
    if run_sha != data_sha:
        raise ValueError(f"the run's tokenizer {mine} is not the data's {theirs} (their sha256 differ): "
                         "train this data into a new --workdir, or use data prepared with the run's tokenizer")


def keep_tokenizer(data_dir: str, workdir: str) -> None:
    """Copies the data's tokenizer and metadata into the workdir where missing: export and evaluate read them there."""
    data, run = epath.Path(data_dir), epath.Path(workdir)
    meta = cli.read_json(data / "metadata.json", "data metadata", error=DataError)
    for src, name in ((data / meta["tokenizer"], epath.Path(meta["tokenizer"]).name),
                      (data / "metadata.json", "data_metadata.json")):
        if not storage.exists(run / name):
            cli.copy_atomic(src, run / name)


def write_config(config, workdir: str) -> None:
    """WORKDIR/config.json: the resolved config, which export and evaluate read. Warns naming each key that
    differs from the config.json already there (a resumed run with changed learning rates, say)."""
    path = epath.Path(workdir) / "config.json"
    new = config.to_dict()
    if storage.exists(path):
        old = cli.read_json(path, "the run's config")
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        if changed:
            log.warning("config differs from the one in %s: %s", path, ", ".join(changed))
    cli.write_json(path, new, sort_keys=True)
