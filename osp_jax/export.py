"""`python -m osp_jax.export`: an osp_jax checkpoint to a Hugging Face Llama, and back.

Export (EmbProj merged, SSNorm spelled out per channel, so the release is a plain `LlamaForCausalLM`)::

    python -m osp_jax.export --workdir=DIR [--step=N] --output=HF_DIR [--dtype=bfloat16|float32]
        [--overwrite] [--max-shard-size=5GB]

Import (continued pretraining from a Llama checkpoint; a fresh optimizer state at --step)::

    python -m osp_jax.export --from-hf=HF_DIR --workdir=DIR [--step=0] [--optimizer=adamw|muon]

The merge is exact up to the final cast: `embed_tokens = embedding @ embed_proj` and
`lm_head.weight = (head_proj @ lm_head_kernel).T` are computed in float64, a block of rows at a time,
then cast. Tensors are converted and written one at a time (a float64 copy only of the rows being
multiplied), so a 1.4B checkpoint converts in a few GiB of host memory beyond its float32 parameters.
Outputs are written into a temporary directory next to the destination and renamed into place, so a
failed run leaves nothing behind. safetensors files are written here (not with the safetensors package)
so they can be streamed tensor by tensor and carry no timestamps: two exports of one model are
byte-identical. Nothing from an input directory is ever executed: configs are read as JSON, `.bin`
weights only with `torch.load(..., weights_only=True)`, and configs asking for remote code are refused.
An output is never the input, an ancestor of it, or (export) one of the run's own entries, --overwrite
or not. The released tokenizer.json loses any post-processor part that adds tokens (a BOS template):
osp_jax encodes with add_special_tokens=False, and `AutoTokenizer(...)(text)` must give the same ids.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pprint
import re
import secrets
import shutil
import struct
import sys
from typing import Any, Callable

if __name__ == "__main__":  # conversion is host work: keep JAX (and its memory) off any accelerator
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes
import numpy as np

PROG = "osp_jax.export"
EXPORT_DTYPES = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"), "float32": (np.dtype(np.float32), "F32")}
# safetensors dtype codes this module reads (imports may come in half precision too).
READ_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
               "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes; no timestamps, so output is reproducible
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RECIPE_FILE = "import_recipe.py"
# What a training run keeps in its workdir (docs/CONTRACTS.md): an export never writes into these.
RUN_ENTRIES = ("checkpoints", "tensorboard", "config.json", "metrics.jsonl", "metrics.abandoned.jsonl",
               "data_metadata.json", "tokenizer.json", "tokenizer.model", RECIPE_FILE)
_ROW_BLOCK_BYTES = 1 << 28  # float64 rows multiplied at once in the EmbProj merge (256 MiB)
_MAX_HEADER_BYTES = 100 << 20


class ExportError(Exception):
    """Bad input or an output that cannot be written; the message is one line for the user."""


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape, and a function that builds it (called only when written)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write_safetensors(path: str, specs: list[TensorSpec], dtype: np.dtype, code: str) -> None:
    """Writes `specs` in order, building each tensor just before its bytes go out."""
    header: dict[str, Any] = {"__metadata__": dict(SAFETENSORS_METADATA)}
    offset = 0
    for s in specs:
        size = math.prod(s.shape) * dtype.itemsize
        header[s.name] = {"dtype": code, "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as the format recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            arr = np.ascontiguousarray(s.make())
            if arr.shape != tuple(s.shape) or arr.dtype != dtype:
                raise AssertionError(f"{s.name}: built {arr.shape} {arr.dtype}, planned {s.shape} {dtype}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            del arr
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only arrays of a safetensors file (float types only)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportError(f"{path} is not a safetensors file (too short)")
            n = struct.unpack("<Q", head)[0]
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise ExportError(f"{path} is not a safetensors file (header length {n} out of range)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ExportError(f"{path} is not a safetensors file (bad header: {e})") from None
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in READ_DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {info.get('dtype')}; "
                              f"expected one of {', '.join(READ_DTYPES)}")
        dtype, shape = READ_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * dtype.itemsize:
            raise ExportError(f"{path}: tensor {name} has data offsets {[begin, end]} that do not fit "
                              f"its shape {list(shape)} {info['dtype']} or the file")
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out


def parse_size(text: str) -> int:
    """'5GB' (10**9), '500MiB' (2**20), '123' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"--max-shard-size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").upper().replace("I", "i")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def write_weights(out_dir: str, specs: list[TensorSpec], dtype_name: str, max_shard_bytes: int) -> list[str]:
    """`model.safetensors`, or shards of at most `max_shard_bytes` plus their index (as transformers names them)."""
    dtype, code = EXPORT_DTYPES[dtype_name]
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        size = math.prod(s.shape) * dtype.itemsize
        if shards[-1] and used + size > max_shard_bytes:  # a tensor larger than the limit gets a shard alone
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += size
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, SINGLE_FILE), specs, dtype, code)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(out_dir, name), shard, dtype, code)
        weight_map.update({s.name: name for s in shard})
    total = sum(math.prod(s.shape) for s in specs) * dtype.itemsize
    _write_json(os.path.join(out_dir, INDEX_FILE),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return names + [INDEX_FILE]


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{what} {path} not found") from None
    except OSError as e:
        raise ExportError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{what} {path} holds a JSON {type(value).__name__}, expected an object")
    return value


# ----------------------------------------------------------------------------------------------------
# Staged output: everything goes into a temporary sibling directory, renamed into place at the end.


def _check_output(path: str, overwrite: bool, flag: str = "--output") -> None:
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise ExportError(f"{flag}={path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ExportError(f"{flag}={path} is not empty ({len(os.listdir(path))} entries); "
                          "pass --overwrite to replace it")


def check_not_clobbering(output: str, source: str, flag: str, source_flag: str, keep: tuple[str, ...] = ()) -> None:
    """Refuses an output directory whose replacement would delete the input: `output` (symlinks resolved)
    is `source`, contains it, or lies inside it under one of `keep` (names of entries of `source`)."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if out == src or src.startswith(out.rstrip(os.sep) + os.sep):
        how = "is" if out == src else "contains"
        raise ExportError(f"{flag}={output} {how} {source_flag}={source}: writing it would delete what is "
                          f"being read; choose a {flag} outside it")
    top = os.path.relpath(out, src).split(os.sep)[0] if out.startswith(src + os.sep) else None
    if top in keep:
        raise ExportError(f"{flag}={output} is {source_flag}={source}'s own {top}, or inside it: writing it "
                          f"would damage the run; choose a {flag} outside it (or another subdirectory)")


@contextlib.contextmanager
def staged_directory(final: str, overwrite: bool, flag: str = "--output"):
    """Yields a fresh temporary directory next to `final`; on success it replaces `final`, on any
    failure it is removed, so a partial output is never left behind."""
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        _check_output(final, overwrite, flag)  # checked again: something may have appeared meanwhile
        old = None
        if os.path.isdir(final):
            if os.listdir(final):
                old = tmp + ".old"
                os.rename(final, old)
            else:
                os.rmdir(final)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        return self._tok.id_to_token(int(i))


def find_tokenizer(workdir: str) -> TokenizerInfo:
    """The run's tokenizer (named by data_metadata.json) and its EOS/BOS/padding ids."""
    meta_path = os.path.join(workdir, "data_metadata.json")
    meta = _read_json(meta_path, "data metadata") if os.path.exists(meta_path) else {}
    name = os.path.basename(str(meta.get("tokenizer") or "tokenizer.json"))
    path = os.path.join(workdir, name)
    if not os.path.isfile(path) or not name.endswith(".json"):
        why = "is not a Hugging Face tokenizer.json" if os.path.isfile(path) else "was not found"
        _say(f"warning: the run's tokenizer {path} {why}: exporting the model only; "
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
    spec = _read_json(tok.path, "tokenizer")
    post, removed = neutral_post_processor(spec.get("post_processor"))
    if removed:
        _say(f"tokenizer: removed {', '.join(removed)} from the post-processor: it adds tokens (a BOS) to "
             "every encoding, which osp_jax never did in training (add_special_tokens=False)")
        with open(target, "w", encoding="utf-8") as f:
            json.dump({**spec, "post_processor": post}, f, ensure_ascii=False, indent=2)
    else:
        shutil.copyfile(tok.path, target)  # unchanged, byte for byte
    special = {k: v for k, v in (("bos_token", tok.token(tok.bos_id)), ("eos_token", tok.token(tok.eos_id)),
                                 ("pad_token", tok.token(tok.pad_id))) if v is not None}
    # PreTrainedTokenizerFast: transformers reads tokenizer.json as it is, with no model-specific rules
    # (a LlamaTokenizer would add a BOS the model never saw in training). split_special_tokens: a
    # special token's string inside text ("<|endoftext|>" in a file of code) is plain text, as osp_jax
    # encoded it in training, not the token itself; put special tokens in by id.
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
                 "clean_up_tokenization_spaces": False, "split_special_tokens": True, **special})
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    return list(TOKENIZER_FILES)


