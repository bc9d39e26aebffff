"""`python -m osp_jax.export --from-hf=HF_DIR --workdir=DIR`: a Hugging Face Llama into an osp_jax workdir.

Continued pretraining from a Llama checkpoint: WORKDIR gets config.json (per-channel RMSNorm, no
EmbProj: a per-channel gain cannot become SSNorm's one scale), the tokenizer with data_metadata.json,
a recipe to train it with, and an Orbax checkpoint at --step with a fresh optimizer state. Weights are
read with the `safetensors` library, a tensor at a time (`safe_open`), or from `.bin` files only with
`torch.load(..., weights_only=True)`; configs are read as JSON, and configs asking for remote code are
refused: nothing from the input directory is ever executed. Which Llama tensor becomes which
parameter, in which layout, is the roles table's (osp_jax.roles). A gs:// HF_DIR is downloaded to a local
temporary directory first (safetensors and torch read local files); a gs:// WORKDIR is written through
hf_io.staged_directory (staged locally, uploaded with its checkpoint's commit file and config.json last).
"""

from __future__ import annotations

import os
import pprint
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from etils import epath

from osp_jax import cli, roles, storage
from osp_jax.hf_io import (BIN_FILE, BIN_INDEX_FILE, INDEX_FILE, RECIPE_FILE, SINGLE_FILE, ExportError,
                           check_not_clobbering, check_output, check_params, read_json, say, staged_directory,
                           write_json)

# safetensors dtype codes this module reads (imports may come in half precision too).
READ_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
               "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}


def _check_llama(hf_config: dict, path: str) -> None:
    if "auto_map" in hf_config:
        raise ExportError(f"{path} asks for custom code (auto_map={hf_config['auto_map']}); refusing to "
                          "import: osp_jax never runs remote code (trust_remote_code) and cannot know what "
                          "such a model computes")
    arch, mtype = hf_config.get("architectures") or [], hf_config.get("model_type")
    if mtype != "llama" or any(a != "LlamaForCausalLM" for a in arch):
        raise ExportError(f"{path} is model_type={mtype!r}, architectures={arch}: only Llama "
                          "(model_type='llama', LlamaForCausalLM) can be imported")
    for key, ok in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,))):
        if hf_config.get(key, ok[0]) not in ok:
            raise ExportError(f"{path}: {key}={hf_config[key]!r} is not supported (osp_jax needs {ok[0]!r})")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{path}: RoPE type {rope_type!r} is not supported (osp_jax implements plain RoPE)")
    if hf_config.get("pretraining_tp", 1) not in (1, None):
        raise ExportError(f"{path}: pretraining_tp={hf_config['pretraining_tp']} is not supported; expected 1")


def _read_bin(path: str) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:  # weights_only: tensors and plain containers only; a pickle that names any other callable is refused
        state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, TypeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"refusing to load {path}: not a plain tensor file (torch.load with "
                          f"weights_only=True rejected it: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} does not hold a flat dict of tensors")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def _safe_name(hf_dir: str, name: str) -> str:
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise ExportError(f"{hf_dir}: the weight index names a file outside the directory: {name!r}")
    return os.path.join(hf_dir, name)


