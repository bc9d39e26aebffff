"""The OSP transformer: a Llama-style decoder with Single-Scale RMSNorm and EmbProj.

Read top to bottom: RMSNorm (per-channel or one scalar), RoPE, attention, SwiGLU MLP, a block,
and the Transformer that scans the blocks; its head's logits and losses are osp_jax.lm_head's. Parameter paths and logical axes are listed in
docs/CONTRACTS.md; every parameter carries logical axis names that sharding.py maps to the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import flax.linen as nn
import ml_collections
import optax

from osp_jax import attention as attn_lib
from osp_jax.lm_head import (  # noqa: F401 - re-exported: defined here before osp_jax.lm_head held them
    chunked_cross_entropy, fused_cross_entropy, head_logits)
from osp_jax.metrics import excess_kurtosis
from osp_jax import quant as quant_lib
from osp_jax import roles
from osp_jax.config import head_dim as _head_dim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The primitives of the fused attention kernels: cuDNN's forward (GPU) and Pallas' kernels (splash,
# TPU). Their outputs are the attention output and the softmax statistics the kernel's backward reads.
ATTENTION_KERNELS = frozenset({"dot_product_attention_fwd_wrapper", "pallas_call"})


def save_dots_and_attention(prim, *args, **params) -> bool:
    """Remat policy `dots_attn`: what `dots` keeps, plus the fused attention kernels' outputs.

    A fused attention kernel is a custom call, not a matmul, so under `dots` the backward pass runs
    each layer's attention forward again, only to get the statistics its backward kernel reads: one
    more kernel call per layer, at about 2/7 of what its forward and backward kernels cost together
    (the backward does about 2.5 times the forward's FLOPs). This policy keeps its output and
    statistics instead: for the 1.4B model at 8 x 2048 tokens, 64 MiB of output and 1 MiB of float32
    statistics a layer (16 MiB with the packed cuDNN layout at max_segments=16), so 1.5-1.9 GiB in
    all. With the XLA backend it is the same as `dots`.
    """
    return jax.checkpoint_policies.checkpoint_dots(prim, *args, **params) or prim.name in ATTENTION_KERNELS


def save_dots_attention_norms_rope(prim, *args, **params) -> bool:
    """Remat policy `dots_attn_norms`: what `dots_attn` keeps, plus the two RMSNorm outputs (and their
    inverse RMS) and the rotated queries and keys of each layer (named `norm_out`, `norm_rms` and
    `qk_rope`), which `dots_attn` still computes again in the backward pass (element-wise work: on
    one H100 at 8 x 2048 tokens the scanned 1.4B step spent 2.8 ms a step recomputing norms and as
    much recomputing RoPE). It keeps 4 x batch x seq x dim values more a layer: 0.5 GiB a layer at
    16 x 2048 in bfloat16, 12 GiB for the 24 layers of the 1.4B model."""
    return save_dots_and_attention(prim, *args, **params) or _SAVE_NORMS_ROPE(prim, *args, **params)


_SAVE_NORMS_ROPE = jax.checkpoint_policies.save_only_these_names("norm_out", "norm_rms", "qk_rope")

# Which intermediates a scanned layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_attn": save_dots_and_attention,
    "dots_attn_norms": save_dots_attention_norms_rope,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}


def _orthogonal_init(key, shape, dtype=jnp.float32):
    """nn.initializers.orthogonal computed in float32 (its QR has no bfloat16 kernel), then cast."""
    return nn.initializers.orthogonal()(key, shape, jnp.float32).astype(dtype)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Dense(nn.Module):
    """A bias-free projection written as one einsum, so q/k/v keep their (embed, heads, head_dim) shape."""

    spec: str            # einsum of (input, kernel), e.g. "bsd,dhk->bshk"
    shape: tuple
    axes: tuple          # logical axis names of the kernel
    init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = _param(self, "kernel", self.init, self.shape, self.axes, self.param_dtype)
        return jnp.einsum(self.spec, x, kernel.astype(self.dtype))


class RMSNorm(nn.Module):
    """RMSNorm; `scale="single"` is SSNorm: one learnable scalar instead of a gain per channel."""

    scale_mode: str = "single"
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.scale_mode == "single":
            scale = _param(self, "scale", nn.initializers.ones, (), (), self.param_dtype)
        else:
            scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        inv_rms = checkpoint_name(jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps), "norm_rms")
        y = x32 * inv_rms
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding in the half-split layout (Hugging Face Llama's rotate_half)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (batch, seq, half)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# The inputs of the linear layers, as the activation quantiser sees them (osp_jax.quant), by the
# names `observe` records them under (each role's `linear_input` in osp_jax.roles).
LINEAR_INPUTS = roles.LINEAR_INPUTS


def observe(module: nn.Module, name: str, x: jax.Array) -> None:
    """Records per-token excess kurtosis and max |x| of a linear layer's input (features: every axis
    after (batch, seq)) in the "intermediates" collection, when the caller made it mutable
    (`osp_jax.evaluate` does); a no-op otherwise, so training never pays for it."""
    if not module.is_mutable_collection("intermediates"):
        return
    flat = x.reshape(*x.shape[:2], -1).astype(jnp.float32)
    module.sow("intermediates", name, (excess_kurtosis(flat), jnp.max(jnp.abs(flat), axis=-1)))


class Attention(nn.Module):
    config: ml_collections.ConfigDict
    quant: quant_lib.QuantSpec | None = None  # fake quantisation for evaluation (osp_jax.quant); None = off

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.config
        dtype, pdtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
        hd = _head_dim(c)
        dense = lambda name, spec, shape, axes: Dense(spec, shape, axes, nn.initializers.normal(c.init_std),
                                                      dtype, pdtype, name=name)
        observe(self, roles.ATTN_Q.linear_input, x)
        if self.quant is not None:  # quant hook: q/k/v input, per token
            x = quant_lib.activations(x, self.quant)
        q = dense("q", "bsd,dhk->bshk", (c.dim, c.heads, hd), ("embed", "heads", "head_dim"))(x)
        k = dense("k", "bsd,dhk->bshk", (c.dim, c.kv_heads, hd), ("embed", "kv_heads", "head_dim"))(x)
        v = dense("v", "bsd,dhk->bshk", (c.dim, c.kv_heads, hd), ("embed", "kv_heads", "head_dim"))(x)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        q, k = (checkpoint_name(rope(t, positions, c.rope_theta), "qk_rope") for t in (q, k))
        if self.quant is not None:  # quant hooks: q/k rotated per head (QuaRot), then the KV cache, keys after RoPE
            q, k = quant_lib.qk_heads(q, self.quant), quant_lib.qk_heads(k, self.quant)
            k, v = quant_lib.kv(k, self.quant), quant_lib.kv(v, self.quant)
        out = attn_lib.attention(q, k, v, segment_ids, backend=c.attention, max_segments=c.max_segments)
        out = checkpoint_name(out, "attn_out")
        observe(self, roles.ATTN_O.linear_input, out)
        if self.quant is not None:  # quant hook: o input, per token over (heads, head_dim)
            out = quant_lib.activations(out, self.quant, (-2, -1))
        return dense("o", "bshk,hkd->bsd", (c.heads, hd, c.dim), ("heads", "head_dim", "embed"))(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ml_collections.ConfigDict
    quant: quant_lib.QuantSpec | None = None  # fake quantisation for evaluation (osp_jax.quant); None = off

    @nn.compact
    def __call__(self, x):
        c = self.config
        dtype, pdtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
        dense = lambda name, shape, axes: Dense("bsd,df->bsf", shape, axes, nn.initializers.normal(c.init_std),
                                                dtype, pdtype, name=name)
        observe(self, roles.MLP_GATE.linear_input, x)
        if self.quant is not None:  # quant hook: gate/up input, per token
            x = quant_lib.activations(x, self.quant)
        gate = dense("gate", (c.dim, c.ffn_dim), ("embed", "mlp"))(x)
        up = dense("up", (c.dim, c.ffn_dim), ("embed", "mlp"))(x)
        h = jax.nn.silu(gate) * up
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        observe(self, roles.MLP_DOWN.linear_input, h)
        if self.quant is not None:  # quant hook: down input (optionally Hadamard-rotated), per token
            h = quant_lib.ffn_hidden(h, self.quant)
        return dense("down", (c.ffn_dim, c.dim), ("mlp", "embed"))(h)


class Embed(nn.Module):
    """Holds the token table (vocab, dim) as `embedding`, or the untied LM head (dim, vocab) as `kernel`."""

    vocab: int
    dim: int
    init: nn.initializers.Initializer
    param_dtype: jnp.dtype = jnp.float32
    transpose: bool = False

    @nn.compact
    def __call__(self):
        if self.transpose:
            return _param(self, "kernel", self.init, (self.dim, self.vocab), ("embed", "vocab"), self.param_dtype)
        return _param(self, "embedding", self.init, (self.vocab, self.dim), ("vocab", "embed"), self.param_dtype)


class Block(nn.Module):
    """Pre-norm residual block. Scanned: carry is the residual stream, output the optional hidden state."""

    config: ml_collections.ConfigDict
    return_hidden: bool = False
    quant: quant_lib.QuantSpec | None = None  # fake quantisation for evaluation (osp_jax.quant); None = off

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.config
        norm = lambda name: lambda h: checkpoint_name(
            RMSNorm(c.norm_scale, c.norm_eps, DTYPES[c.dtype], DTYPES[c.param_dtype], name=name)(h), "norm_out")
        x = x + Attention(c, self.quant, name="attn")(norm("attn_norm")(x), positions, segment_ids)
        x = x + MLP(c, self.quant, name="mlp")(norm("mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, (x if self.return_hidden else None)


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` returns logits (float32), and the residual stream when asked.

    `targets` (batch, seq) returns per-token losses instead of logits, computed `model.loss_chunk`
    positions at a time (see chunked_cross_entropy); with `loss_weights` (batch, seq) as well, it
    returns `(sum(loss_weights * losses), losses)`, the training loss, which `model.loss_fused`
    computes with `fused_cross_entropy`. `return_hidden=True` also returns the hidden states after
    the embedding (EmbProj included) and after every layer, shape (layers + 1, batch, seq, dim), for
    the outlier metrics. It is a static flag: the ordinary forward pass compiles without it and pays
    nothing.
    """

    config: ml_collections.ConfigDict  # the `model` section of an osp_jax config
    quant: quant_lib.QuantSpec | None = None  # fake-quantised activations/KV for evaluation; None = off

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False, targets=None,
                 loss_weights=None):
        c = self.config
        dtype, pdtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        init = nn.initializers.normal(c.init_std)

        table = Embed(c.vocab_size, c.dim, init, pdtype, name="embed")()
        x = jnp.take(table.astype(dtype), tokens, axis=0)
        # The rows come out of the fsdp-split table split over `embed`; they go to the batch split
        # in two explicit steps (take the batch over the other batch axes, then trade embed for batch
        # over fsdp), and so does their gradient on the way back. Left to infer it, XLA replicated
        # the whole batch's rows on every device whenever op, dp or tp were > 1 (docs/benchmarks.md).
        x = nn.with_logical_constraint(x, ("lookup_batch", "length", "embed"))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if c.embed_proj:  # EmbProj, orthogonal at init so the model starts as if it were absent
            x = Dense("bsd,de->bse", (c.dim, c.dim), ("embed", "embed_proj"), _orthogonal_init,
                      dtype, pdtype, name="embed_proj")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        embedded = x

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=c.layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, hidden = stack(c, return_hidden, self.quant, name="layers")(x, positions, segment_ids)
        else:
            hidden = []
            for i in range(c.layers):
                x, h = block(c, return_hidden, self.quant, name=f"layers_{i}")(x, positions, segment_ids)
                hidden.append(h)
            hidden = jnp.stack(hidden) if return_hidden else None

        x = RMSNorm(c.norm_scale, c.norm_eps, dtype, pdtype, name="final_norm")(x)
        if c.embed_proj:
            x = Dense("bse,ed->bsd", (c.dim, c.dim), ("embed_proj", "embed"), _orthogonal_init,
                      dtype, pdtype, name="head_proj")(x)
        if self.quant is not None:  # quant hook: LM head input, per token
            x = quant_lib.activations(x, self.quant)
        if c.tie_embeddings:
            head, spec = table, "bsd,vd->bsv"
        else:
            head = Embed(c.vocab_size, c.dim, init, pdtype, transpose=True, name="lm_head")()
            spec = "bsd,dv->bsv"
        if targets is not None and loss_weights is not None and c.loss_fused:
            return fused_cross_entropy(x, head, spec, targets, loss_weights, c.loss_chunk)
        if targets is not None:
            losses = chunked_cross_entropy(x, head, spec, targets, c.loss_chunk)
            return losses if loss_weights is None else ((losses * loss_weights).sum(), losses)
        logits = head_logits(x, head, spec)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        if return_hidden:
            return logits, jnp.concatenate([embedded[None], hidden], axis=0)
        return logits


