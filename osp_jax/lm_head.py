"""The LM head's logits and the next-token loss, written so that the (batch, seq, vocab) float32 logits
need not be held whole: `head_logits` (a backward pass in the compute dtype), `chunked_cross_entropy`
(logits for `chunk` positions at a time, recomputed in the backward pass) and `fused_cross_entropy`
(the head's gradients formed in the forward pass). osp_jax.model's Transformer calls them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def _einsum_parts(spec: str) -> tuple[str, str, str]:
    """`"a,b->out"` -> (a, b, out)."""
    lhs, out = spec.split("->")
    a, b = lhs.split(",")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_logits(x, head, spec: str):
    """float32 logits `einsum(spec, x, head)` with `head` cast to `x`'s dtype (float32 accumulation).

    The backward pass casts the float32 logit gradient to `x`'s dtype before its two matmuls, as every
    other layer's gradient already is; left to autodiff, the float32 cotangent promoted both to float32
    (TF32 on a GPU): 24 ms of the 1.4B bfloat16 step on one H100. The head's gradient comes back in
    its own dtype (float32 for float32 parameters), accumulated in float32.
    """
    return jnp.einsum(spec, x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def _head_logits_fwd(x, head, spec):
    return head_logits(x, head, spec), (x, head)


def _head_logits_bwd(spec, residuals, g):
    x, head = residuals
    a, b, out = _einsum_parts(spec)
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, head.astype(x.dtype), preferred_element_type=jnp.float32)
    dhead = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dhead.astype(head.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def _chunk_count(seq_len: int, chunk: int) -> int:
    """How many chunks of `chunk` positions make the sequence: 1 when `chunk` is 0 or covers it."""
    if not chunk or chunk >= seq_len:
        return 1
    if seq_len % chunk:
        raise ValueError(f"model.loss_chunk={chunk} must divide the sequence length {seq_len}")
    return seq_len // chunk


def _to_chunks(t, n: int):
    """(batch, seq, ...) -> (n, batch, seq / n, ...)."""
    return t.reshape(t.shape[0], n, t.shape[1] // n, *t.shape[2:]).swapaxes(0, 1)


def _from_chunks(t):
    """(n, batch, seq / n, ...) -> (batch, seq, ...)."""
    return t.swapaxes(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], *t.shape[3:])


def _logits(x, head, spec: str):
    return nn.with_logical_constraint(head_logits(x, head, spec), ("batch", "length", "act_vocab"))


def chunked_cross_entropy(x, head, spec: str, targets, chunk: int):
    """Per-token next-token loss (float32) from the final hidden state `x` (batch, seq, dim).

    With `chunk` > 0 the logits exist for `chunk` positions at a time and are recomputed in the
    backward pass, so the (batch, seq, vocab) float32 logits are never materialised at once: at
    vocab 49152 that is 3.2 GB per 8 x 2048 tokens, twice over with its gradient.
    """

    def losses(xc, tc):
        return optax.softmax_cross_entropy_with_integer_labels(_logits(xc, head, spec), tc)

    n = _chunk_count(x.shape[1], chunk)
    if n == 1:
        return losses(x, targets)
    out = jax.lax.map(lambda a: jax.checkpoint(losses)(*a), (_to_chunks(x, n), _to_chunks(targets, n)))
    return _from_chunks(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 5))
def fused_cross_entropy(x, head, spec: str, targets, weights, chunk: int):
    """`(sum(weights * token_losses), token_losses)` with the head's gradients formed in the forward pass.

    For each `chunk` positions (all at once when 0) the forward pass computes the float32 logits, the
    per-token losses, and, while the logits are at hand, their weighted gradient `weights x (softmax -
    onehot)`, cast to `x`'s dtype, and from it the gradients of `x` and of `head`, as
    `head_logits`' backward would. No logits outlive their chunk and none is computed twice: the
    matmul work is the same as an ordinary forward and backward pass through the head, and with a
    chunk the float32 (batch, seq, vocab) logits and their gradient are never held whole. The
    backward pass only scales the stored gradients by the cotangent of the weighted sum: this is
    exact because the weights are known before the forward pass (the loss mask over its count).
    `token_losses` are for metrics: no gradient flows through them.
    """
    return _fused_ce_fwd(x, head, spec, targets, weights, chunk)[0]


def _fused_ce_fwd(x, head, spec, targets, weights, chunk):
    a, b, out = _einsum_parts(spec)
    head_c = head.astype(x.dtype)  # once, not in every chunk
    n = _chunk_count(x.shape[1], chunk)

    def one(dhead, xs):
        xc, tc, wc = xs
        logits = _logits(xc, head_c, spec)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tc)
        g = (jax.nn.softmax(logits) - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)) * wc[..., None]
        g = g.astype(x.dtype)
        dx = jnp.einsum(f"{out},{b}->{a}", g, head_c, preferred_element_type=jnp.float32).astype(x.dtype)
        dhead = dhead + jnp.einsum(f"{a},{out}->{b}", xc, g, preferred_element_type=jnp.float32)
        return dhead, (losses, dx)

    chunks = tuple(_to_chunks(t, n) for t in (x, targets, weights.astype(jnp.float32)))
    dhead, (losses, dx) = jax.lax.scan(one, jnp.zeros(head.shape, jnp.float32), chunks)
    losses, dx = _from_chunks(losses), _from_chunks(dx)
    return ((losses * weights).sum(), losses), (dx, dhead.astype(head.dtype), weights)


def _fused_ce_bwd(spec, chunk, residuals, cotangents):
    dx, dhead, weights = residuals
    g = cotangents[0]  # the token losses' cotangent is dropped: they are for metrics
    return (dx * g.astype(dx.dtype), (dhead * g).astype(dhead.dtype), None, jnp.zeros_like(weights))


fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)
