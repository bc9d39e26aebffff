"""Which part each parameter plays: the one table that everything reading parameter names reads.

Every leaf of `osp_jax.model.Transformer`'s parameter tree has one role below. A role holds what each
consumer needs: the optimizer group for each `optimizer.name` (optim.py), whether AdamW decays it, which
axes Muon reads as the matrix (muon.py), which axes the weight quantiser reduces (quant.py), whether the
train step casts it beforehand (`model.precast_weights`), its Hugging Face Llama tensor (export.py,
hf_import.py) and the name under which the model records its input for the outlier probes.

A role is found from the end of a leaf's path: `lm_head/kernel`, or `attn/q/kernel` inside a layer,
whether the layers are one scanned stack (`layers/attn/q/kernel`, a leading layers axis) or unrolled
(`layers_3/attn/q/kernel`). Leading axes beyond a role's own rank are a stack of independent matrices.
A renamed or new matrix in the model has no role until it gets a row here: the optimizer refuses it
(`require`), so it can never slip into Muon (or out of weight decay) unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

MUON, ADAMW = "muon", "adamw"
OPTIMIZERS = ("muon", "muon_all", "adamw")  # the values of optimizer.name

# Optimizer groups by optimizer.name: the paper's recipe (muon), its Muon-only ablation (muon_all), AdamW.
_HIDDEN = {"muon": MUON, "muon_all": MUON, "adamw": ADAMW}    # hidden matrices and EmbProj
_VOCAB = {"muon": ADAMW, "muon_all": MUON, "adamw": ADAMW}     # token embedding and LM head
_VECTOR = {"muon": ADAMW, "muon_all": ADAMW, "adamw": ADAMW}   # norm scales


@dataclasses.dataclass(frozen=True, eq=False)  # each role is one object: compared and hashed by identity
class Role:
    """One kind of parameter. `key` is its path from the tree's root (`per_layer=False`) or from a layer."""

    name: str
    key: tuple[str, ...]
    per_layer: bool
    optimizer: Mapping[str, str]   # optimizer.name -> MUON | ADAMW
    decay: bool                    # AdamW's weight decay applies
    rank: int | None = None        # axes of one matrix (a layer's, unstacked); None: not a matrix
    fan_in: int = 1                # its leading axes that a matmul contracts (the input side)
    quantized: bool = False        # weight-quantised per output channel (quant.quantize_weights)
    precast: str = "no"            # "yes", "no", or "untied": cast unless the table is also the LM head
    hf_name: str | None = None     # Hugging Face Llama tensor ("{i}": the layer); None: folded into another
    hf_layout: str | None = None   # "kernel": PyTorch (out, in); "rows": as stored; "norm": a gain per channel
    linear_input: str | None = None  # the model's name for this matmul's input (outlier probes, quant hooks)

    def matrix_axes(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input axes, output axes) of a leaf of `ndim` axes; the axes before them are a stack."""
        if self.rank is None or ndim < self.rank:
            raise ValueError(f"role {self.name}: not a matrix of {ndim} axes (its rank is {self.rank})")
        stack = ndim - self.rank
        return tuple(range(stack, stack + self.fan_in)), tuple(range(stack + self.fan_in, ndim))


def _role(name, key, per_layer, optimizer, **kw) -> Role:
    decay = kw.pop("decay", kw.get("rank") is not None)  # AdamW decays matrices, never norm scales
    return Role(name, tuple(key.split("/")), per_layer, optimizer, decay, **kw)


def _kernel(name, key, fan_in, rank, hf, linear_input) -> Role:
    return _role(name, key, True, _HIDDEN, rank=rank, fan_in=fan_in, quantized=True, precast="yes",
                 hf_name=f"model.layers.{{i}}.{hf}.weight", hf_layout="kernel", linear_input=linear_input)


# In forward order, which is also the order of a Llama state dict. Attention kernels keep heads as
# axes: q/k/v are (embed, heads, head_dim) matrices from embed, o is (heads, head_dim, embed) to embed.
EMBEDDING = _role("embedding", "embed/embedding", False, _VOCAB, rank=2, precast="untied",
                  hf_name="model.embed_tokens.weight", hf_layout="rows")  # a lookup: not quantised
EMBED_PROJ = _role("embed_proj", "embed_proj/kernel", False, _HIDDEN, rank=2, quantized=True, precast="yes")
ATTN_NORM = _role("attn_norm", "attn_norm/scale", True, _VECTOR,
                  hf_name="model.layers.{i}.input_layernorm.weight", hf_layout="norm")
ATTN_Q = _kernel("attn_q", "attn/q/kernel", 1, 3, "self_attn.q_proj", "qkv_in")
ATTN_K = _kernel("attn_k", "attn/k/kernel", 1, 3, "self_attn.k_proj", "qkv_in")
ATTN_V = _kernel("attn_v", "attn/v/kernel", 1, 3, "self_attn.v_proj", "qkv_in")
ATTN_O = _kernel("attn_o", "attn/o/kernel", 2, 3, "self_attn.o_proj", "o_in")
MLP_NORM = _role("mlp_norm", "mlp_norm/scale", True, _VECTOR,
                 hf_name="model.layers.{i}.post_attention_layernorm.weight", hf_layout="norm")
MLP_GATE = _kernel("mlp_gate", "mlp/gate/kernel", 1, 2, "mlp.gate_proj", "gate_up_in")
MLP_UP = _kernel("mlp_up", "mlp/up/kernel", 1, 2, "mlp.up_proj", "gate_up_in")
MLP_DOWN = _kernel("mlp_down", "mlp/down/kernel", 1, 2, "mlp.down_proj", "down_in")
FINAL_NORM = _role("final_norm", "final_norm/scale", False, _VECTOR, hf_name="model.norm.weight", hf_layout="norm")
HEAD_PROJ = _role("head_proj", "head_proj/kernel", False, _HIDDEN, rank=2, quantized=True, precast="yes")
# The head stays in the parameter dtype: head_logits forms its gradient in float32.
LM_HEAD = _role("lm_head", "lm_head/kernel", False, _VOCAB, rank=2, quantized=True,
                hf_name="lm_head.weight", hf_layout="kernel")

ROLES = (EMBEDDING, EMBED_PROJ, ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_O, MLP_NORM, MLP_GATE, MLP_UP,
         MLP_DOWN, FINAL_NORM, HEAD_PROJ, LM_HEAD)
# The linear-layer inputs the model records (`model.observe`), in forward order.
LINEAR_INPUTS = tuple(dict.fromkeys(r.linear_input for r in ROLES if r.linear_input))


# ------------------------------------------------------------------------------------------------
# Finding a leaf's role


def path_names(path) -> tuple[str, ...]:
    """('layers', 'attn', 'q', 'kernel') from a jax key path, or from a tuple of names as it is."""
    return tuple(k if isinstance(k, str) else jax.tree_util.keystr((k,), simple=True) for k in path)


def path_str(path) -> str:
    """'layers/attn/q/kernel': how errors and warnings name a leaf."""
    return "/".join(path_names(path)) or "<root>"


def find(path) -> Role | None:
    """The role of the leaf at `path` (a jax key path or a tuple of names), None if it has none."""
    names = path_names(path)
    for role in ROLES:
        if names[-len(role.key):] == role.key:
            return role
    return None


def require(path, ndim: int) -> Role | None:
    """`find`, for a leaf of osp_jax's own tree: a leaf of two or more axes without a role is an error
    (a renamed or new matrix must get a row in ROLES); a vector or scalar without one gets None."""
    role = find(path)
    if role is None and ndim >= 2:
        raise ValueError(
            f"parameter '{path_str(path)}' ({ndim} axes) has no role in osp_jax.roles.ROLES; expected one of "
            f"{', '.join('/'.join(r.key) for r in ROLES)} (inside a layer for per-layer roles). Add a row for it, "
            "so that its optimizer group, Muon axes, quantisation and export are decided, not guessed.")
    return role


def leaf(params: Mapping, role: Role, layer: int | None = None):
    """The leaf of `role` in `params` (layer `layer` of a per-layer role: a slice of the scanned stack,
    or the unrolled `layers_<i>` module's own)."""
    if not role.per_layer:
        node = params
    elif "layers" in params:
        node = params["layers"]
    else:
        node = params[f"layers_{layer}"]
    for k in role.key:
        node = node[k]
    return np.asarray(node)[layer] if role.per_layer and "layers" in params else node


def leaf_path(params: Mapping, role: Role, layer: int | None = None) -> tuple[str, ...]:
    """The path (names) of `leaf(params, role, layer)`'s array: the whole stack when scanned."""
    if not role.per_layer:
        return role.key
    return ("layers" if "layers" in params else f"layers_{layer}",) + role.key


# ------------------------------------------------------------------------------------------------
# What the consumers read


def labels(params, optimizer: str):
    """The optimizer group (MUON or ADAMW) of every leaf for `optimizer.name` = `optimizer`."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")

    def label(path, x):
        role = require(path, np.ndim(x))
        return ADAMW if role is None else role.optimizer[optimizer]

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params):
    """True where AdamW's weight decay applies: the matrices, never the norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, x: bool(getattr(require(path, np.ndim(x)), "decay", False)),
                                            params)