def precast_weights(params, model_config: ml_collections.ConfigDict):
    """`params` with the weights that only ever enter matmuls in `model.dtype` cast to it: every `Dense`
    kernel (q/k/v/o, gate/up/down, EmbProj's two) and the token table unless it is also the LM head
    (each role's `precast` in osp_jax.roles). The norm scales stay (the norms compute in float32), and
    so does the LM head (`head_logits` forms its gradient in float32).

    The model casts these weights itself where it uses them, so inside each rematerialised layer
    (which runs the casts again in the backward pass) and in every micro-batch of gradient
    accumulation. Cast once beforehand (`model.precast_weights`), the model's own casts are no-ops and
    every value it computes is the same; the price is a copy of the weights in `model.dtype` held
    through the step (2 bytes a weight in bfloat16: 2.4 GiB for the 1.4B model)."""
    dtype = DTYPES[model_config.dtype]
    cast_when = ("yes",) if model_config.tie_embeddings else ("yes", "untied")

    def cast(path, leaf):
        role = roles.require(path, jnp.ndim(leaf))
        return leaf.astype(dtype) if role is not None and role.precast in cast_when else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def abstract_params(model_config: ml_collections.ConfigDict, seq_len: int = 8):
    """Shapes (and logical-axis boxes) of the parameters, without allocating them."""
    model = Transformer(model_config)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def relayout_layers(tree, scan_layers: bool, layers: int):
    """Every layer stack in `tree` (parameters, or any optimizer state shaped like them) moved to the
    layout `scan_layers` asks for: one `layers` subtree stacked on axis 0 (True), or one `layers_<i>`
    subtree per layer (False, the unrolled model). Subtrees already in that layout, and
    `optax.MaskedNode` placeholders, are left as they are; a stack must hold `layers` layers."""
    masked = lambda x: isinstance(x, optax.MaskedNode)
    holder = lambda x: isinstance(x, dict) and ("layers" in x or "layers_0" in x)

    def move(d):
        if not holder(d):
            return d
        d = dict(d)
        if scan_layers and "layers_0" in d:
            parts = [d.pop(f"layers_{i}") for i in range(layers)]
            if any(k.startswith("layers_") for k in d):
                raise ValueError(f"relayout_layers: more unrolled layers than layers={layers}")
            d["layers"] = jax.tree.map(lambda *xs: xs[0] if masked(xs[0]) else jnp.stack(xs), *parts, is_leaf=masked)
        elif not scan_layers and "layers" in d:
            stack = d.pop("layers")
            for x in jax.tree.leaves(stack):
                if x.shape[:1] != (layers,):
                    raise ValueError(f"relayout_layers: a layer stack of shape {x.shape}, expected {layers} layers")
            for i in range(layers):
                d[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stack)
        return d

    return jax.tree.map(move, tree, is_leaf=holder)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def matmul_params(model_config: ml_collections.ConfigDict) -> int:
    """Parameters that take part in a matmul per token (the token embedding is a lookup, not a matmul)."""
    c = model_config
    hd = _head_dim(c)
    per_layer = c.dim * hd * (2 * c.heads + 2 * c.kv_heads) + 3 * c.dim * c.ffn_dim
    emb_proj = 2 * c.dim * c.dim if c.embed_proj else 0
    return c.layers * per_layer + emb_proj + c.dim * c.vocab_size  # + LM head (tied or not)


def flops_per_token(model_config: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x layers x heads x head_dim x seq (attention, not
    halved for causality; the convention of the MaxText/PaLM MFU figures; heads x head_dim is dim unless
    model.head_dim is set)."""
    c = model_config
    return 6.0 * matmul_params(c) + 12.0 * c.layers * c.heads * _head_dim(c) * seq_len


def summary(model_config: ml_collections.ConfigDict, seq_len: int) -> str:
    """Parameter counts by top-level module, computed abstractly (nothing is allocated)."""
    params = nn.unbox(abstract_params(model_config))
    lines = [f"{name:<12} {count_params(tree) / 1e6:12.2f} M" for name, tree in sorted(params.items())]
    lines.append(f"{'total':<12} {count_params(params) / 1e6:12.2f} M parameters")
    lines.append(f"{'per token':<12} {flops_per_token(model_config, seq_len) / 1e9:12.2f} GFLOP (training, seq {seq_len})")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m osp_jax.model --config=configs/osp_1b4.py
    from absl import app
    from ml_collections import config_flags

    from osp_jax.config import validate

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config().")

    def _main(argv):
        config = validate(_CONFIG.value)
        print(summary(config.model, config.train.seq_len))

    app.run(_main)
