"""A training run's checkpoint as a model to score: read once, fake-quantised, laid out on the devices.

What osp_jax's lm-evaluation-harness backend (osp_jax.lm_eval_backend) builds before it answers a request,
apart from lm-eval itself: the run's config and tokenizer (`RunCheckpoint`), what its config allows
(`check_bits`, `eval_mesh`), and the jitted forward passes requests use (`Runner`: `token_scores`,
`next_tokens`), in float32 with exact XLA attention (`eval_model_config`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from osp_jax import cli, ptq, sharding, storage
from osp_jax import config as config_lib
from osp_jax import quant as quant_lib
from osp_jax.model import Transformer, abstract_params
from osp_jax.partitioning import on_mesh


class BackendError(cli.UserError, ValueError):
    """A user error (bad model_args, a run that cannot be read, or run at these bits): one line, exit 2."""


def check_bits(model_cfg, bits: quant_lib.Bits, flag: str | None = None, error: type[Exception] = BackendError
               ) -> None:
    """`error` naming `flag` (default lm-eval's model_arg, `bits=W-A-KV`) where the fake quantisers cannot take
    this model at `bits` (quant.check_kv_head_dim): the lm-eval backend and `osp_jax.evaluate` both ask here,
    from the run's config, before a checkpoint is read."""
    try:
        quant_lib.check_kv_head_dim(config_lib.head_dim(model_cfg), bits.kv)
    except ValueError as e:
        raise error(f"{flag or f'bits={bits.w}-{bits.a}-{bits.kv}'}: {e}") from None


def run_config(workdir, error: type[Exception] = BackendError):
    """The validated config of WORKDIR/config.json (train writes it), read without the checkpoint; None when there
    is none (a checkpoint made outside train). `error` names the file and why it cannot be used."""
    path = epath.Path(workdir) / "config.json"
    if not storage.is_file(path):
        return None
    try:
        return config_lib.from_dict(cli.read_json(path, "config", error=error))
    except config_lib.ConfigError as e:
        raise error(f"the config {path} is not valid: {e}") from None


class RunCheckpoint:
    """A training run's checkpoint, for evaluation: its config read cheaply first (WORKDIR/config.json,
    which train writes), its parameters once, when first needed, and shared by every setting scored."""

    def __init__(self, workdir: str, step: int | None = None):
        if not storage.is_dir(workdir):
            what = "a file, not a directory" if storage.is_file(workdir) else "no such directory"
            raise BackendError(f"workdir={workdir}: {what}")
        if step is not None and (isinstance(step, bool) or not str(step).isdigit()):
            raise BackendError(f"step={step!r}: expected a checkpoint step (a non-negative integer)")
        self.workdir, self.requested_step = str(workdir), None if step is None else int(step)
        self._config = None
        self._restored = None

    def config(self):
        """The validated config of WORKDIR/config.json, or None when there is none (a checkpoint made
        outside train): then the checkpoint's own, once it is read."""
        if self._restored is not None:
            return self._restored[2]
        if self._config is None:
            self._config = run_config(self.workdir)
        return self._config

    def restore(self):
        """(step, host float32 params, config), read once."""
        if self._restored is None:
            from osp_jax.evaluate import EvalError, load_checkpoint

            try:
                step, params, config = load_checkpoint(self.workdir, self.requested_step)
            except EvalError as e:
                raise BackendError(str(e)) from None
            self._restored = (step, jax.tree.map(lambda x: np.asarray(x, np.float32), params), config)
        return self._restored

    def tokenizer(self, vocab_size: int | None = None):
        """The tokenizer train copied into WORKDIR."""
        from osp_jax.data import tokenizer as tokenizer_lib

        try:
            path = tokenizer_lib.run_tokenizer_path(self.workdir)
        except ValueError as e:
            raise BackendError(str(e)) from None
        if path is None:
            raise BackendError(f"{self.workdir} holds no tokenizer (tokenizer.json or tokenizer.model, which train "
                               "copies there): the tasks' text needs the run's own tokenizer")
        try:
            tok = tokenizer_lib.load_tokenizer(path)
        except tokenizer_lib.TokenizerError as e:
            raise BackendError(str(e)) from None
        if vocab_size is not None and tok.vocab_size > vocab_size:
            raise BackendError(f"the tokenizer {path} has vocabulary {tok.vocab_size} but the model's vocab_size "
                               f"is {vocab_size}")
        return tok


def eval_model_config(model_cfg):
    """The model section scored: float32 compute and parameters, exact XLA attention, whole logits."""
    c = model_cfg.copy_and_resolve_references()
    c.dtype, c.param_dtype, c.attention, c.remat, c.loss_chunk = "float32", "float32", "xla", "none", 0
    return c


def eval_mesh(config, devices: int | None = None):
    """The run's mesh (config.mesh) over the local devices (the first `devices` of them) where its sizes
    fit their count, else fsdp over all of them."""
    present = jax.local_devices()
    if devices is not None and devices > len(present):
        raise BackendError(f"devices={devices}: only {len(present)} device(s) are present")
    chosen = present[:devices] if devices else present
    sizes = {axis: int(config.mesh[axis]) for axis in sharding.MESH_AXES}
    try:
        sharding.mesh_shape(sizes, len(chosen))
    except sharding.MeshError:
        sizes = {"fsdp": -1}
    return sharding.make_mesh(sizes, chosen)


def token_scores(params, inputs, targets, *, model):
    """At every position: log p(target | the inputs up to it) and whether the target is the argmax,
    (batch, length) each."""
    logits = model.apply({"params": params}, inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def next_tokens(params, inputs, last, *, model):
    """The greedy token after position `last[b]` of each row b."""
    logits = model.apply({"params": params}, inputs)
    return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], axis=-1)


class Runner:
    """The quantised model with its parameters on the mesh, and the two jitted functions requests use."""

    def __init__(self, q: ptq.QuantizedModel, mesh):
        self.mesh = mesh
        model = Transformer(q.model_config, quant=q.spec)
        params_sharding = sharding.param_shardings(abstract_params(q.model_config), mesh)
        self.params = jax.device_put(q.params, params_sharding)
        rows, row = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
        self._score = jax.jit(functools.partial(token_scores, model=model), in_shardings=(params_sharding, rows, rows))
        self._next = jax.jit(functools.partial(next_tokens, model=model), in_shardings=(params_sharding, rows, row))

    def score(self, inputs: np.ndarray, targets: np.ndarray):
        with on_mesh(self.mesh), jax.default_matmul_precision("float32"):
            return jax.device_get(self._score(self.params, inputs, targets))

    def next(self, inputs: np.ndarray, last: np.ndarray) -> np.ndarray:
        with on_mesh(self.mesh), jax.default_matmul_precision("float32"):
            return np.asarray(jax.device_get(self._next(self.params, inputs, last)))