def muon_axes(role: Role, ndim: int):
    """(reduction, output) axes of `role`'s matrices in a leaf of `ndim` axes, as MuonDimensionNumbers
    spells them (a single axis as an int); None for a role that is not a matrix."""
    if role.rank is None:
        return None
    one = lambda axes: axes[0] if len(axes) == 1 else axes
    reduction, output = role.matrix_axes(ndim)
    return one(reduction), one(output)


def quant_in_axes(role: Role | None, ndim: int) -> tuple[int, ...] | None:
    """The input axes the weight quantiser reduces (one scale per output channel and per stacked
    layer), or None for a leaf that is not quantised."""
    if role is None or not role.quantized:
        return None
    return role.matrix_axes(ndim)[0]


# ------------------------------------------------------------------------------------------------
# Hugging Face Llama layout (one layer's leaf; export.py and hf_import.py)


def hf_shape(role: Role, shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """The Llama tensor's shape for one (unstacked) leaf of `shape`."""
    if role.hf_layout == "kernel":
        return (math.prod(shape[role.fan_in:]), math.prod(shape[:role.fan_in]))
    return (dim,) if role.hf_layout == "norm" else tuple(shape)


def to_hf(role: Role, x, dim: int, dtype) -> np.ndarray:
    """One leaf as its Llama tensor: a kernel (in..., out...) as PyTorch's (out, in); SSNorm's one scale
    as the constant gain of a per-channel RMSNorm (a per-channel gain stays as it is)."""
    x = np.asarray(x)
    if role.hf_layout == "kernel":
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[:role.fan_in]), -1).T).astype(dtype)
    if role.hf_layout == "norm" and x.ndim == 0:
        return np.full((dim,), x, dtype)
    return x.astype(dtype)