class LazyTensors(Mapping):
    """Tensors by name, each read only when asked for: `thunks` maps a name to a function reading it."""

    def __init__(self, thunks: dict[str, Callable[[], np.ndarray]]):
        self._thunks = thunks

    def __getitem__(self, name: str) -> np.ndarray:
        return self._thunks[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def thunks(self) -> dict[str, Callable[[], np.ndarray]]:
        return dict(self._thunks)


def read_safetensors(path: str) -> LazyTensors:
    """A safetensors file's tensors (float types only) through the safetensors library, each read when
    asked for: the header is checked here, the data is not touched."""
    from safetensors import SafetensorError, safe_open

    try:
        with open(path, "rb") as f:  # the OS's own reason for a missing file or a directory
            if not f.read(1):
                raise ExportError(f"{path} is empty: expected a safetensors file")
        with safe_open(path, framework="np") as f:
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise ExportError(f"{path} is not a safetensors file ({e})") from None
    for name, code in dtypes.items():
        if code not in READ_DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {code}; expected one of {', '.join(READ_DTYPES)}")

    def read(name: str) -> np.ndarray:
        with safe_open(path, framework="np") as f:
            return f.get_tensor(name)

    return LazyTensors({name: (lambda name=name: read(name)) for name in sorted(dtypes)})


def read_hf_weights(hf_dir: str) -> Mapping[str, np.ndarray]:
    """safetensors (single or sharded, each tensor read when asked for) preferred; `.bin` (single or
    sharded) read with weights_only=True."""
    for single, index, reader in ((SINGLE_FILE, INDEX_FILE, read_safetensors), (BIN_FILE, BIN_INDEX_FILE, _read_bin)):
        if storage.is_file(epath.Path(hf_dir) / single):
            return reader(os.fspath(epath.Path(hf_dir) / single))
        if storage.is_file(epath.Path(hf_dir) / index):
            weight_map = read_json(epath.Path(hf_dir) / index, "weight index").get("weight_map") or {}
            out: dict = {}
            for name in sorted(set(weight_map.values())):
                path = _safe_name(hf_dir, name)
                if not storage.is_file(path):
                    raise ExportError(f"{hf_dir}: {index} lists the shard {name}, which is missing")
                shard = reader(path)
                out.update(shard.thunks() if isinstance(shard, LazyTensors) else {k: (lambda v=v: v) for k, v in shard.items()})
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise ExportError(f"{hf_dir}: tensors listed in {index} are missing from the shards: {missing[:5]}")
            return LazyTensors(out)
    raise ExportError(f"{hf_dir} has no weights: expected {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE}")


def _first_id(value) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def import_config(hf: dict, optimizer: str, seq_cap: int = 4096):
    """An osp_jax config for the Llama described by `hf`: per-channel norms, no EmbProj."""
    from osp_jax import config as config_lib

    config = config_lib.defaults()
    m = config.model
    heads = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    hd = int(hf.get("head_dim") or dim // heads)
    rope = hf.get("rope_parameters") or {}
    m.vocab_size = int(hf["vocab_size"])
    m.dim = dim
    m.layers = int(hf["num_hidden_layers"])
    m.heads = heads
    m.kv_heads = int(hf.get("num_key_value_heads") or heads)
    m.head_dim = None if hd == dim // heads else hd
    m.ffn_dim = int(hf["intermediate_size"])
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.norm_scale = "channel"
    m.embed_proj = False
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", m.init_std))
    max_pos = int(hf.get("max_position_embeddings", config.train.seq_len))
    config.train.seq_len = min(max_pos, seq_cap)
    if max_pos > seq_cap:
        say(f"max_position_embeddings={max_pos}: training sequence length set to {seq_cap} "
            "(change it with --config.train.seq_len)")
    config.optimizer.name = optimizer
    try:
        return config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise ExportError(f"the Llama config cannot be expressed in osp_jax: {e}") from None


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def osp_params(weights: Mapping[str, np.ndarray], config, param_dtype) -> dict:
    """Llama tensors -> the osp_jax parameter tree that `config.model` builds, every tensor consumed
    exactly once, a tensor at a time, in the roles table's order."""
    import jax
    from flax import linen as nn

    from osp_jax.model import abstract_params

    c = config.model
    names = {k for k in weights if not k.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        """`name` in float32, with the shape the config implies (PyTorch (out, in) layout)."""
        if name not in names:
            raise ExportError(f"the Llama checkpoint has no tensor {name}")
        w = weights[name]
        if tuple(np.shape(w)) != shape:
            raise ExportError(f"the Llama checkpoint's {name} has shape {list(np.shape(w))}, but its config.json "
                              f"implies {list(shape)}")
        used.add(name)
        return np.asarray(w, np.float32)

    def convert(role, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
        return roles.from_hf(role, get(role.hf_name.format(i=layer), roles.hf_shape(role, shape, c.dim)), shape)

    leaves = [(roles.path_names(p), tuple(s.shape))
              for p, s in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(c)))[0]]
    params: dict = {}
    for role in roles.ROLES:
        for path, shape in leaves:
            if roles.find(path) is not role:
                continue
            if role.hf_name is None:
                raise ExportError(f"osp_jax's {'/'.join(path)} has no Llama tensor to import from")
            if path[0] == "layers":  # scanned: one (layers, ...) stack
                value = np.stack([convert(role, i, shape[1:]) for i in range(c.layers)])
            else:
                value = convert(role, int(path[0][len("layers_"):]) if role.per_layer else None, shape)
            _put(params, path, value.astype(param_dtype))
    if c.tie_embeddings and roles.LM_HEAD.hf_name in names:  # some tied checkpoints still store the (shared) head
        get(roles.LM_HEAD.hf_name, (c.vocab_size, c.dim))
    extra = sorted(names - used)
    if extra:
        raise ExportError(f"the Llama checkpoint has tensors osp_jax has no place for: {extra[:5]}"
                          f"{' ...' if len(extra) > 5 else ''}")
    return params


def _tokenizer_note(hf_dir: str, hf: dict) -> dict | None:
    """data_metadata.json for the import (the note export reads the special ids from), from HF_DIR's
    tokenizer.json and generation_config.json, read before any weight is; None without a tokenizer.json."""
    src = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(src):
        say(f"warning: {hf_dir} has no tokenizer.json; the workdir gets no tokenizer (export will warn too)")
        return None
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(src)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        why = "is empty" if os.path.getsize(src) == 0 else f"cannot be read ({cli.one_line(e)})"
        raise ExportError(f"the tokenizer {src} {why}: expected a Hugging Face tokenizer.json") from None
    gen_path = os.path.join(hf_dir, "generation_config.json")
    gen = read_json(gen_path, "generation config") if os.path.isfile(gen_path) else {}
    special = lambda key: _first_id(hf.get(key) if hf.get(key) is not None else gen.get(key))
    return {
        "format": "osp_jax.hf_import",
        "note": "written by osp_jax.export --from-hf: the imported model's tokenizer and special ids; "
                "prepare training data with this tokenizer.json",
        "tokenizer": "tokenizer.json",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eos_id": special("eos_token_id"), "bos_id": special("bos_token_id"), "pad_id": special("pad_token_id"),
    }


def _import_tokenizer(hf_dir: str, note: dict | None, out_dir: str) -> None:
    """Copies tokenizer.json and writes `note` (`_tokenizer_note`) as data_metadata.json."""
    if note is None:
        return
    shutil.copyfile(os.path.join(hf_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "data_metadata.json"), note)


def _write_recipe(path: str, config) -> None:
    body = pprint.pformat(config.to_dict(), width=100, sort_dicts=True)
    cli.write_text_atomic(path, '"""Recipe for continued pretraining of a model imported by `python -m osp_jax.export --from-hf`.\n\n'
                          "    python -m osp_jax.train --config=THIS_FILE --workdir=THIS_DIR --config.data.path=DATA\n"
                          '"""\nfrom osp_jax.config import from_dict\n\nCONFIG = ' + body +
                          "\n\n\ndef get_config():\n    return from_dict(CONFIG)\n")


def _import_downloaded(hf_dir: str, workdir: str, **options) -> str:
    """`import_hf` of a local copy of the gs:// directory `hf_dir` (its files, not its subdirectories)."""
    with tempfile.TemporaryDirectory(prefix="osp_jax-from-hf-") as local:
        say(f"downloading {hf_dir} to {local} to read it")
        for name in storage.names(hf_dir):
            if storage.is_file(f"{hf_dir}/{name}"):
                storage.download(f"{hf_dir}/{name}", os.path.join(local, name))
        return import_hf(local, workdir, **options)


def import_hf(hf_dir: str, workdir: str, *, step: int = 0, optimizer: str = "adamw", seed: int = 0) -> str:
    """Writes WORKDIR (config.json, tokenizer, a recipe and an Orbax checkpoint at `step`) from a Llama."""
    import jax
    import jax.numpy as jnp

    from osp_jax.checkpoint import Checkpointer
    from osp_jax.model import DTYPES
    from osp_jax.optim import make_optimizer, schedules_at
    from osp_jax.step import TrainState

    if optimizer not in ("adamw", "muon"):
        raise ExportError(f"--optimizer={optimizer!r}: expected adamw or muon")
    if step < 0:
        raise ExportError(f"--step={step}: expected a step >= 0")
    if not storage.is_dir(hf_dir):
        raise ExportError(f"--from-hf={hf_dir} is not a directory")
    check_not_clobbering(workdir, hf_dir, "--workdir", "--from-hf")
    check_output(workdir, overwrite=False, flag="--workdir")
    cli.check_output_dir(workdir, "--workdir")
    if storage.is_remote(hf_dir):
        return _import_downloaded(hf_dir, workdir, step=step, optimizer=optimizer, seed=seed)
    cfg_path = os.path.join(hf_dir, "config.json")
    hf = read_json(cfg_path, "Hugging Face config")
    _check_llama(hf, cfg_path)
    try:
        config = import_config(hf, optimizer)
    except KeyError as e:
        raise ExportError(f"{cfg_path} lacks the key {e.args[0]!r} a Llama config needs") from None
    except (TypeError, ValueError) as e:
        raise ExportError(f"{cfg_path} holds a value of the wrong type: {e}") from None
    note = _tokenizer_note(hf_dir, hf)
    weights = read_hf_weights(hf_dir)
    params = osp_params(weights, config, np.dtype(DTYPES[config.model.param_dtype]))
    del weights
    check_params(params, config)
    say("a per-channel RMSNorm cannot become SSNorm: the imported model uses norm_scale=channel, embed_proj=False")

    params = jax.tree.map(jnp.asarray, params)
    tx, _ = make_optimizer(config)
    # The schedules at `step`; the moments' own counts stay 0: they are fresh (optim.schedules_at).
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       opt_state=schedules_at(tx.init(params), step),
                       rng=jax.random.key_data(jax.random.key(seed)), bad_steps=jnp.zeros([], jnp.int32))
    with staged_directory(workdir, overwrite=False, flag="--workdir") as tmp:
        write_json(os.path.join(tmp, "config.json"), config.to_dict())
        _import_tokenizer(hf_dir, note, tmp)
        _write_recipe(os.path.join(tmp, RECIPE_FILE), config)
        ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), save_every=1, keep=config.train.keep_checkpoints,
                            async_save=False)
        try:
            ckpt.save(step, state, config=config.to_dict(), force=True)
            ckpt.wait()
        finally:
            ckpt.close()
    recipe = epath.Path(workdir) / RECIPE_FILE
    local = f" (copy {recipe} to a local file first: --config reads local files)" if storage.is_remote(recipe) else ""
    say(f"imported {hf_dir} into {workdir} at step {step} (optimizer {optimizer}, fresh state); continue with: "
        f"python -m osp_jax.train --config={recipe} --workdir={workdir} --config.data.path=DATA{local}")
    return workdir
