"""`python -m osp_jax.export`: an osp_jax checkpoint to a Hugging Face Llama, and back.

Export (EmbProj merged, SSNorm spelled out per channel, so the release is a plain `LlamaForCausalLM`)::

    python -m osp_jax.export --workdir=DIR [--step=N] --output=HF_DIR [--dtype=bfloat16|float32]
        [--overwrite] [--max-shard-size=5GB]

Import (continued pretraining from a Llama checkpoint; a fresh optimizer state at --step), done by
osp_jax.hf_import::

    python -m osp_jax.export --from-hf=HF_DIR --workdir=DIR [--step=0] [--optimizer=adamw|muon]

The merge is exact up to the final cast: `embed_tokens = embedding @ embed_proj` and
`lm_head.weight = (head_proj @ lm_head_kernel).T` are computed in float64, a block of rows at a time,
then cast (`osp_jax.roles.folded`). Which parameter becomes which Llama tensor, in which layout, is
the roles table's (osp_jax.roles). Tensors are built one at a time when their shard is written, and
export releases each float32 parameter as soon as the last tensor made from it exists, so a 1.4B
checkpoint converts in a few GiB of host memory beyond its float32 parameters. The `safetensors`
library writes the files (no timestamps: two exports of one model are byte-identical) and
`huggingface_hub` plans the shards, as transformers does. Outputs are written into a temporary
directory next to the destination and renamed into place, so a failed run leaves nothing behind (a
gs:// output is uploaded from a local temporary directory, config.json last: osp_jax.hf_io).
Nothing from an input directory is ever executed. An output is never the input, an ancestor of it, or
(export) one of the run's own entries, --overwrite or not. The released tokenizer.json loses any
post-processor part that adds tokens (a BOS template): osp_jax encodes with add_special_tokens=False,
and `AutoTokenizer(...)(text)` must give the same ids.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Callable

if __name__ == "__main__":  # conversion is host work: keep JAX (and its memory) off any accelerator
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes  # before safetensors reads or writes bfloat16 through NumPy
import numpy as np
from etils import epath

from osp_jax import cli, roles, storage
from osp_jax.hf_io import (BIN_FILE, BIN_INDEX_FILE, INDEX_FILE, PROG, RECIPE_FILE, SAFETENSORS_METADATA,  # noqa: F401
                           SINGLE_FILE, ExportError, check_not_clobbering, check_output, check_params, read_json,
                           say, staged_directory, write_json)
# The import side, where it always was: `from osp_jax.export import import_hf` keeps working.
from osp_jax.hf_import import (READ_DTYPES, _read_bin, import_config, import_hf, osp_params,  # noqa: F401
                               read_hf_weights, read_safetensors)

EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a training run keeps in its workdir (docs/CONTRACTS.md): an export never writes into these.
RUN_ENTRIES = ("checkpoints", "tensorboard", "config.json", "metrics.jsonl", "metrics.abandoned.jsonl",
               "data_metadata.json", "tokenizer.json", "tokenizer.model", RECIPE_FILE, "profile", "wandb",
               "wandb_run_id", "train.lock")


# ----------------------------------------------------------------------------------------------------
# Weights: safetensors files, built lazily, sharded as transformers shards them.


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape, a function that builds it (called only when its shard is
    written), and the paths of the parameters it reads."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]
    reads: tuple[tuple[str, ...], ...] = ()


class _Release:
    """Deletes each leaf of `params` once the last spec that reads it has been built."""

    def __init__(self, params: dict, specs: list[TensorSpec]):
        self.params = params
        self.left = collections.Counter(p for s in specs for p in s.reads)

    def __call__(self, spec: TensorSpec) -> None:
        for path in spec.reads:
            self.left[path] -= 1
            if self.left[path] == 0:
                node = self.params
                for k in path[:-1]:
                    node = node[k]
                del node[path[-1]]


def write_safetensors(path: str, specs: list[TensorSpec], dtype: np.dtype,
                      release: Callable[[TensorSpec], None] | None = None) -> None:
    """One safetensors file of `specs` (metadata {"format": "pt"}), through the safetensors library.

    Its `save_file` takes the whole file as a dict of arrays, where the hand-written writer before it
    streamed one tensor at a time; so that peak memory is no worse, the tensors are built grouped by
    the parameters they read and `release` (export's) drops each parameter once its last tensor is
    built: the float32 tree shrinks as the file's tensors grow."""
    from safetensors.numpy import save_file

    tensors = {}
    for s in sorted(specs, key=lambda s: s.reads):
        arr = np.ascontiguousarray(s.make())
        if arr.shape != tuple(s.shape) or arr.dtype != dtype:
            raise AssertionError(f"{s.name}: built {arr.shape} {arr.dtype}, planned {s.shape} {dtype}")
        tensors[s.name] = arr
        if release is not None:
            release(s)
    save_file(tensors, path, metadata=dict(SAFETENSORS_METADATA))
    del tensors
    # safetensors writes a private (0600) temporary file and renames it: give the file the mode any
    # other output gets (0666 less the umask), and make it durable before the directory is renamed.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(text: str) -> int:
    """'5GB' (10**9), '500MiB' (2**20), '123' (bytes) -> bytes. (huggingface_hub's own parser knows
    neither binary units nor plain bytes, which --max-shard-size has always taken.)"""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"--max-shard-size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").upper().replace("I", "i")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def write_weights(out_dir: str, specs: list[TensorSpec], dtype_name: str, max_shard_bytes: int,
                  release: Callable[[TensorSpec], None] | None = None) -> list[str]:
    """`model.safetensors`, or shards of at most `max_shard_bytes` plus their index, planned and named
    by huggingface_hub as transformers does (a tensor larger than the limit gets a shard alone)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    dtype = EXPORT_DTYPES[dtype_name]
    by_name = {s.name: s for s in specs}
    plan = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda s: math.prod(s.shape) * dtype.itemsize,
        filename_pattern=SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_bytes)
    for filename, names in plan.filename_to_tensors.items():
        write_safetensors(os.path.join(out_dir, filename), [by_name[n] for n in names], dtype, release)
    files = list(plan.filename_to_tensors)
    if plan.is_sharded:
        write_json(os.path.join(out_dir, INDEX_FILE),
                   {"metadata": plan.metadata, "weight_map": dict(sorted(plan.tensor_to_filename.items()))})
        files.append(INDEX_FILE)
    return files


# ----------------------------------------------------------------------------------------------------
# Tokenizer: the run's tokenizer.json and the special tokens transformers needs beside it.


@dataclasses.dataclass
class TokenizerInfo:
    path: str | None          # tokenizer.json (Hugging Face tokenizers) or None
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    _tok: Any = dataclasses.field(default=None, repr=False, compare=False)

    def token(self, i: int | None) -> str | None:
        if i is None or self.path is None:
            return None
        import tokenizers

        if self._tok is None:
            with storage.local_copy(self.path) as local:
                self._tok = tokenizers.Tokenizer.from_file(local)
        return self._tok.id_to_token(int(i))


def find_tokenizer(workdir: str) -> TokenizerInfo:
    """The run's tokenizer (named by data_metadata.json) and its EOS/BOS/padding ids."""
    meta_path = epath.Path(workdir) / "data_metadata.json"
    meta = read_json(meta_path, "data metadata") if storage.exists(meta_path) else {}
    name = epath.Path(str(meta.get("tokenizer") or "tokenizer.json")).name
    path = os.fspath(epath.Path(workdir) / name)
    if not storage.is_file(path) or not name.endswith(".json"):
        why = "is not a Hugging Face tokenizer.json" if storage.is_file(path) else "was not found"
        say(f"warning: the run's tokenizer {path} {why}: exporting the model only; "
            "AutoTokenizer will not load the output")
        eos = meta.get("eos_id")
        return TokenizerInfo(None, eos, meta.get("bos_id", eos), meta.get("pad_id"))
    from osp_jax.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    eos = meta.get("eos_id", tok.eos_id)
    pad = meta.get("pad_id", tok.pad_id)
    bos = meta.get("bos_id", eos)  # osp_jax documents end with EOS and start with nothing: BOS = EOS
    return TokenizerInfo(path, eos, bos, pad)