# ----------------------------------------------------------------------------------------------------
# Export: osp_jax parameters -> Llama tensors.


def _leaf(params: dict, path: str):
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _layer_leaf(params: dict, layer: int, path: str) -> np.ndarray:
    """Layer `layer`'s leaf, from the scanned (L, ...) array or from unrolled `layers_<i>` modules."""
    if "layers" in params:
        return np.asarray(_leaf(params["layers"], path))[layer]
    return np.asarray(_leaf(params[f"layers_{layer}"], path))


def _matmul_rows(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`a @ b` in float64, a block of rows at a time, cast to `dtype`."""
    out = np.empty((a.shape[0], b.shape[1]), dtype)
    b64 = np.asarray(b, np.float64)
    rows = max(1, _ROW_BLOCK_BYTES // (8 * max(a.shape[1], b.shape[1])))
    for i in range(0, a.shape[0], rows):
        out[i:i + rows] = (np.asarray(a[i:i + rows], np.float64) @ b64).astype(dtype)
    return out


def _norm_weight(scale: np.ndarray, dim: int, dtype: np.dtype) -> np.ndarray:
    """SSNorm's one scalar becomes a constant per-channel gain; a per-channel gain stays as it is."""
    scale = np.asarray(scale)
    return np.full((dim,), scale, dtype) if scale.ndim == 0 else scale.astype(dtype)


def llama_tensors(params: dict, model_cfg, dtype: np.dtype) -> tuple[list[TensorSpec], bool]:
    """The Llama state dict of `params` as lazily built tensors, and whether the head is tied."""
    from osp_jax.config import head_dim

    c = model_cfg
    hd, dim, vocab = head_dim(c), c.dim, c.vocab_size
    cast = lambda x: np.asarray(x).astype(dtype)
    t = lambda x: np.ascontiguousarray(np.asarray(x).T).astype(dtype)  # JAX (in, out) -> PyTorch (out, in)
    emb = lambda: np.asarray(_leaf(params, "embed/embedding"))
    specs = []
    if c.embed_proj:
        specs.append(TensorSpec("model.embed_tokens.weight", (vocab, dim),
                                lambda: _matmul_rows(emb(), _leaf(params, "embed_proj/kernel"), dtype)))
    else:
        specs.append(TensorSpec("model.embed_tokens.weight", (vocab, dim), lambda: cast(emb())))
    # RoPE: osp_jax rotates the two halves of each head (rotate_half), exactly as HF Llama does, so
    # q/k need no permutation here (tests/test_export.py checks this by logits parity).
    for i in range(c.layers):
        p = f"model.layers.{i}."
        leaf = lambda path, i=i: _layer_leaf(params, i, path)
        specs += [
            TensorSpec(p + "input_layernorm.weight", (dim,),
                       lambda leaf=leaf: _norm_weight(leaf("attn_norm/scale"), dim, dtype)),
            TensorSpec(p + "self_attn.q_proj.weight", (c.heads * hd, dim),
                       lambda leaf=leaf: t(leaf("attn/q/kernel").reshape(dim, c.heads * hd))),
            TensorSpec(p + "self_attn.k_proj.weight", (c.kv_heads * hd, dim),
                       lambda leaf=leaf: t(leaf("attn/k/kernel").reshape(dim, c.kv_heads * hd))),
            TensorSpec(p + "self_attn.v_proj.weight", (c.kv_heads * hd, dim),
                       lambda leaf=leaf: t(leaf("attn/v/kernel").reshape(dim, c.kv_heads * hd))),
            TensorSpec(p + "self_attn.o_proj.weight", (dim, c.heads * hd),
                       lambda leaf=leaf: t(leaf("attn/o/kernel").reshape(c.heads * hd, dim))),
            TensorSpec(p + "post_attention_layernorm.weight", (dim,),
                       lambda leaf=leaf: _norm_weight(leaf("mlp_norm/scale"), dim, dtype)),
            TensorSpec(p + "mlp.gate_proj.weight", (c.ffn_dim, dim), lambda leaf=leaf: t(leaf("mlp/gate/kernel"))),
            TensorSpec(p + "mlp.up_proj.weight", (c.ffn_dim, dim), lambda leaf=leaf: t(leaf("mlp/up/kernel"))),
            TensorSpec(p + "mlp.down_proj.weight", (dim, c.ffn_dim), lambda leaf=leaf: t(leaf("mlp/down/kernel"))),
        ]
    specs.append(TensorSpec("model.norm.weight", (dim,),
                            lambda: _norm_weight(_leaf(params, "final_norm/scale"), dim, dtype)))

    # logits = (norm(h) @ head_proj) @ K, K = lm_head kernel (dim, vocab) or embedding.T when tied.
    head_kernel = lambda: emb().T if c.tie_embeddings else np.asarray(_leaf(params, "lm_head/kernel"))
    tied = bool(c.tie_embeddings and not c.embed_proj)
    if c.embed_proj:
        specs.append(TensorSpec("lm_head.weight", (vocab, dim),  # (head_proj @ K).T = K.T @ head_proj.T
                                lambda: _matmul_rows(head_kernel().T, np.asarray(_leaf(params, "head_proj/kernel")).T,
                                                     dtype)))
    elif not tied:
        specs.append(TensorSpec("lm_head.weight", (vocab, dim), lambda: t(head_kernel())))
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


def _check_params(params: dict, config) -> None:
    """The checkpoint's tree must be the one `config` builds (same paths, same shapes)."""
    import jax
    from flax import linen as nn

    from osp_jax.model import abstract_params

    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config.model)))[0]}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ExportError(f"the checkpoint's parameters do not match its config.model (first differences, "
                          f"(path, shape): {diff})")


