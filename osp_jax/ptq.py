"""Post-training quantisation: from a checkpoint's parameters to the fake-quantised model that is scored.

One entry point, `quantize_model`, serves every consumer (`osp_jax.evaluate`'s perplexity, the
lm-evaluation-harness backend), so a method means the same thing everywhere. Methods:

  rtn  round-to-nearest (osp_jax.quant): weights symmetric per output channel (optionally with an
       MSE clip search), activations asymmetric per token, KV asymmetric in groups.

EmbProj is folded into the embedding and the LM head first (`quant.fold_embproj`), so what is
quantised is the plain Llama that export writes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

from osp_jax import quant as quant_lib

METHODS = ("rtn",)


class QuantizedModel(NamedTuple):
    """What a quantised pass needs: `Transformer(model_config, quant=spec).apply({"params": params}, ...)`."""

    model_config: ml_collections.ConfigDict  # EmbProj folded, head untied
    params: Any                              # host arrays, weights already fake-quantised
    spec: quant_lib.QuantSpec                # what the model quantises at run time (activations, KV, rotations)


def check_method(method: str) -> str:
    """`method`, or a ValueError naming the methods there are."""
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: expected one of {', '.join(METHODS)}")
    return method


def quantize_model(params, model_config: ml_collections.ConfigDict, bits: quant_lib.Bits, *, method: str = "rtn",
                   hadamard_ffn: bool = False, clip_search: bool = False) -> QuantizedModel:
    """The fake-quantised model of `params` (host float32 arrays of osp_jax's tree) at `bits` by `method`."""
    check_method(method)
    q_params, q_cfg = quant_lib.fold_embproj(params, model_config)
    if hadamard_ffn:
        q_params = quant_lib.rotate_ffn(q_params)
    q_params = quant_lib.quantize_weights(q_params, bits.w, clip_search)
    spec = quant_lib.QuantSpec(a_bits=bits.a, kv_bits=bits.kv, hadamard_ffn=hadamard_ffn)
    return QuantizedModel(q_cfg, q_params, spec)