def _adds_tokens(proc: dict) -> bool:
    """Whether a post-processor (tokenizer.json form) adds tokens to an encoding; ByteLevel only fixes
    offsets, and a template without special tokens adds none."""
    if proc.get("type") == "ByteLevel":
        return False
    if proc.get("type") == "TemplateProcessing":
        return any("SpecialToken" in piece for key in ("single", "pair") for piece in proc.get(key) or [])
    return True  # BertProcessing, RobertaProcessing, and any type this code does not know


def _describe(proc: dict) -> str:
    """'TemplateProcessing(<s> $A)' for a template, else the processor's type."""
    if proc.get("type") != "TemplateProcessing":
        return str(proc.get("type"))
    pieces = [p["SpecialToken"]["id"] if "SpecialToken" in p else "$" + p.get("Sequence", {}).get("id", "?")
              for p in proc.get("single") or []]
    return f"TemplateProcessing({' '.join(pieces)})"


def neutral_post_processor(proc: dict | None) -> tuple[dict | None, list[str]]:
    """`proc` without the parts that add tokens (BOS/EOS/CLS templates), and what was removed.

    osp_jax encodes with add_special_tokens=False, so a released tokenizer that adds a BOS would feed the
    model a token it never saw in training."""
    if proc is None:
        return None, []
    if proc.get("type") != "Sequence":
        return (None, [_describe(proc)]) if _adds_tokens(proc) else (proc, [])
    kept, removed = [], []
    for p in proc.get("processors") or []:
        p, r = neutral_post_processor(p)
        kept += [p] if p is not None else []
        removed += r
    if not removed:
        return proc, []
    return ({**proc, "processors": kept} if len(kept) > 1 else (kept[0] if kept else None)), removed