def _load_config(workdir: str, saved: dict | None):
    from osp_jax import config as config_lib

    source = "the checkpoint"
    if saved is None:
        saved, source = _read_json(os.path.join(workdir, "config.json"), "config"), f"{workdir}/config.json"
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
    _check_output(output, overwrite)
    if not os.path.isdir(workdir):
        raise ExportError(f"--workdir={workdir} is not a directory")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ExportError(f"no checkpoint in {workdir}: {ckpt_dir} does not exist")
    try:
        step, params, saved_config = restore_params_only(workdir, step)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = _load_config(workdir, saved_config)
    _say(f"exporting step {step} of {workdir} to {output} ({dtype})")
    return write_hf(params, config, find_tokenizer(workdir), output, dtype=dtype, overwrite=overwrite,
                    max_shard_size=max_bytes)


def write_hf(params: dict, config, tok: TokenizerInfo, output: str, *, dtype: str = "bfloat16",
             overwrite: bool = False, max_shard_size: int = 5 * 10**9) -> str:
    """Writes `output` (Hugging Face Llama) from an osp_jax parameter tree (numpy) and its config."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    _check_output(output, overwrite)
    _check_params(params, config)
    c = config.model
    if c.dim % c.heads:
        raise ExportError(f"model.dim={c.dim} is not a multiple of model.heads={c.heads}: transformers' "
                          "LlamaConfig requires hidden_size % num_attention_heads == 0")
    specs, tied = llama_tensors(params, c, EXPORT_DTYPES[dtype][0])
    if c.embed_proj:
        _say("EmbProj merged: embed_tokens = embedding @ embed_proj, lm_head = (head_proj @ head).T (float64)")
        if c.tie_embeddings:
            _say("tied embeddings + EmbProj: the merged input embedding and merged LM head differ, so the "
                 "export is untied (tie_word_embeddings=false) and writes both matrices")
    if c.norm_scale == "single":
        _say("SSNorm: each norm's single scale is written as a constant per-channel RMSNorm weight")
    with staged_directory(output, overwrite) as tmp:
        files = write_weights(tmp, specs, dtype, max_shard_size)
        _write_json(os.path.join(tmp, "config.json"), llama_config(config, dtype, tied, tok))
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                      "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id}
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        files += ["config.json", "generation_config.json"]
        files += write_tokenizer(tmp, tok, config.train.seq_len)
    _say(f"wrote {output}: {', '.join(sorted(files))}")
    return output


# ----------------------------------------------------------------------------------------------------
# Import: a Llama checkpoint -> an osp_jax workdir at step --step with a fresh optimizer state.


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


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """safetensors (single or sharded) preferred; `.bin` (single or sharded) read with weights_only=True."""
    for single, index, reader in ((SINGLE_FILE, INDEX_FILE, read_safetensors), (BIN_FILE, BIN_INDEX_FILE, _read_bin)):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return reader(os.path.join(hf_dir, single))
        if os.path.isfile(os.path.join(hf_dir, index)):
            weight_map = _read_json(os.path.join(hf_dir, index), "weight index").get("weight_map") or {}
            out: dict[str, np.ndarray] = {}
            for name in sorted(set(weight_map.values())):
                path = _safe_name(hf_dir, name)
                if not os.path.isfile(path):
                    raise ExportError(f"{hf_dir}: {index} lists the shard {name}, which is missing")
                out.update(reader(path))
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise ExportError(f"{hf_dir}: tensors listed in {index} are missing from the shards: {missing[:5]}")
            return out
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
        _say(f"max_position_embeddings={max_pos}: training sequence length set to {seq_cap} "
             "(change it with --config.train.seq_len)")
    config.optimizer.name = optimizer
    try:
        return config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise ExportError(f"the Llama config cannot be expressed in osp_jax: {e}") from None


def osp_params(weights: dict[str, np.ndarray], config, param_dtype) -> dict:
    """Llama tensors -> the osp_jax parameter tree (scanned layers), every tensor consumed exactly once."""
    from osp_jax.config import head_dim

    c = config.model
    hd, dim, L = head_dim(c), c.dim, c.layers
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, not a weight
    used: set[str] = set()

    def check(name: str, shape: tuple[int, ...]) -> None:
        """`name` is there with the shape the config implies (PyTorch (out, in) layout)."""
        if name not in weights:
            raise ExportError(f"the Llama checkpoint has no tensor {name}")
        found = tuple(np.shape(weights[name]))
        if found != shape:
            raise ExportError(f"the Llama checkpoint's {name} has shape {list(found)}, but its config.json "
                              f"implies {list(shape)}")
        used.add(name)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        check(name, shape)
        return np.asarray(weights[name], np.float32)

    def stack(suffix: str, shape: tuple[int, ...], fn) -> np.ndarray:
        return np.stack([fn(get(f"model.layers.{i}.{suffix}", shape)) for i in range(L)]).astype(param_dtype)

    q, kv, ffn, vocab = c.heads * hd, c.kv_heads * hd, c.ffn_dim, c.vocab_size
    params = {
        "embed": {"embedding": get("model.embed_tokens.weight", (vocab, dim)).astype(param_dtype)},
        "layers": {
            "attn_norm": {"scale": stack("input_layernorm.weight", (dim,), lambda w: w)},
            "attn": {
                "q": {"kernel": stack("self_attn.q_proj.weight", (q, dim), lambda w: w.T.reshape(dim, c.heads, hd))},
                "k": {"kernel": stack("self_attn.k_proj.weight", (kv, dim),
                                      lambda w: w.T.reshape(dim, c.kv_heads, hd))},
                "v": {"kernel": stack("self_attn.v_proj.weight", (kv, dim),
                                      lambda w: w.T.reshape(dim, c.kv_heads, hd))},
                "o": {"kernel": stack("self_attn.o_proj.weight", (dim, q), lambda w: w.T.reshape(c.heads, hd, dim))},
            },
            "mlp_norm": {"scale": stack("post_attention_layernorm.weight", (dim,), lambda w: w)},
            "mlp": {
                "gate": {"kernel": stack("mlp.gate_proj.weight", (ffn, dim), lambda w: w.T)},
                "up": {"kernel": stack("mlp.up_proj.weight", (ffn, dim), lambda w: w.T)},
                "down": {"kernel": stack("mlp.down_proj.weight", (dim, ffn), lambda w: w.T)},
            },
        },
        "final_norm": {"scale": get("model.norm.weight", (dim,)).astype(param_dtype)},
    }
    if not c.tie_embeddings:
        params["lm_head"] = {"kernel": np.ascontiguousarray(get("lm_head.weight", (vocab, dim)).T).astype(param_dtype)}
    elif "lm_head.weight" in weights:  # some tied checkpoints still store the (shared) head
        check("lm_head.weight", (vocab, dim))
    extra = sorted(set(weights) - used)
    if extra:
        raise ExportError(f"the Llama checkpoint has tensors osp_jax has no place for: {extra[:5]}"
                          f"{' ...' if len(extra) > 5 else ''}")
    return params


def _import_tokenizer(hf_dir: str, hf: dict, out_dir: str) -> None:
    """Copies tokenizer.json and writes data_metadata.json, the note export reads the special ids from."""
    src = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(src):
        _say(f"warning: {hf_dir} has no tokenizer.json; the workdir gets no tokenizer (export will warn too)")
        return
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(src)
    gen_path = os.path.join(hf_dir, "generation_config.json")
    gen = _read_json(gen_path, "generation config") if os.path.isfile(gen_path) else {}
    special = lambda key: _first_id(hf.get(key) if hf.get(key) is not None else gen.get(key))
    eos, bos, pad = special("eos_token_id"), special("bos_token_id"), special("pad_token_id")
    _write_json(os.path.join(out_dir, "data_metadata.json"), {
        "format": "osp_jax.hf_import",
        "note": "written by osp_jax.export --from-hf: the imported model's tokenizer and special ids; "
                "prepare training data with this tokenizer.json",
        "tokenizer": "tokenizer.json",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eos_id": eos, "bos_id": bos, "pad_id": pad,
    })


def _write_recipe(path: str, config) -> None:
    body = pprint.pformat(config.to_dict(), width=100, sort_dicts=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write('"""Recipe for continued pretraining of a model imported by `python -m osp_jax.export --from-hf`.\n\n'
                "    python -m osp_jax.train --config=THIS_FILE --workdir=THIS_DIR --config.data.path=DATA\n"
                '"""\nfrom osp_jax.config import from_dict\n\nCONFIG = ' + body +
                "\n\n\ndef get_config():\n    return from_dict(CONFIG)\n")


