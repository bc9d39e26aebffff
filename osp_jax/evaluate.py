"""`python -m osp_jax.evaluate`: perplexity, outlier statistics and quantised perplexity of a checkpoint.

    python -m osp_jax.evaluate --workdir=runs/tiny --data=builtin --bits=4,4,4 \
        [--step=N] [--hadamard=ffn] [--clip-search] [--output=eval.json] [--plot=eval.png] \
        [--max-tokens=N] [--batch-size=B] [--seq-len=S] \
        [--method=rtn|gptq|quarot|quarot+gptq] [--calib-samples=128] [--calib-data=DIR|FILE] [--act-order]

Reports, in float32 compute:
- `ppl`: perplexity of the checkpoint as trained;
- `quant_ppl`: perplexity with fake quantisation at `--bits=W,A,KV` by `--method` (osp_jax.ptq; default
  round-to-nearest, see osp_jax.quant: weights per output channel, activations per token, KV in groups
  of 128; EmbProj folded first). gptq and quarot+gptq calibrate on --calib-samples sequences of the
  run's training data (--calib-data to choose other data), found before the checkpoint is read;
- `kurtosis`: excess kurtosis of the residual stream (after the embedding and after every layer),
  the per-token mean of each layer averaged over layers; with `kurtosis_per_layer`, `max_abs_per_layer`.

--data is a prepared directory (its `validation` split), "builtin", or a .jsonl/.txt file tokenised with
the run's tokenizer (WORKDIR/tokenizer.json) into one EOS-separated stream cut into windows of seq_len + 1.
Prepared data must have been tokenised with the run's tokenizer (the sha256 in its metadata.json against
the run's tokenizer file, or the run's data_metadata.json); a run that records neither is evaluated with
a warning. Padding is never scored: a token counts where its segment id is positive.

Benchmark tasks through lm-evaluation-harness (the [eval] extra; osp_jax.benchmark_tasks):

    python -m osp_jax.evaluate --workdir=runs/tiny --tasks=arc_easy,piqa --bits=4,4,4 [--hadamard=ffn] \
        [--include-path=DIR] [--limit=N] [--output=scores.json]
    python -m osp_jax.evaluate --workdir=runs/tiny --suite=paper [--output=paper.json]

score each task at 16-16-16 and at --bits (one table: a column a task, the average, the drop from 16
bits), or the paper's ten benchmarks at 16-16-16, 4-4-4 and 4-4-4 +FFN Had; no --data then.

--output is strict JSON: a non-finite number is written as null (a NaN loss gives a NaN perplexity, so
`loss` and `ppl` both null; a finite loss past float64's range gives `ppl` null beside a finite `loss`).

The batches are osp_jax.eval_data's, the table and the figure osp_jax.eval_report's.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from osp_jax import cli, compilation_cache, storage
from osp_jax import config as config_lib
from osp_jax.eval_data import (  # noqa: F401 - re-exported: defined here before osp_jax.eval_data held them
    TEXT_SUFFIXES, EvalError, calibration_batches, calibration_source, check_calibration, check_tokenizer,
    load_batches)
from osp_jax import metrics as metrics_lib
from osp_jax.eval_report import check_plot_format, format_table, plot
from osp_jax import ptq, scoring
from osp_jax import quant as quant_lib
from osp_jax.data.sources import DataError
from osp_jax.model import LINEAR_INPUTS, Transformer
from osp_jax.step import eval_step, linear_inputs  # noqa: F401 - linear_inputs: re-exported, was defined here

PROG = "osp_jax.evaluate"
PROGRESS_EVERY_S = 10.0


# ----------------------------------------------------------------------------------------------------
# Per-batch statistics: `osp_jax.step.eval_step`, the one train's validation loss uses too.

batch_stats = eval_step  # the name evaluate gave it before step.eval_step measured outliers


@functools.lru_cache(maxsize=16)
def _stats_fn(model_json: str, spec: quant_lib.QuantSpec | None, pack_mask: bool, outliers: bool):
    """One jitted `eval_step` per model/quantisation setting, kept so repeated evaluations reuse it."""
    model = Transformer(ml_collections.ConfigDict(json.loads(model_json)), quant=spec)
    return jax.jit(functools.partial(eval_step, model=model, pack_mask=pack_mask, outliers=outliers))


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
            cli.say(PROG, f"{what}: {i - 1}/{len(batches)} batches, {per:.2f} s/batch, ETA "
                          f"{metrics_lib.format_duration(per * (len(batches) - i + 1))}")
            last = now
        metrics_lib.accumulate(total, jax.device_get(fn(params, b)))
    return total


def _perplexity(loss_sum: float, tokens: float) -> float:
    """exp(mean loss); inf past float64's range, NaN for a NaN loss (a diverged model is not 'inf')."""
    loss = loss_sum / max(tokens, 1.0)
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