def write_tokenizer(out_dir: str, tok: TokenizerInfo, model_max_length: int) -> list[str]:
    """tokenizer.json (with no post-processor that adds tokens), tokenizer_config.json and
    special_tokens_map.json, so that `AutoTokenizer.from_pretrained(out)(text)` gives osp_jax's ids."""
    if tok.path is None:
        return []
    target = os.path.join(out_dir, "tokenizer.json")
    spec = read_json(tok.path, "tokenizer")
    post, removed = neutral_post_processor(spec.get("post_processor"))
    if removed:
        say(f"tokenizer: removed {', '.join(removed)} from the post-processor: it adds tokens (a BOS) to "
            "every encoding, which osp_jax never did in training (add_special_tokens=False)")
        with open(target, "w", encoding="utf-8") as f:
            json.dump({**spec, "post_processor": post}, f, ensure_ascii=False, indent=2)
    else:
        cli.copy_atomic(tok.path, target)  # unchanged, byte for byte
    special = {k: v for k, v in (("bos_token", tok.token(tok.bos_id)), ("eos_token", tok.token(tok.eos_id)),
                                 ("pad_token", tok.token(tok.pad_id))) if v is not None}
    # PreTrainedTokenizerFast: transformers reads tokenizer.json as it is, with no model-specific rules
    # (a LlamaTokenizer would add a BOS the model never saw in training). split_special_tokens: a
    # special token's string inside text ("<|endoftext|>" in a file of code) is plain text, as osp_jax
    # encoded it in training, not the token itself; put special tokens in by id.
    write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
                 "clean_up_tokenization_spaces": False, "split_special_tokens": True, **special})
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    return list(TOKENIZER_FILES)


