"""The batches `python -m osp_jax.evaluate` scores and GPTQ calibrates on, as host arrays.

Each batch is {inputs, targets, segment_ids, positions}, plus `weights` (1 = a scored token) for evaluation:
- a .jsonl/.txt file (or glob) is tokenised with the run's tokenizer into one EOS-separated stream cut into
  windows of seq_len + 1, as training packs it;
- a prepared directory (or "builtin") is read through the data pipeline, its tokenizer checked against the
  run's first.
Every problem the user can fix is an `EvalError` (osp_jax.evaluate reports it in one line, exit 2).
"""
from __future__ import annotations

import numpy as np
from etils import epath

from osp_jax import cli, storage

PROG = "osp_jax.evaluate"
TEXT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".txt.gz", ".txt.xz", ".txt.zst")


class EvalError(ValueError):
    """A user error (bad flag, missing checkpoint, too little data): reported in one line, no traceback."""


def text_batches(path: str, workdir: str, vocab_size: int, seq_len: int, batch_size: int):
    from osp_jax.data import pipeline, tokenizer as tokenizer_lib

    if not storage.glob(path):
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
    docs = pipeline.text_file_documents(path, tok)
    tokens = sum(len(d) for d in docs)
    if tokens < seq_len + 1:
        raise EvalError(f"{path} has {tokens} tokens, fewer than one sequence: --seq-len={seq_len} "
                        f"needs at least {seq_len + 1}")
    # One EOS-separated stream in windows of seq_len + 1, as training packs it; the tail that does not
    # fill a window is not scored.
    pad_id = tok.eos_id if tok.pad_id is None else tok.pad_id
    return iter(pipeline.batched_windows(docs, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id,
                                         drop_remainder=True))


def _warn(msg: str) -> None:
    cli.say(PROG, f"warning: {msg}")


def check_tokenizer(data: str, data_dir: str, meta: dict, workdir: str) -> None:
    """EvalError when the prepared data was tokenised with another tokenizer than the run's (its ids
    would name other tokens); a warning when either side does not say which tokenizer it used."""
    from osp_jax.data.tokenizer import data_tokenizer_sha256, run_tokenizer_sha256

    data_sha, data_tok = data_tokenizer_sha256(data_dir, meta)
    try:
        run_sha, run_tok = run_tokenizer_sha256(workdir)
    except ValueError as e:
        raise EvalError(str(e)) from None
    run_tok = run_tok or f"(recorded in {epath.Path(workdir) / 'data_metadata.json'})"
    if data_sha is None or run_sha is None:
        unknown = f"{data_dir} names no tokenizer" if data_sha is None else f"{workdir} keeps no tokenizer"
        _warn(f"{unknown}: cannot check that --data={data} was tokenised with the run's tokenizer")
    elif data_sha != run_sha:
        raise EvalError(f"--data={data} was tokenised with {data_tok} (sha256 {data_sha[:16]}), not with the "
                        f"run's tokenizer {run_tok} (sha256 {run_sha[:16]}): prepare the data with the run's "
                        "tokenizer, or pass a .jsonl/.txt file")


def prepared_batches(data: str, workdir: str, vocab_size: int, seq_len: int, batch_size: int,
                      split_name: str = "validation", shuffle: bool = False):
    from osp_jax.data import pipeline

    try:  # the data layer's ValueErrors here are user errors (bad metadata, vocabulary too large)
        data_dir = pipeline.resolve_data_dir(data)
        meta = pipeline.load_metadata(data_dir)
        pipeline.check_vocab(meta, vocab_size)
    except ValueError as e:
        raise EvalError(f"--data={data}: {e}") from None
    check_tokenizer(data, data_dir, meta, workdir)
    split = meta["splits"].get(split_name) or {}
    tokens = int(split.get("tokens", 0))
    if tokens < seq_len + 1:
        raise EvalError(f"the {split_name} split of {data_dir} has {tokens} tokens, fewer than one sequence: "
                        f"--seq-len={seq_len} needs at least {seq_len + 1}")
    it = pipeline.make_iterator(data_dir, split_name, seq_len=seq_len, global_batch_size=batch_size, seed=0,
                                shuffle=shuffle, num_epochs=1)
    try:
        for batch in it:
            yield {k: np.asarray(v) for k, v in batch.items()}
    finally:
        it.close()