# ----------------------------------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
    """EvalError unless --workdir is a directory."""
    if not storage.is_dir(workdir):
        what = "a file, not a directory" if storage.is_file(workdir) else "no such directory"
        raise EvalError(f"--workdir={workdir}: {what}")


def load_checkpoint(workdir: str, step: int | None):
    """(step, params, validated config) from WORKDIR, or EvalError."""
    from osp_jax.checkpoint import CheckpointError, restore_params_only

    check_workdir(workdir)
    try:
        found, params, cfg = restore_params_only(workdir, step=step)
    except CheckpointError as e:
        raise EvalError(f"--workdir={workdir}: {e}") from None
    if cfg is None:
        config = scoring.run_config(workdir, error=EvalError)
        if config is None:
            raise EvalError(f"checkpoint step {found} in {workdir} has no config, and there is no "
                            f"{epath.Path(workdir) / 'config.json'}")
        return found, params, config
    try:
        config = config_lib.from_dict(cfg)
    except config_lib.ConfigError as e:
        raise EvalError(f"the config saved in {workdir} is not valid: {e}") from None
    return found, params, config


def _check_model(model_cfg, bits: quant_lib.Bits) -> None:
    """EvalError where the quantisers cannot take the model at --bits (one check, the lm-eval backend's too)."""
    scoring.check_bits(model_cfg, bits, f"--bits={bits.w},{bits.a},{bits.kv}", EvalError)


def _check_flags(bits, hadamard, method: str, counts: dict) -> tuple[quant_lib.Bits, bool, bool]:
    """(bits, FFN Hadamard?, calibrated method?) of evaluate's arguments; EvalError naming a bad one."""
    if isinstance(bits, str):
        try:
            bits = quant_lib.parse_bits(bits)
        except ValueError as e:
            raise EvalError(str(e)) from None
    if hadamard not in (None, "none", "ffn"):
        raise EvalError(f"--hadamard={hadamard!r}: expected 'ffn' or 'none'")
    for name, value in counts.items():
        if value is not None and value < 1:
            raise EvalError(f"{name}={value}: expected a positive integer")
    try:
        calibrated = ptq.needs_calibration(method)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return bits, hadamard == "ffn", calibrated


