"""Defaults and validation: the one place that knows every config key.

Recipes in `configs/` start from `defaults()` and change values; they never add keys. `validate()`
checks a finished config against the defaults (unknown keys, types) and against the rules below
(choices, ranges, shapes that must divide), and raises `ConfigError` naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections

from osp_jax import compilation_cache

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config key has a value that cannot be trained with."""


# Choices for string keys. One table, so the error message and the check cannot drift apart.
CHOICES = {
    "model.norm_scale": ("single", "channel"),
    "model.dtype": ("float32", "bfloat16"),  # float16 would need loss scaling, which osp_jax does not do
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_attn", "dots_attn_norms", "dots_no_batch", "save_qkv_out"),
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "optimizer.name": ("muon", "muon_all", "adamw"),
    "optimizer.schedule": ("cosine", "wsd", "constant"),
    "optimizer.muon_scale_mode": ("rms", "shape"),
    "optimizer.ns_method": ("quintic", "polar_express", "gram"),  # osp_jax.newton_schulz.NS_METHODS
    "data.source": ("grain", "seqio"),
}

# Keys that may be None in a recipe although their default is a number or a string.
NULLABLE = {"model.head_dim", "optimizer.decay_steps", "data.seqio_task", "train.peak_tflops",
            "train.eval_data", "train.wandb_project"}


def defaults() -> ConfigDict:  # one table of every key (a line each), so longer than the ~80-line rule
    """Every key osp_jax knows, with the value used when a recipe does not set it."""
    c = ConfigDict()

    c.model = ConfigDict()
    c.model.vocab_size = 4096
    c.model.dim = 128
    c.model.layers = 4
    c.model.heads = 4
    c.model.kv_heads = 4          # < heads: grouped-query attention
    c.model.head_dim = ml_collections.config_dict.placeholder(int)  # None: dim // heads
    c.model.ffn_dim = 352         # SwiGLU hidden width
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-5
    c.model.norm_scale = "single"  # "single" = SSNorm (one scalar per norm), "channel" = RMSNorm
    c.model.embed_proj = True      # EmbProj: dim x dim projections after embedding / before head
    c.model.tie_embeddings = False
    c.model.init_std = 0.02
    c.model.dtype = "bfloat16"     # compute dtype
    c.model.param_dtype = "float32"
    c.model.remat = "full"         # activation checkpointing policy for each scanned layer
    c.model.scan_layers = True
    c.model.attention = "auto"     # auto: splash on TPU, cuDNN on GPU (bf16 models), XLA elsewhere
    c.model.max_segments = 16      # cuDNN: documents per window as a packed layout; 0 = dense mask
    c.model.loss_chunk = 0         # >0: the loss sees logits for this many positions at a time
    c.model.loss_fused = False     # training loss: the head's gradients formed chunk by chunk in the forward pass
    c.model.precast_weights = False  # train step: matmul weights cast to `dtype` once, not in every layer call

    c.optimizer = ConfigDict()
    c.optimizer.name = "muon"      # muon | muon_all | adamw
    c.optimizer.learning_rate = 3e-3    # AdamW leaves (embedding, head, norms) or all, for adamw
    c.optimizer.muon_learning_rate = 3e-3  # Muon leaves; RMS-matched to AdamW, so start equal
    c.optimizer.weight_decay = 0.1
    c.optimizer.muon_weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.muon_beta = 0.95
    c.optimizer.muon_nesterov = True
    c.optimizer.ns_steps = 5
    # Newton–Schulz: polar_express (the quintic's FLOPs, 25-47% less error after 5 steps: the most accurate per
    # FLOP, issue 22) | quintic (the OSP paper's, exact) | gram (osp_jax/newton_schulz.py; docs/benchmarks.md)
    c.optimizer.ns_method = "polar_express"
    c.optimizer.rms_scale = 0.2
    c.optimizer.muon_scale_mode = "rms"  # rms: rms_scale*sqrt(max(fan_in, fan_out)); shape: sqrt(max(1, out/in))
    c.optimizer.schedule = "cosine"      # cosine | wsd | constant, each after a linear warmup
    c.optimizer.warmup_steps = 10
    c.optimizer.decay_steps = ml_collections.config_dict.placeholder(int)  # None: train.steps
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.wsd_decay_fraction = 0.2  # WSD: fraction of steps spent decaying at the end
    c.optimizer.clip_norm = 1.0           # global-norm clipping; 0 disables
    c.optimizer.grad_accum_steps = 1      # micro-batches per optimizer step (accumulated in the step)

    c.train = ConfigDict()
    c.train.steps = 200
    c.train.seed = 0
    c.train.global_batch_size = 16   # sequences per optimizer step, over all processes
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 100         # 0 disables validation loss
    c.train.eval_batches = 4
    c.train.eval_data = ml_collections.config_dict.placeholder(str)  # None: the validation split of data.path
    c.train.checkpoint_every = 100   # 0: only at the end and on preemption
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.outlier_every = 50       # kurtosis / max|act| on a fixed held-out batch; 0 disables
    c.train.max_bad_steps = 10       # consecutive non-finite steps before training stops
    c.train.allow_data_restart = False  # a resume that cannot go on from the saved data position (other data,
                                        # seed, or layout) starts the data again instead of stopping
    c.train.peak_tflops = ml_collections.config_dict.placeholder(float)  # per device; None: looked up from the device kind
    c.train.tensorboard = True
    # JAX's persistent compilation cache (osp_jax.compilation_cache): a local or gs:// directory; '' off.
    c.train.compilation_cache_dir = compilation_cache.default_dir()
    c.train.profile_steps = ""       # "START:STOP": a jax.profiler trace of the steps after START up to STOP,
                                     # into WORKDIR/profile (TensorBoard/XProf); '' off
    c.train.profile_all_processes = False  # False: process 0 alone writes the trace
    c.train.wandb_project = ""       # a Weights & Biases project to log metrics.jsonl's records to; '' off

    c.data = ConfigDict()
    c.data.source = "grain"          # grain | seqio
    c.data.path = "builtin"          # a directory made by osp_jax.data.prepare, or "builtin"
    c.data.seqio_task = ml_collections.config_dict.placeholder(str)
    c.data.pack_mask = True          # attention stays within a document of a packed window (False: one causal
                                     # stream over the window, positions 0..seq_len-1)
    c.data.worker_count = 0          # Grain worker processes (0: threads in this process)
    c.data.prefetch = 2

    c.mesh = ConfigDict()            # sizes; -1 fills with the devices left; product = device count
    c.mesh.dp = 1
    c.mesh.op = 1
    c.mesh.fsdp = -1
    c.mesh.tp = 1
    # Multislice: how many slices the dp and fsdp axes span, over the data-center network (DCN). The four
    # sizes above are then each slice's (ICI); dp's whole size is dcn_dp * dp, fsdp's dcn_fsdp * fsdp.
    c.mesh.dcn_dp = 1
    c.mesh.dcn_fsdp = 1
    return c


