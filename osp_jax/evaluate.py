"""`python -m osp_jax.evaluate`: perplexity, outlier statistics and quantised perplexity of a checkpoint.

    python -m osp_jax.evaluate --workdir=runs/tiny --data=builtin --bits=4,4,4 \
        [--step=N] [--hadamard=ffn] [--clip-search] [--output=eval.json] [--plot=eval.png] \
        [--max-tokens=N] [--batch-size=B] [--seq-len=S]

Reports, in float32 compute:
- `ppl`: perplexity of the checkpoint as trained;
- `quant_ppl`: perplexity with round-to-nearest fake quantisation at `--bits=W,A,KV` (see osp_jax.quant:
  weights per output channel, activations per token, KV in groups of 128; EmbProj folded first);
- `kurtosis`: excess kurtosis of the residual stream (after the embedding and after every layer),
  the per-token mean of each layer averaged over layers; with `kurtosis_per_layer`, `max_abs_per_layer`.

--data is a prepared directory (its `validation` split), "builtin", or a .jsonl/.txt file tokenised with
the run's tokenizer (WORKDIR/tokenizer.json) into one EOS-separated stream cut into windows of seq_len + 1.
Prepared data must have been tokenised with the run's tokenizer (the sha256 in its metadata.json against
the run's tokenizer file, or the run's data_metadata.json); a run that records neither is evaluated with
a warning. Padding is never scored: a token counts where its segment id is positive.

--output is strict JSON: a non-finite number is written as null (a NaN loss gives a NaN perplexity, so
`loss` and `ppl` both null; a finite loss past float64's range gives `ppl` null beside a finite `loss`).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from osp_jax import config as config_lib
from osp_jax import metrics as metrics_lib
from osp_jax import quant as quant_lib
from osp_jax.model import LINEAR_INPUTS, Transformer
from osp_jax.step import window_layout

PROG = "osp_jax.evaluate"
PROGRESS_EVERY_S = 10.0
TEXT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".txt.gz", ".txt.xz", ".txt.zst")


class EvalError(ValueError):
    """A user error (bad flag, missing checkpoint, too little data): reported in one line, no traceback."""


# ----------------------------------------------------------------------------------------------------
# Data: lists of host batches {inputs, targets, segment_ids, positions, weights}.


def _windows_from_stream(tokens: np.ndarray, seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens, with segment ids and positions restarting after
    every EOS (as the packing pipeline does)."""
    w = seq_len + 1
    n = len(tokens) // w
    win = tokens[: n * w].reshape(n, w).astype(np.int32)
    starts = np.zeros_like(win, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = win[:, :-1] == eos_id
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(w), win.shape)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    pos = (idx - last_start).astype(np.int32)
    return {"inputs": win[:, :-1], "targets": win[:, 1:], "segment_ids": seg[:, :-1], "positions": pos[:, :-1]}


def _batched(windows: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = windows["inputs"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i:i + batch_size] for k, v in windows.items()}
        short = batch_size - batch["inputs"].shape[0]
        if short:  # pad to a full batch so one compiled function serves every batch
            batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        yield batch


def _text_batches(path: str, workdir: str, vocab_size: int, seq_len: int, batch_size: int):
    from osp_jax.data import pipeline, tokenizer as tokenizer_lib

    if not glob.glob(path):
        raise EvalError(f"--data={path}: no such file")
    try:
        tok_path = tokenizer_lib.run_tokenizer_path(workdir)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if tok_path is None:
        raise EvalError(f"{workdir} holds no tokenizer (tokenizer.json, tokenizer.model, or the file its "
                        f"data_metadata.json names): tokenising {path} needs the run's tokenizer, which train "
                        "copies into the workdir from prepared data; pass --data=DIR of prepared data instead")
    tok = tokenizer_lib.load_tokenizer(tok_path)
    if tok.vocab_size > vocab_size:
        raise EvalError(f"the tokenizer {tok_path} has vocabulary {tok.vocab_size} but the model's vocab_size "
                        f"is {vocab_size}")
    stream = pipeline.text_file_tokens(path, tok)
    if len(stream) < seq_len + 1:
        raise EvalError(f"{path} has {len(stream)} tokens, fewer than one sequence: --seq-len={seq_len} "
                        f"needs at least {seq_len + 1}")
    return _batched(_windows_from_stream(stream, seq_len, tok.eos_id), batch_size)


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