def is_text(data: str) -> bool:
    return storage.is_file(data) or data.endswith(TEXT_SUFFIXES)


def load_batches(data: str, workdir: str, *, vocab_size: int, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every evaluation batch, with `weights` (1 = a scored token), cut at `max_tokens` scored tokens."""
    source = (text_batches(data, workdir, vocab_size, seq_len, batch_size) if is_text(data)
              else prepared_batches(data, workdir, vocab_size, seq_len, batch_size))
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
# Calibration data for GPTQ (--method=gptq, quarot+gptq): sequences of the run's training data.


def calibration_source(workdir: str, calib_data: str | None, method: str) -> str:
    """--calib-data, else the run's data.path (read from WORKDIR/config.json, without loading a model)."""
    if calib_data:
        return calib_data
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise EvalError(f"--method={method} needs calibration data: pass --calib-data=DIR|FILE|builtin "
                        f"(the run's data.path is read from {path}, which does not exist)")
    data = cli.read_json(path, "config", error=EvalError).get("data") or {}
    if data.get("source", "grain") != "grain" or not data.get("path"):
        raise EvalError(f"--method={method} needs calibration data: the run's data (data.source="
                        f"{data.get('source')!r}, data.path={data.get('path')!r} in {path}) is not prepared data; "
                        "pass --calib-data=DIR|FILE|builtin")
    return str(data["path"])


def check_calibration(source: str, method: str) -> None:
    """EvalError unless `source` (a .jsonl/.txt file, a prepared directory with a train split, or
    'builtin') is there: checked before any checkpoint is read."""
    from osp_jax.data import pipeline

    what = f"--method={method} needs calibration data, and --calib-data={source}"
    if is_text(source):
        if not storage.glob(source):
            raise EvalError(f"{what} is no such file")
        return
    try:
        meta = pipeline.load_metadata(pipeline.resolve_data_dir(source))
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"{what} is not usable: {cli.one_line(e)}") from None
    if not int((meta["splits"].get("train") or {}).get("tokens", 0)):
        raise EvalError(f"{what} has no training split to calibrate on")


def calibration_batches(source: str, workdir: str, *, vocab_size: int, seq_len: int, samples: int,
                        batch_size: int) -> list[dict[str, np.ndarray]]:
    """`samples` windows of seq_len tokens: of a prepared directory's train split, shuffled (seed 0), or
    of a text file in order; in batches of `batch_size`, rows past `samples` marked as padding."""
    batch_size = min(batch_size, samples)
    it = (text_batches(source, workdir, vocab_size, seq_len, batch_size) if is_text(source)
          else prepared_batches(source, workdir, vocab_size, seq_len, batch_size, "train", shuffle=True))
    batches, rows = [], 0
    for batch in it:
        batch = {k: np.array(v) for k, v in batch.items()}
        real = np.flatnonzero((batch["segment_ids"] > 0).any(axis=1))
        batch["segment_ids"][real[samples - rows:]] = 0  # past `samples`: padding, counted nowhere
        rows += min(len(real), samples - rows)
        batches.append(batch)
        if rows >= samples:
            break
    if hasattr(it, "close"):
        it.close()
    if not rows:
        raise EvalError(f"--calib-data={source}: no sequences of {seq_len} tokens to calibrate on")
    if rows < samples:
        _warn(f"--calib-data={source} holds {rows} sequences of {seq_len} tokens, fewer than "
              f"--calib-samples={samples}: calibrating on {rows}")
    return batches