# ----------------------------------------------------------------------------------------------------
# Export: osp_jax parameters -> Llama tensors.


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def llama_tensors(params: dict, model_cfg, dtype: np.dtype) -> tuple[list[TensorSpec], bool]:
    """The Llama state dict of `params` as lazily built tensors, in a Llama state dict's order
    (embedding, each layer, final norm, head), and whether the head is tied."""
    c = model_cfg
    tied = bool(c.tie_embeddings and not c.embed_proj)

    def layer(role, i):
        path = roles.leaf_path(params, role, i)
        stored = np.shape(_get(params, path))
        shape = stored[1:] if path[0] == "layers" else stored  # one layer of a scanned stack
        return TensorSpec(role.hf_name.format(i=i), roles.hf_shape(role, shape, c.dim),
                          lambda: roles.to_hf(role, roles.leaf(params, role, i), c.dim, dtype), (path,))

    def vocab_rows(role):  # EmbProj folded in; the head from the embedding when tied
        reads = [roles.EMBEDDING.key if role is roles.EMBEDDING or c.tie_embeddings else roles.LM_HEAD.key]
        reads += [roles.EMBED_PROJ.key if role is roles.EMBEDDING else roles.HEAD_PROJ.key] if c.embed_proj else []
        return TensorSpec(role.hf_name, (c.vocab_size, c.dim), lambda: roles.folded(params, c, role, dtype),
                          tuple(sorted(reads)))

    # RoPE: osp_jax rotates the two halves of each head (rotate_half), exactly as HF Llama does, so
    # q/k need no permutation here (tests/test_export.py checks this by logits parity).
    per_layer = [r for r in roles.ROLES if r.per_layer]
    specs = [vocab_rows(roles.EMBEDDING)]
    specs += [layer(r, i) for i in range(c.layers) for r in per_layer]
    specs.append(layer(roles.FINAL_NORM, None))
    if not tied:
        specs.append(vocab_rows(roles.LM_HEAD))
    return specs, tied


def llama_config(config, dtype_name: str, tied: bool, tok: TokenizerInfo) -> dict:
    """config.json for transformers' LlamaForCausalLM (5.x reads rope_parameters, older ones rope_theta)."""
    from osp_jax.config import head_dim

    c = config.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": head_dim(c),
        "hidden_act": "silu",
        "max_position_embeddings": config.train.seq_len,
        "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_theta": float(c.rope_theta),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _load_config(workdir: str, saved: dict | None):
    from osp_jax import config as config_lib

    source = "the checkpoint"
    if saved is None:
        saved, source = read_json(epath.Path(workdir) / "config.json", "config"), f"{workdir}/config.json"
    try:
        return config_lib.from_dict(saved)
    except config_lib.ConfigError as e:
        raise ExportError(f"the config in {source} is not valid: {e}") from None


def export(workdir: str, output: str, *, step: int | None = None, dtype: str = "bfloat16",
           overwrite: bool = False, max_shard_size: str | int = "5GB") -> str:
    """Writes `output`, a Hugging Face Llama directory, from WORKDIR's checkpoint; returns its path."""
    from osp_jax.checkpoint import CheckpointError, restore_params_only

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    check_not_clobbering(output, workdir, "--output", "--workdir", keep=RUN_ENTRIES)
    check_output(output, overwrite)
    cli.check_output_dir(output, "--output")
    if not storage.is_dir(workdir):
        raise ExportError(f"--workdir={workdir} is not a directory")
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not storage.is_dir(ckpt_dir):
        raise ExportError(f"no checkpoint in {workdir}: {ckpt_dir} does not exist")
    try:
        step, params, saved_config = restore_params_only(workdir, step)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = _load_config(workdir, saved_config)
    say(f"exporting step {step} of {workdir} to {output} ({dtype})")
    return write_hf(params, config, find_tokenizer(workdir), output, dtype=dtype, overwrite=overwrite,
                    max_shard_size=max_bytes, consume=True)