def check_tokenizer(data: str, data_dir: str, meta: dict, workdir: str) -> None:
    """EvalError when the prepared data was tokenised with another tokenizer than the run's (its ids
    would name other tokens); a warning when either side does not say which tokenizer it used."""
    from osp_jax.data.tokenizer import data_tokenizer_sha256, run_tokenizer_sha256

    data_sha, data_tok = data_tokenizer_sha256(data_dir, meta)
    try:
        run_sha, run_tok = run_tokenizer_sha256(workdir)
    except ValueError as e:
        raise EvalError(str(e)) from None
    run_tok = run_tok or f"(recorded in {os.path.join(workdir, 'data_metadata.json')})"
    if data_sha is None or run_sha is None:
        unknown = f"{data_dir} names no tokenizer" if data_sha is None else f"{workdir} keeps no tokenizer"
        _warn(f"{unknown}: cannot check that --data={data} was tokenised with the run's tokenizer")
    elif data_sha != run_sha:
        raise EvalError(f"--data={data} was tokenised with {data_tok} (sha256 {data_sha[:16]}), not with the "
                        f"run's tokenizer {run_tok} (sha256 {run_sha[:16]}): prepare the data with the run's "
                        "tokenizer, or pass a .jsonl/.txt file")


def _prepared_batches(data: str, workdir: str, vocab_size: int, seq_len: int, batch_size: int):
    from osp_jax.data import pipeline

    try:  # the data layer's ValueErrors here are user errors (bad metadata, vocabulary too large)
        data_dir = pipeline.resolve_data_dir(data)
        meta = pipeline.load_metadata(data_dir)
        pipeline.check_vocab(meta, vocab_size)
    except ValueError as e:
        raise EvalError(f"--data={data}: {e}") from None
    check_tokenizer(data, data_dir, meta, workdir)
    split = meta["splits"].get("validation") or {}
    tokens = int(split.get("tokens", 0))
    if tokens < seq_len + 1:
        raise EvalError(f"the validation split of {data_dir} has {tokens} tokens, fewer than one sequence: "
                        f"--seq-len={seq_len} needs at least {seq_len + 1}")
    it = pipeline.make_iterator(data_dir, "validation", seq_len=seq_len, global_batch_size=batch_size, seed=0,
                                shuffle=False, num_epochs=1)
    try:
        for batch in it:
            yield {k: np.asarray(v) for k, v in batch.items()}
    finally:
        it.close()