def evaluate(workdir: str, data: str, *, step: int | None = None, bits: quant_lib.Bits | str = "4,4,4",
             hadamard: str | None = None, clip_search: bool = False, max_tokens: int | None = None,
             batch_size: int = 8, seq_len: int | None = None, method: str = "rtn", calib_samples: int = 128,
             calib_data: str | None = None, act_order: bool = False) -> dict:
    """All numbers of one evaluation, as the JSON the CLI writes. `method` is osp_jax.ptq's; GPTQ's
    calibration is `calib_samples` sequences of `calib_data` (default: the run's data.path)."""
    bits, hadamard_ffn, calibrated = _check_flags(bits, hadamard, method, {
        "--batch-size": batch_size, "--seq-len": seq_len, "--max-tokens": max_tokens, "--calib-samples": calib_samples})
    check_workdir(workdir)
    saved = scoring.run_config(workdir, error=EvalError)  # train's config.json: what the model is, unread
    if saved is not None:
        _check_model(saved.model, bits)
    if calibrated:  # before the checkpoint is read: a missing calibration set is found at once
        calib_data = calibration_source(workdir, calib_data, method)
        check_calibration(calib_data, method)

    found, params, config = load_checkpoint(workdir, step)
    _check_model(config.model, bits)  # the checkpoint's own config (a run without config.json)
    seq_len = seq_len or config.train.seq_len
    batches = load_batches(data, workdir, vocab_size=config.model.vocab_size, seq_len=seq_len,
                           batch_size=batch_size, max_tokens=max_tokens)

    # Evaluation runs in float32 with the exact XLA attention, whatever the run trained with. The 16-bit
    # pass needs the whole logits (they come with the hidden states); with loss_chunk 0 the quantised
    # pass computes its loss from them the same way (and any --seq-len works).
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.dtype, model_cfg.param_dtype, model_cfg.attention, model_cfg.remat = "float32", "float32", "xla", "none"
    model_cfg.loss_chunk = 0
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # host copy, for folding
    pack_mask = bool(config.data.pack_mask)

    as_json = lambda c: json.dumps(c.to_dict(), sort_keys=True)
    with jax.default_matmul_precision("float32"):
        fp = _run(_stats_fn(as_json(model_cfg), None, pack_mask, True), jax.device_put(params), batches,
                  "16-bit pass")

        calibration = calibration_batches(calib_data, workdir, vocab_size=config.model.vocab_size, seq_len=seq_len,
                                          samples=calib_samples, batch_size=batch_size) if calibrated else None
        t0 = time.perf_counter()
        q = ptq.quantize_model(params, model_cfg, bits, method=method, hadamard_ffn=hadamard_ffn,
                               clip_search=clip_search, calibration=calibration, act_order=act_order,
                               pack_mask=pack_mask)
        quantize_s = time.perf_counter() - t0
        qt = _run(_stats_fn(as_json(q.model_config), q.spec, pack_mask, False), jax.device_put(q.params), batches,
                  f"{bits} pass")

    return {
        "step": int(found),
        "workdir": storage.normalized(workdir),
        "data": data,
        "bits": {"w": bits.w, "a": bits.a, "kv": bits.kv},
        "setting": str(bits),
        "hadamard": "ffn" if q.spec.hadamard_ffn else None,
        "clip_search": bool(clip_search),
        "method": method,
        "calibration": {"data": calib_data, "samples": int(sum((b["segment_ids"] > 0).any(1).sum()
                                                              for b in calibration)),
                        "seq_len": int(seq_len), "act_order": bool(act_order)} if calibrated else None,
        "quantize_s": round(quantize_s, 3),  # preparing the quantised model (folding, rotation, GPTQ), seconds
        "seq_len": int(seq_len),
        **_statistics(fp, qt),
    }