def from_hf(role: Role, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A Llama tensor as the leaf of `shape` (the inverse of `to_hf`, per-channel norms only)."""
    if role.hf_layout == "kernel":
        return np.ascontiguousarray(w.T).reshape(shape)
    return w.reshape(shape)


# ------------------------------------------------------------------------------------------------
# EmbProj folded into the token table and the LM head (export.py and quant.fold_embproj)

_ROW_BLOCK_BYTES = 1 << 28  # float64 rows multiplied at once (256 MiB)


def _matmul_rows(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """`a @ b` in float64, a block of rows at a time, cast to `dtype`: only the rows being multiplied
    exist in float64 (a 1.4B model's vocab x dim table would be 0.8 GB)."""
    out = np.empty((a.shape[0], b.shape[1]), dtype)
    b64 = np.asarray(b, np.float64)
    rows = max(1, _ROW_BLOCK_BYTES // (8 * max(a.shape[1], b.shape[1])))
    for i in range(0, a.shape[0], rows):
        out[i:i + rows] = (np.asarray(a[i:i + rows], np.float64) @ b64).astype(dtype)
    return out


def folded(params: Mapping, model_config: Any, role: Role, dtype) -> np.ndarray:
    """The token table (`EMBEDDING`) or the LM head (`LM_HEAD`) of the plain Llama that computes what
    `params` does, as (vocab, dim) rows in `dtype`: `embedding @ embed_proj`, and `(head_proj @ K).T`
    with K the LM head kernel (dim, vocab), or `embedding.T` when tied. Exact up to the final cast."""
    c = model_config
    if role is EMBEDDING:
        rows, proj = np.asarray(leaf(params, EMBEDDING)), "embed_proj"
    elif role is LM_HEAD:  # logits = (h @ head_proj) @ K, so the rows are K.T @ head_proj.T
        rows = np.asarray(leaf(params, EMBEDDING)) if c.tie_embeddings else np.asarray(leaf(params, LM_HEAD)).T
        proj = "head_proj"
    else:
        raise ValueError(f"folded: role {role.name} is neither {EMBEDDING.name} nor {LM_HEAD.name}")
    if not c.embed_proj:
        return rows.astype(dtype)
    kernel = np.asarray(params[proj]["kernel"])
    return _matmul_rows(rows, kernel if role is EMBEDDING else kernel.T, dtype)