def load_batches(data: str, workdir: str, *, vocab_size: int, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every evaluation batch, with `weights` (1 = a scored token), cut at `max_tokens` scored tokens."""
    is_text = os.path.isfile(data) or data.endswith(TEXT_SUFFIXES)
    source = (_text_batches(data, workdir, vocab_size, seq_len, batch_size) if is_text
              else _prepared_batches(data, workdir, vocab_size, seq_len, batch_size))
    batches, counted = [], 0
    for batch in source:
        weights = (batch["segment_ids"] > 0).astype(np.float32)
        if max_tokens is not None:
            room = max_tokens - counted
            weights = weights * (np.cumsum(weights.reshape(-1)).reshape(weights.shape) <= room)
        counted += int(weights.sum())
        if weights.any():
            batches.append({**batch, "weights": weights})
        if max_tokens is not None and counted >= max_tokens:
            break
    if not batches:
        raise EvalError(f"{data}: no tokens to evaluate")
    return batches


# ----------------------------------------------------------------------------------------------------
# Pure per-batch functions.


def linear_inputs(intermediates) -> dict:
    """`observe`d per-token (kurtosis, max |x|) of the linear layers' inputs -> {name: (kurtosis,
    max_abs)}, each (layers, batch, seq), from the scanned stack or from layers_0, layers_1, ..."""
    found: dict = {}

    def visit(tree, layer):
        for key, value in tree.items():
            if key in LINEAR_INPUTS:
                ((kurt, max_abs),) = value
                found.setdefault(key, []).append((layer, kurt, max_abs))
            elif isinstance(value, Mapping):
                visit(value, int(key.split("_", 1)[1]) if key.startswith("layers_") else layer)

    visit(intermediates, None)
    out = {}
    for key, items in found.items():
        if len(items) == 1 and items[0][0] is None:  # scanned: already stacked over layers
            out[key] = items[0][1:]
        else:
            items.sort(key=lambda t: t[0])
            out[key] = (jnp.stack([t[1] for t in items]), jnp.stack([t[2] for t in items]))
    return out


def batch_stats(params, batch, *, model: Transformer, pack_mask: bool, outliers: bool = False) -> dict:
    """Summed loss and scored-token count; with `outliers`, per-layer kurtosis sums and max |activation|
    of the residual stream and of every linear layer's input (what the activation quantiser sees)."""
    out = model.apply({"params": params}, batch["inputs"], **window_layout(batch, pack_mask), return_hidden=outliers,
                      mutable=["intermediates"] if outliers else False)
    inputs = {}
    if outliers:
        out, state = out
        inputs = linear_inputs(state.get("intermediates", {}))
    logits, hidden = out if outliers else (out, None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    w = batch["weights"]
    stats = {"loss_sum": jnp.sum(losses * w), "tokens": jnp.sum(w)}
    if outliers:  # metrics.excess_kurtosis per token, masked so padding does not count
        stats["kurtosis_sum"] = jnp.sum(metrics_lib.excess_kurtosis(hidden) * w, axis=(1, 2))
        per_token_max = jnp.max(jnp.abs(hidden.astype(jnp.float32)), axis=-1)
        stats["max_abs"] = jnp.max(jnp.where(w > 0, per_token_max, 0.0), axis=(1, 2))
        for name, (kurt, max_abs) in inputs.items():
            stats[f"{name}.kurtosis_sum"] = jnp.sum(kurt * w, axis=(1, 2))
            stats[f"{name}.max_abs"] = jnp.max(jnp.where(w > 0, max_abs, 0.0), axis=(1, 2))
    return stats


@functools.lru_cache(maxsize=16)
def _stats_fn(model_json: str, spec: quant_lib.QuantSpec | None, pack_mask: bool, outliers: bool):
    """One jitted `batch_stats` per model/quantisation setting, kept so repeated evaluations reuse it."""
    model = Transformer(ml_collections.ConfigDict(json.loads(model_json)), quant=spec)
    return jax.jit(functools.partial(batch_stats, model=model, pack_mask=pack_mask, outliers=outliers))


def _run(fn, params, batches, what: str = "", every_s: float | None = None) -> dict:
    """Sums (maxima for max_abs) of `fn` over `batches`; a pass longer than `every_s` reports progress
    on stderr every `every_s` seconds: batches done, seconds a batch, ETA."""
    total: dict = {}
    every_s = PROGRESS_EVERY_S if every_s is None else every_s
    t0 = last = time.perf_counter()
    for i, b in enumerate(batches, 1):
        now = time.perf_counter()
        if i > 1 and now - last >= every_s:
            per = (now - t0) / (i - 1)
            print(f"{PROG}: {what}: {i - 1}/{len(batches)} batches, {per:.2f} s/batch, ETA "
                  f"{metrics_lib.format_duration(per * (len(batches) - i + 1))}", file=sys.stderr, flush=True)
            last = now
        out = jax.device_get(fn(params, b))
        for k, v in out.items():
            v = np.asarray(v, np.float64)
            if k not in total:
                total[k] = v
            else:
                total[k] = np.maximum(total[k], v) if k.endswith("max_abs") else total[k] + v
    return total


def _perplexity(loss_sum: float, tokens: float) -> float:
    """exp(mean loss); inf past float64's range, NaN for a NaN loss (a diverged model is not 'inf')."""
    loss = loss_sum / max(tokens, 1.0)
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


# ----------------------------------------------------------------------------------------------------


def load_checkpoint(workdir: str, step: int | None):
    """(step, params, validated config) from WORKDIR, or EvalError."""
    from osp_jax.checkpoint import CheckpointError, restore_params_only

    if not os.path.isdir(workdir):
        raise EvalError(f"--workdir={workdir}: no such directory")
    try:
        found, params, cfg = restore_params_only(workdir, step=step)
    except CheckpointError as e:
        raise EvalError(f"--workdir={workdir}: {e}") from None
    if cfg is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise EvalError(f"checkpoint step {found} in {workdir} has no config, and there is no {path}")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    try:
        config = config_lib.from_dict(cfg)
    except config_lib.ConfigError as e:
        raise EvalError(f"the config saved in {workdir} is not valid: {e}") from None
    return found, params, config


def evaluate(workdir: str, data: str, *, step: int | None = None, bits: quant_lib.Bits | str = "4,4,4",
             hadamard: str | None = None, clip_search: bool = False, max_tokens: int | None = None,
             batch_size: int = 8, seq_len: int | None = None) -> dict:
    """All numbers of one evaluation, as the JSON the CLI writes."""
    if isinstance(bits, str):
        try:
            bits = quant_lib.parse_bits(bits)
        except ValueError as e:
            raise EvalError(str(e)) from None
    if hadamard not in (None, "none", "ffn"):
        raise EvalError(f"--hadamard={hadamard!r}: expected 'ffn' or 'none'")
    hadamard_ffn = hadamard == "ffn"
    for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{name}={value}: expected a positive integer")

    found, params, config = load_checkpoint(workdir, step)
    seq_len = seq_len or config.train.seq_len
    batches = load_batches(data, workdir, vocab_size=config.model.vocab_size, seq_len=seq_len,
                           batch_size=batch_size, max_tokens=max_tokens)

    # Evaluation runs in float32 with the exact XLA attention, whatever the run trained with.
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.dtype, model_cfg.param_dtype, model_cfg.attention, model_cfg.remat = "float32", "float32", "xla", "none"
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # host copy, for folding
    pack_mask = bool(config.data.pack_mask)

    as_json = lambda c: json.dumps(c.to_dict(), sort_keys=True)
    with jax.default_matmul_precision("float32"):
        fp = _run(_stats_fn(as_json(model_cfg), None, pack_mask, True), jax.device_put(params), batches,
                  "16-bit pass")

        q_params, q_cfg = quant_lib.fold_embproj(params, model_cfg)
        if hadamard_ffn:
            q_params = quant_lib.rotate_ffn(q_params)
        q_params = quant_lib.quantize_weights(q_params, bits.w, clip_search)
        spec = quant_lib.QuantSpec(a_bits=bits.a, kv_bits=bits.kv, hadamard_ffn=hadamard_ffn)
        qt = _run(_stats_fn(as_json(q_cfg), spec, pack_mask, False), jax.device_put(q_params), batches,
                  f"{bits} pass")

    tokens = float(fp["tokens"])
    kurt = fp["kurtosis_sum"] / max(tokens, 1.0)
    return {
        "step": int(found),
        "workdir": os.path.abspath(workdir),
        "data": data,
        "bits": {"w": bits.w, "a": bits.a, "kv": bits.kv},
        "setting": str(bits),
        "hadamard": "ffn" if hadamard_ffn else None,
        "clip_search": bool(clip_search),
        "seq_len": int(seq_len),
        "tokens": int(tokens),
        "loss": float(fp["loss_sum"] / max(tokens, 1.0)),
        "ppl": _perplexity(float(fp["loss_sum"]), tokens),
        "quant_loss": float(qt["loss_sum"] / max(tokens, 1.0)),
        "quant_ppl": _perplexity(float(qt["loss_sum"]), tokens),
        "kurtosis": float(kurt.mean()),
        "kurtosis_per_layer": [float(v) for v in kurt],
        "max_abs": float(fp["max_abs"].max()),
        "max_abs_per_layer": [float(v) for v in fp["max_abs"]],
        # The same statistics at the inputs of the linear layers (float32 model, before any
        # quantisation or rotation): qkv_in and gate_up_in are the normalised residual stream.
        "linear_inputs": {
            name: {"kurtosis": float(np.mean(fp[f"{name}.kurtosis_sum"]) / max(tokens, 1.0)),
                   "kurtosis_per_layer": [float(v) / max(tokens, 1.0) for v in fp[f"{name}.kurtosis_sum"]],
                   "max_abs": float(np.max(fp[f"{name}.max_abs"])),
                   "max_abs_per_layer": [float(v) for v in fp[f"{name}.max_abs"]]}
            for name in LINEAR_INPUTS if f"{name}.max_abs" in fp},
    }


def format_table(r: dict) -> str:
    lines = [f"step {r['step']} | {r['tokens']:,} tokens | seq_len {r['seq_len']}",
             f"{'layer':>8} {'kurtosis':>12} {'max|act|':>12}"]
    for i, (k, m) in enumerate(zip(r["kurtosis_per_layer"], r["max_abs_per_layer"])):
        lines.append(f"{'embed' if i == 0 else i:>8} {k:>12.4f} {m:>12.4f}")
    extras = "".join([" +FFN Had" if r["hadamard"] else "", " +clip search" if r["clip_search"] else ""])
    rows = [("kurtosis (mean over layers)", f"{r['kurtosis']:.4f}"),
            ("max |activation|", f"{r['max_abs']:.4f}"),
            *((f"  at {name} (linear input): kurtosis / max", f"{v['kurtosis']:.4f} / {v['max_abs']:.4f}")
              for name, v in r.get("linear_inputs", {}).items()),
            ("perplexity", f"{r['ppl']:.4f}  (loss {r['loss']:.4f})"),
            (f"perplexity {r['setting']}{extras}", f"{r['quant_ppl']:.4f}  (loss {r['quant_loss']:.4f})")]
    width = max(len(label) for label, _ in rows)
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    """Per-layer kurtosis and max |activation| (log scale), two panels: the residual stream, and the
    q/k/v and down-projection inputs where the record has them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    layers = np.arange(len(r["kurtosis_per_layer"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(layers, r["kurtosis_per_layer"], marker="o", label="residual stream")
    ax1.set_ylabel("excess kurtosis")
    ax1.set_title(f"step {r['step']}: kurtosis {r['kurtosis']:.3g}, ppl {r['ppl']:.3g}, "
                  f"{r['setting']} ppl {r['quant_ppl']:.3g}")
    ax2.plot(layers, np.maximum(r["max_abs_per_layer"], 1e-12), marker="o", label="residual stream")
    # Inputs of layer l's linear layers, drawn at l (q/k/v reads the residual stream after layer l - 1).
    for name, label in (("qkv_in", "q/k/v input"), ("down_in", "down-proj input")):
        li = r.get("linear_inputs", {}).get(name)
        if li:
            x = np.arange(1, len(li["kurtosis_per_layer"]) + 1)
            ax1.plot(x, li["kurtosis_per_layer"], marker=".", linestyle="--", label=label)
            ax2.plot(x, np.maximum(li["max_abs_per_layer"], 1e-12), marker=".", linestyle="--", label=label)
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("max |activation|")
    ax2.set_xlabel("layer (residual stream: after it, 0 = embedding; linear inputs: inside it)")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite_or_none(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _write_json(path: str, record: dict) -> None:
    """Strict JSON: a non-finite number (a NaN loss, an overflowing perplexity) is written as null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite_or_none(record), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (checkpoints/, tokenizer.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data", required=True, help="prepared data directory, 'builtin', or a .jsonl/.txt file")
    p.add_argument("--bits", default="4,4,4", help="W,A,KV bit widths in 2..16; 16 = not quantised (default 4,4,4)")
    p.add_argument("--hadamard", choices=("none", "ffn"), default="none", help="online Hadamard rotation")
    p.add_argument("--clip-search", action="store_true", help="per-channel MSE search of weight clip ratios")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw per-layer kurtosis and max |activation| to this PNG")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's train.seq_len)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 2 user error)."""
    args = _parser().parse_args(argv)
    from osp_jax.data.sources import DataError

    try:
        bits = quant_lib.parse_bits(args.bits)  # checked before the (slow) checkpoint load
    except ValueError as e:
        return _fail(e)
    try:
        result = evaluate(args.workdir, args.data, step=args.step, bits=bits, hadamard=args.hadamard,
                          clip_search=args.clip_search, max_tokens=args.max_tokens, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    except (EvalError, DataError, FileNotFoundError, config_lib.ConfigError) as e:
        return _fail(e)
    print(format_table(result), flush=True)
    if args.output:
        _write_json(args.output, result)
        print(f"wrote {args.output}", flush=True)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", flush=True)
    return 0


def _fail(err: BaseException) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