def _statistics(fp: dict, qt: dict) -> dict:
    """The record's numbers from the sums of the 16-bit pass `fp` and the quantised pass `qt`."""
    tokens = float(fp["tokens"])
    kurt = fp["kurtosis_sum"] / max(tokens, 1.0)
    return {
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


def _write_json(path: str, record: dict) -> None:
    """Strict JSON (`cli.write_json`: a NaN loss, an overflowing perplexity are written as null), into a
    folder made if missing."""
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    cli.write_json(path, record)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training run directory (checkpoints/, tokenizer.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data", default=None, help="prepared data directory, 'builtin', or a .jsonl/.txt file")
    # Benchmark tasks through lm-evaluation-harness (osp_jax.benchmark_tasks), instead of --data.
    tasks = p.add_argument_group("benchmark tasks (lm-evaluation-harness; pip install 'osp_jax[eval]')")
    tasks.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, scored at 16-16-16 and at --bits")
    tasks.add_argument("--suite", default=None, choices=("paper",),
                       help="paper: the paper's ten benchmarks at 16-16-16, 4-4-4, 4-4-4 +FFN Had (ignores --bits)")
    tasks.add_argument("--include-path", default=None, help="a folder of more lm-eval task YAMLs")
    tasks.add_argument("--limit", type=int, default=None, help="at most N documents a task (a quick look)")
    p.add_argument("--bits", default="4,4,4", help="W,A,KV bit widths in 2..16; 16 = not quantised (default 4,4,4)")
    p.add_argument("--hadamard", choices=("none", "ffn"), default="none", help="online Hadamard rotation")
    p.add_argument("--clip-search", action="store_true", help="per-channel MSE search of weight clip ratios")
    # Post-training quantisation method (osp_jax.ptq) and GPTQ's calibration.
    p.add_argument("--method", default="rtn", help="rtn (default), gptq, quarot or quarot+gptq (osp_jax.ptq)")
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration sequences (default 128)")
    p.add_argument("--calib-data", default=None,
                   help="GPTQ calibration data: prepared directory (its train split), 'builtin', or a .jsonl/.txt "
                        "file (default: the run's data.path)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantise columns in decreasing Hessian order")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw per-layer kurtosis and max |activation| to this PNG")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's train.seq_len)")
    p.add_argument("--compilation-cache-dir", default=compilation_cache.default_dir(),
                   help="JAX's persistent compilation cache, local or gs:// ('' = off; default %(default)s)")
    return p


# A user's mistake, one line and exit 2; ValueError is not here: one the checks above did not turn into
# an EvalError is a bug, with its traceback.
USER_ERRORS = {EvalError: "error", DataError: "error", FileNotFoundError: "error", config_lib.ConfigError: "error",
               cli.UserError: "error"}  # UserError: --compilation-cache-dir that cannot be used


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = _parser().parse_args(argv)
    return cli.guarded(PROG, lambda: _dispatch(args), USER_ERRORS)


def _dispatch(args: argparse.Namespace) -> None:
    """Perplexity on --data, or benchmark tasks (--tasks / --suite)."""
    tasks = args.tasks is not None or args.suite is not None
    if tasks and (args.data is not None or args.plot is not None):
        raise EvalError("--data and --plot belong to the perplexity pass: run --tasks / --suite without them")
    if not tasks and args.data is None:
        raise EvalError("--data=DIR|builtin|FILE is required (or --tasks / --suite for benchmark tasks)")
    _check_paths(args)
    return _main_tasks(args) if tasks else _main(args)


PATH_FLAGS = ("workdir", "data", "calib_data", "include_path", "output", "plot")


def _check_paths(args: argparse.Namespace) -> None:
    """Every path flag with `~` expanded (a shell leaves `--data=~/x` alone), then what is written checked before
    any work: --output and --plot files that can be written (gs:// ones asked of the storage), a --plot format
    matplotlib draws; and the run's directory there."""
    for name in PATH_FLAGS:
        if getattr(args, name):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    storage.check_all(reads={"--workdir": args.workdir, "--data": args.data},
                      writes={"--output": args.output, "--plot": args.plot}, files=("--output", "--plot"))
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path:
            cli.check_output_file(path, flag)
    if args.plot:
        check_plot_format(args.plot)
    check_workdir(args.workdir)


def _main(args: argparse.Namespace) -> None:
    compilation_cache.enable(args.compilation_cache_dir)
    result = evaluate(args.workdir, args.data, step=args.step, bits=args.bits, hadamard=args.hadamard,
                      clip_search=args.clip_search, max_tokens=args.max_tokens, batch_size=args.batch_size,
                      seq_len=args.seq_len, method=args.method, calib_samples=args.calib_samples,
                      calib_data=args.calib_data, act_order=args.act_order)
    # --bits, --method and the calibration data are checked first, before the (slow) checkpoint load
    print(format_table(result), flush=True)
    if args.output:
        _write_json(args.output, result)
        print(f"wrote {args.output}", flush=True)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}", flush=True)


def _task_calibration(args: argparse.Namespace):
    """GPTQ's calibration for --tasks: checked now (before lm-eval starts or a checkpoint is read), read when the
    backend builds the model (a function of the run's config), as the perplexity pass reads it; None for rtn/quarot."""
    try:
        if not ptq.needs_calibration(args.method):
            return None
    except ValueError as e:
        raise EvalError(str(e)) from None
    source = calibration_source(args.workdir, args.calib_data, args.method)
    check_calibration(source, args.method)
    return lambda config: calibration_batches(source, args.workdir, vocab_size=config.model.vocab_size,
                                              seq_len=args.seq_len or config.train.seq_len,
                                              samples=args.calib_samples, batch_size=args.batch_size)


def _main_tasks(args: argparse.Namespace) -> None:
    """--tasks / --suite: osp_jax.benchmark_tasks, its user errors as EvalError."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("--tasks / --suite need lm-evaluation-harness: pip install 'osp_jax[eval]'")
    from osp_jax import benchmark_tasks

    try:
        record = benchmark_tasks.evaluate_tasks(
            args.workdir, tasks=args.tasks, suite=args.suite, bits=args.bits, hadamard=args.hadamard,
            method=args.method, clip_search=args.clip_search, step=args.step, include_path=args.include_path,
            batch_size=args.batch_size, max_length=args.seq_len, limit=args.limit, calibration=_task_calibration(args))
    except cli.UserError as e:
        raise EvalError(str(e)) from None
    print(benchmark_tasks.format_table(record), flush=True)
    if args.output:
        _write_json(args.output, record)
        print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