def _flatten(cfg: ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _type_ok(default: Any, value: Any, key: str) -> bool:
    if value is None:
        return key in NULLABLE
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float) or (default is None and key in NULLABLE and isinstance(value, float)):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, str):
        return isinstance(value, str)
    return True  # None defaults: any value of the placeholder's type (ConfigDict enforced it)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{key}={value!r} is not allowed: expected {allowed}")


def validate(config: ConfigDict) -> ConfigDict:
    """Checks every key of `config`; returns it unchanged, or raises ConfigError naming the key."""
    given = _check_keys(config)
    _check_ranges(given)
    _check_model(config.model, config.train)
    _check_training(config.optimizer, config.train, config.data)
    _check_mesh(config.mesh)
    _check_profile_steps(config.train)
    return config


def _check_keys(config: ConfigDict) -> dict[str, Any]:
    """`config` flattened ({"model.dim": 128, ...}): every key known, none missing, each of its default's type
    and, for a string key of CHOICES, one of them."""
    reference = _flatten(defaults())
    given = _flatten(config)
    for key in given:
        if key not in reference:
            near = difflib.get_close_matches(key, list(reference), n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; known sections: {sorted({k.split('.')[0] for k in reference})}"
            raise ConfigError(f"config.{key} is not a known key{hint}")
    for key, default in reference.items():
        if key not in given:
            raise ConfigError(f"config.{key} is missing (default {default!r}); start recipes from osp_jax.config.defaults()")
        value = given[key]
        if not _type_ok(default, value, key):
            _fail(key, value, f"a value of type {type(default).__name__}")
        if key in CHOICES and value not in CHOICES[key]:
            _fail(key, value, f"one of {', '.join(CHOICES[key])}")
    return given


def _check_ranges(given: dict[str, Any]) -> None:
    """The numeric keys' ranges, one key at a time."""
    positive = ["model.vocab_size", "model.dim", "model.layers", "model.heads", "model.kv_heads",
                "model.ffn_dim", "train.steps", "train.global_batch_size", "train.seq_len",
                "train.log_every", "train.keep_checkpoints", "train.max_bad_steps",
                "train.eval_batches", "optimizer.ns_steps", "optimizer.grad_accum_steps"]
    for key in positive:
        if given[key] <= 0:
            _fail(key, given[key], "a positive integer")
    non_negative = ["train.eval_every", "train.checkpoint_every", "train.outlier_every",
                    "optimizer.warmup_steps", "optimizer.clip_norm", "optimizer.weight_decay",
                    "optimizer.muon_weight_decay", "data.worker_count", "data.prefetch", "train.seed",
                    "model.max_segments"]
    for key in non_negative:
        if not (given[key] >= 0 and math.isfinite(given[key])):  # NaN fails every comparison
            _fail(key, given[key], "a finite value >= 0")
    for key in ["optimizer.learning_rate", "optimizer.muon_learning_rate", "model.rope_theta",
                "model.norm_eps", "model.init_std", "optimizer.eps", "optimizer.rms_scale"]:
        if not (given[key] > 0 and math.isfinite(given[key])):
            _fail(key, given[key], "a finite value > 0")
    for key in ["optimizer.b1", "optimizer.b2", "optimizer.muon_beta"]:
        if not 0 <= given[key] < 1:
            _fail(key, given[key], "a value in [0, 1)")
    for key in ["optimizer.min_lr_ratio", "optimizer.wsd_decay_fraction"]:
        if not 0 <= given[key] <= 1:
            _fail(key, given[key], "a value in [0, 1]")


def _check_model(m: ConfigDict, t: ConfigDict) -> None:
    """Shapes the model needs to be built: heads that divide, head_dim RoPE can rotate, a loss chunk that
    divides the sequence, an attention backend that takes the compute dtype."""
    if m.dim % m.heads and m.head_dim is None:
        _fail("model.dim", m.dim, f"a multiple of model.heads={m.heads} (or set model.head_dim)")
    if m.head_dim is not None and (m.head_dim <= 0 or m.head_dim % 2):
        _fail("model.head_dim", m.head_dim, "a positive even integer (RoPE rotates pairs)")
    if (m.head_dim or m.dim // m.heads) % 2:
        _fail("model.dim", m.dim, f"dim / heads even (RoPE rotates pairs); got head_dim {m.dim // m.heads}")
    if m.loss_chunk < 0 or (m.loss_chunk and t.seq_len % m.loss_chunk):
        _fail("model.loss_chunk", m.loss_chunk, f"0 (off) or a divisor of train.seq_len={t.seq_len}")
    if m.attention == "cudnn" and m.dtype == "float32":
        _fail("model.attention", m.attention, "auto, xla or splash with model.dtype='float32': cuDNN's fused "
              "attention takes bfloat16 inputs (auto picks XLA's attention for a float32 model on a GPU)")
    if m.heads % m.kv_heads:
        _fail("model.kv_heads", m.kv_heads, f"a divisor of model.heads={m.heads}")


def _check_training(o: ConfigDict, t: ConfigDict, d: ConfigDict) -> None:
    """The schedule, the batch's micro-batches, the data source and the peak FLOPs, against each other."""
    if o.decay_steps is not None and o.decay_steps <= 0:
        _fail("optimizer.decay_steps", o.decay_steps, "a positive integer or None (= train.steps)")
    if o.warmup_steps > (o.decay_steps or t.steps):
        _fail("optimizer.warmup_steps", o.warmup_steps,
              f"at most the decay length {(o.decay_steps or t.steps)}")
    if t.global_batch_size % o.grad_accum_steps:
        _fail("optimizer.grad_accum_steps", o.grad_accum_steps,
              f"a divisor of train.global_batch_size={t.global_batch_size}")
    if d.source == "seqio" and not d.seqio_task:
        _fail("data.seqio_task", d.seqio_task, "a registered seqio Task or Mixture name when data.source='seqio'")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        _fail("train.peak_tflops", t.peak_tflops, "a positive number or None")


def _check_mesh(mesh: ConfigDict) -> None:
    for axis in ("dp", "op", "fsdp", "tp"):
        size = mesh[axis]
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", size, "a positive size or -1 (fill with the devices left)")
    if sum(mesh[a] == -1 for a in ("dp", "op", "fsdp", "tp")) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1 "
                          f"(got dp={mesh.dp}, op={mesh.op}, fsdp={mesh.fsdp}, tp={mesh.tp})")
    for key in ("dcn_dp", "dcn_fsdp"):
        if mesh[key] < 1:
            _fail(f"mesh.{key}", mesh[key], "a positive number of slices (1: within one slice)")


def profile_window(text: str) -> tuple[int, int] | None:
    """`train.profile_steps` as (START, STOP): the trace holds the steps that take the state from step START
    to step STOP (logged as START + 1 .. STOP). None for ''. Raises ValueError on any other form."""
    if not text.strip():
        return None
    start, sep, stop = text.partition(":")
    if not sep or not start.strip().isdigit() or not stop.strip().isdigit():
        raise ValueError(text)
    return int(start), int(stop)


def _check_profile_steps(t: ConfigDict) -> None:
    try:
        window = profile_window(t.profile_steps)
    except ValueError:
        _fail("train.profile_steps", t.profile_steps, "'' (off) or 'START:STOP' with integers, e.g. '100:103'")
    if window and not 0 <= window[0] < window[1] <= t.steps:
        _fail("train.profile_steps", t.profile_steps,
              f"'START:STOP' with 0 <= START < STOP <= train.steps={t.steps}")


def head_dim(model: ConfigDict) -> int:
    return model.head_dim or model.dim // model.heads


def from_dict(values: dict) -> ConfigDict:
    """Rebuilds a validated config from `ConfigDict.to_dict()` output (e.g. a checkpoint's or a workdir's config.json)."""
    config = defaults()
    config.unlock()
    for section, entries in values.items():
        if section not in config:
            raise ConfigError(f"config.{section} is not a known section")
        for key, value in entries.items():
            if key not in config[section]:
                raise ConfigError(f"config.{section}.{key} is not a known key")
            config[section][key] = value
    return validate(config)
