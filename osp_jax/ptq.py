"""Post-training quantisation: from a checkpoint's parameters to the fake-quantised model that is scored.

One entry point, `quantize_model`, serves every consumer (`osp_jax.evaluate`'s perplexity, the
lm-evaluation-harness backend), so a method means the same thing everywhere. Methods:

  rtn          round-to-nearest (osp_jax.quant): weights symmetric per output channel (optionally with
               an MSE clip search), activations asymmetric per token, KV asymmetric in groups.
  gptq         the weights by GPTQ (osp_jax.gptq) on the same per-channel grid, calibrated layer by
               layer on `calibration` batches; activations and KV as rtn.
  quarot       QuaRot-style rotation first (osp_jax.rotation: norm gains folded, residual stream
               rotated by a seeded random Hadamard matrix, values per head), queries and keys rotated
               per head online, the FFN hidden state online (the FFN Hadamard, implied); then rtn.
  quarot+gptq  the rotation, then GPTQ on the rotated weights (calibrated with the rotations online).

Calibration batches are host dicts as the data pipeline gives them (inputs, targets, segment_ids,
positions); `pack_mask` says how their windows are laid out, as `data.pack_mask` does in training.

EmbProj is folded into the embedding and the LM head first (`quant.fold_embproj`), so what is
quantised is the plain Llama that export writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from osp_jax import gptq
from osp_jax import quant as quant_lib
from osp_jax import rotation

METHODS = ("rtn", "gptq", "quarot", "quarot+gptq")
CALIBRATED = ("gptq", "quarot+gptq")  # the methods that need calibration data


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


def needs_calibration(method: str) -> bool:
    return check_method(method) in CALIBRATED


def quantize_model(params, model_config: ml_collections.ConfigDict, bits: quant_lib.Bits, *, method: str = "rtn",
                   hadamard_ffn: bool = False, clip_search: bool = False,
                   calibration: Sequence[Mapping] | None = None, act_order: bool = False, pack_mask: bool = True,
                   seed: int = 0) -> QuantizedModel:
    """The fake-quantised model of `params` (host float32 arrays of osp_jax's tree) at `bits` by `method`.

    `hadamard_ffn` adds the FFN Hadamard to rtn or gptq (quarot always has it); `clip_search` picks
    each channel's clip ratio of the weight grid by MSE (rtn, and the grid GPTQ rounds to);
    `calibration` (gptq methods: required), `act_order` and `pack_mask` are GPTQ's; `seed` draws the
    signs of QuaRot's residual rotation.
    """
    if needs_calibration(method) and not calibration:
        raise ValueError(f"--method={method} needs calibration batches (calibration=...); got none")
    rotate = method.startswith("quarot")
    hadamard_ffn = bool(hadamard_ffn or rotate)
    q_params, q_cfg = quant_lib.fold_embproj(params, model_config)
    if rotate:
        q_params = rotation.rotate(q_params, seed=seed)
    if hadamard_ffn:
        q_params = quant_lib.rotate_ffn(q_params)
    spec = quant_lib.QuantSpec(a_bits=bits.a, kv_bits=bits.kv, hadamard_ffn=hadamard_ffn, rotate_qk_heads=rotate)
    if method in CALIBRATED:
        q_params = gptq.quantize_params(q_params, q_cfg, bits.w, list(calibration), spec=spec, pack_mask=pack_mask,
                                        act_order=act_order, clip_search=clip_search)
    else:
        q_params = quant_lib.quantize_weights(q_params, bits.w, clip_search)
    return QuantizedModel(q_cfg, q_params, spec)