def import_hf(hf_dir: str, workdir: str, *, step: int = 0, optimizer: str = "adamw", seed: int = 0) -> str:
    """Writes WORKDIR (config.json, tokenizer, a recipe and an Orbax checkpoint at `step`) from a Llama."""
    import jax
    import jax.numpy as jnp

    from osp_jax.checkpoint import Checkpointer
    from osp_jax.model import DTYPES
    from osp_jax.optim import make_optimizer
    from osp_jax.step import TrainState

    if optimizer not in ("adamw", "muon"):
        raise ExportError(f"--optimizer={optimizer!r}: expected adamw or muon")
    if step < 0:
        raise ExportError(f"--step={step}: expected a step >= 0")
    if not os.path.isdir(hf_dir):
        raise ExportError(f"--from-hf={hf_dir} is not a directory")
    check_not_clobbering(workdir, hf_dir, "--workdir", "--from-hf")
    _check_output(workdir, overwrite=False, flag="--workdir")
    cfg_path = os.path.join(hf_dir, "config.json")
    hf = _read_json(cfg_path, "Hugging Face config")
    _check_llama(hf, cfg_path)
    try:
        config = import_config(hf, optimizer)
    except KeyError as e:
        raise ExportError(f"{cfg_path} lacks the key {e.args[0]!r} a Llama config needs") from None
    except (TypeError, ValueError) as e:
        raise ExportError(f"{cfg_path} holds a value of the wrong type: {e}") from None
    weights = read_hf_weights(hf_dir)
    params = osp_params(weights, config, np.dtype(DTYPES[config.model.param_dtype]))
    del weights
    _check_params(params, config)
    _say("a per-channel RMSNorm cannot become SSNorm: the imported model uses norm_scale=channel, embed_proj=False")

    params = jax.tree.map(jnp.asarray, params)
    tx, _ = make_optimizer(config)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(seed)), bad_steps=jnp.zeros([], jnp.int32))
    with staged_directory(workdir, overwrite=False, flag="--workdir") as tmp:
        _write_json(os.path.join(tmp, "config.json"), config.to_dict())
        _import_tokenizer(hf_dir, hf, tmp)
        _write_recipe(os.path.join(tmp, RECIPE_FILE), config)
        ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), save_every=1, keep=config.train.keep_checkpoints,
                            async_save=False)
        try:
            ckpt.save(step, state, config=config.to_dict(), force=True)
            ckpt.wait()
        finally:
            ckpt.close()
    _say(f"imported {hf_dir} into {workdir} at step {step} (optimizer {optimizer}, fresh state); continue with: "
         f"python -m osp_jax.train --config={os.path.join(workdir, RECIPE_FILE)} --workdir={workdir} "
         "--config.data.path=DATA")
    return workdir


# ----------------------------------------------------------------------------------------------------
# CLI


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.from_hf:
            if args.output:
                raise ExportError("--from-hf imports into --workdir; --output is for export only")
            import_hf(args.from_hf, args.workdir, step=args.step or 0, optimizer=args.optimizer)
        else:
            if not args.output:
                raise ExportError("--output=HF_DIR is required to export (or pass --from-hf=HF_DIR to import)")
            export(args.workdir, args.output, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                   max_shard_size=args.max_shard_size)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