def write_hf(params: dict, config, tok: TokenizerInfo, output: str, *, dtype: str = "bfloat16",
             overwrite: bool = False, max_shard_size: int = 5 * 10**9, consume: bool = False) -> str:
    """Writes `output` (Hugging Face Llama) from an osp_jax parameter tree (numpy) and its config.
    `consume=True` deletes each leaf from `params` as soon as the last tensor made from it is built
    (export's own restored tree: it bounds peak memory, see write_safetensors)."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    check_output(output, overwrite)
    check_params(params, config)
    c = config.model
    if c.dim % c.heads:
        raise ExportError(f"model.dim={c.dim} is not a multiple of model.heads={c.heads}: transformers' "
                          "LlamaConfig requires hidden_size % num_attention_heads == 0")
    specs, tied = llama_tensors(params, c, EXPORT_DTYPES[dtype])
    if c.embed_proj:
        say("EmbProj merged: embed_tokens = embedding @ embed_proj, lm_head = (head_proj @ head).T (float64)")
        if c.tie_embeddings:
            say("tied embeddings + EmbProj: the merged input embedding and merged LM head differ, so the "
                "export is untied (tie_word_embeddings=false) and writes both matrices")
    if c.norm_scale == "single":
        say("SSNorm: each norm's single scale is written as a constant per-channel RMSNorm weight")
    with staged_directory(output, overwrite) as tmp:
        files = write_weights(tmp, specs, dtype, max_shard_size, _Release(params, specs) if consume else None)
        write_json(os.path.join(tmp, "config.json"), llama_config(config, dtype, tied, tok))
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                      "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id}
        write_json(os.path.join(tmp, "generation_config.json"), generation)
        files += ["config.json", "generation_config.json"]
        files += write_tokenizer(tmp, tok, config.train.seq_len)
    say(f"wrote {output}: {', '.join(sorted(files))}")
    return output


# ----------------------------------------------------------------------------------------------------
# CLI: export, or import (osp_jax.hf_import) with --from-hf.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\nThe merge")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run directory (export: read; import: written)")
    p.add_argument("--step", type=int, default=None, help="export: checkpoint step (default: latest); "
                   "import: step to save at (default 0)")
    p.add_argument("--output", help="export: Hugging Face directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(EXPORT_DTYPES), help="export: weight dtype")
    p.add_argument("--overwrite", action="store_true", help="export: replace a non-empty --output")
    p.add_argument("--max-shard-size", default="5GB", help="export: largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--from-hf", dest="from_hf", help="import: a Hugging Face Llama directory to read")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"), help="import: optimizer to set up")
    return p


def _check_storage(args) -> None:
    """The gs:// paths of this command: buckets, credentials, permissions (osp_jax.storage), at start."""
    reads, writes = ({"--from-hf": args.from_hf}, {"--workdir": args.workdir}) if args.from_hf else (
        {"--workdir": args.workdir}, {"--output": args.output})
    try:
        storage.check_all(reads=reads, writes=writes)
    except cli.UserError as e:
        raise ExportError(str(e)) from None


def _run(args: argparse.Namespace) -> None:
    _check_storage(args)
    if args.from_hf:
        if args.output:
            raise ExportError("--from-hf imports into --workdir; --output is for export only")
        import_hf(args.from_hf, args.workdir, step=args.step or 0, optimizer=args.optimizer)
    else:
        if not args.output:
            raise ExportError("--output=HF_DIR is required to export (or pass --from-hf=HF_DIR to import)")
        export(args.workdir, args.output, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
               max_shard_size=args.max_shard_size)


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0, 2 for bad input (one line naming it: ExportError, or any cli.UserError), 130 on
    Ctrl-C."""
    args = _parser().parse_args(argv)
    return cli.guarded(PROG, lambda: _run(args), {cli.UserError: "error"})


if __name__ == "__main__":
    sys.exit(main())
