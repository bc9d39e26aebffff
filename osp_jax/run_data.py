"""The data a training run reads: its training streams, one finite validation pass, and what identifies the data.

`make_data(config, mesh)` opens this process's part of both. The training input is `data.streams.DataStreams`,
whose position a checkpoint saves and a resume puts back on any layout of processes; `data_identity` says what
that position belongs to (train.seed, data.path, the content its metadata.json records), saved with every
checkpoint so that a resume never applies it to other data (osp_jax.checkpoint.iterator_state). Validation is
one pass over the split, never wrapped: at most train.eval_batches batches, the last one padded and masked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging

import jax
import numpy as np

from osp_jax import sharding

log = logging.getLogger("osp_jax")


class DataError(ValueError):
    """The data cannot feed this run: missing, unreadable, or tokenised for another vocabulary or
    tokenizer. Found before anything is written to the workdir."""


def make_data(config, mesh):
    """(training iterator, validation batches as host numpy, data dir or None): this process's data shard of
    `mesh` (sharding.data_shard; without a mesh, its own process's). No validation batches when the run
    evaluates nothing (train.eval_every and train.outlier_every 0): the data then needs no validation split."""
    from osp_jax.data import pipeline

    t, d = config.train, config.data
    # Processes whose devices hold the same batch rows (a tp group across hosts) read the same data.
    shard, shards = sharding.data_shard(mesh) if mesh is not None else (jax.process_index(), jax.process_count())
    feed = dict(process_index=shard, process_count=shards)
    if d.source == "seqio":
        from osp_jax.data.seqio_source import make_seqio_iterator
        train_iter = make_seqio_iterator(d.seqio_task, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                         seed=t.seed, split="train", vocab_size=config.model.vocab_size, **feed)
        if not evaluates(t):
            return train_iter, [], None
        val_iter = make_seqio_iterator(d.seqio_task, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                       seed=t.seed, split="validation", **feed)
        return train_iter, list(itertools.islice(val_iter, t.eval_batches)), None
    data_dir = pipeline.resolve_data_dir(d.path)
    meta = pipeline.load_metadata(data_dir)
    note = pipeline.check_vocab(meta, config.model.vocab_size)
    if note:
        log.info("%s", note)
    log_epochs(t.steps * t.global_batch_size * t.seq_len, int(meta["splits"]["train"]["tokens"]), d.path)
    val_batches = validation_batches(config, data_dir, meta, feed) if evaluates(t) else []
    return train_streams(config, data_dir, shard, shards), val_batches, data_dir


def train_streams(config, data_dir: str, shard: int, shards: int):
    """Data shard `shard` of `shards`'s training batches, as `data.streams.DataStreams` (one stream a data
    shard for a fresh run; a resume keeps the count its checkpoint saved)."""
    from osp_jax.data import pipeline
    from osp_jax.data.streams import DataStreams

    t, d = config.train, config.data

    def open_stream(stream: int, stream_count: int, global_batch_size: int):
        return pipeline.make_iterator(data_dir, "train", seq_len=t.seq_len, global_batch_size=global_batch_size,
                                      seed=t.seed, worker_count=d.worker_count, prefetch_buffer=d.prefetch,
                                      process_index=stream, process_count=stream_count)

    return DataStreams(open_stream, shard=shard, shards=shards, global_batch_size=t.global_batch_size)


def evaluates(t) -> bool:
    """Whether a run reads validation data: for its loss (train.eval_every) or for the outlier statistics,
    measured on the first validation batch (train.outlier_every)."""
    return bool(t.eval_every or t.outlier_every)


def validation_batches(config, data_dir: str, meta: dict, feed: dict) -> list:
    """One pass over the validation split of train.eval_data (else of data.path), this process's documents:
    at most train.eval_batches batches, fewer where the split ends first (its last batch padded, segment ids 0),
    with a warning giving the split's size. train.eval_data must share data.path's tokenizer."""
    from osp_jax.data import pipeline

    t = config.train
    val_dir, val_meta, key = data_dir, meta, f"data.path={config.data.path}"
    if t.eval_data:
        key = f"train.eval_data={t.eval_data}"
        val_dir = pipeline.resolve_data_dir(t.eval_data)
        val_meta = pipeline.load_metadata(val_dir)
        try:
            pipeline.check_vocab(val_meta, config.model.vocab_size)
            check_same_tokenizer(val_dir, val_meta, data_dir, meta)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    split = val_meta["splits"].get("validation") or {}
    if not split.get("documents"):
        raise DataError(f"{key}: {val_dir} has no validation documents (prepared with --val-fraction=0?), but "
                        f"train.eval_every={t.eval_every} and train.outlier_every={t.outlier_every} read them: set "
                        "both to 0, or set train.eval_data to prepared data with a validation split")
    it = pipeline.make_iterator(val_dir, "validation", seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                                seed=t.seed, shuffle=False, num_epochs=1, prefetch_buffer=0, **feed)
    try:
        batches = list(itertools.islice(it, t.eval_batches))
    finally:
        it.close()
    if len(batches) < t.eval_batches:
        log.warning("train.eval_batches=%d, but the validation split of %s (%d documents, %s tokens) fills only %d "
                    "batch(es) of %d x %d here: each validation pass reads those, every token once", t.eval_batches,
                    key, split["documents"], f"{int(split['tokens']):,}", len(batches), t.global_batch_size,
                    t.seq_len)
    return batches


def same_batch_count(batches: list, local_rows: int, seq_len: int) -> list:
    """`batches` made as many on every process as on the one with most, with batches of padding (segment ids
    0: no token counts): every global validation batch needs each process's part. Collective."""
    if jax.process_count() == 1:
        return batches
    from jax.experimental import multihost_utils

    most = int(np.max(multihost_utils.process_allgather(np.asarray([len(batches)], np.int32))))
    empty = {k: np.zeros((local_rows, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    return batches + [empty] * (most - len(batches))


def check_same_tokenizer(val_dir: str, val_meta: dict, data_dir: str, meta: dict) -> None:
    """Raises ValueError if the data in `val_dir` was tokenised with another tokenizer (sha256) than `data_dir`'s."""
    from osp_jax.data.tokenizer import data_tokenizer_sha256

    theirs, their_file = data_tokenizer_sha256(val_dir, val_meta)
    ours, our_file = data_tokenizer_sha256(data_dir, meta)
    if theirs and ours and theirs != ours:
        raise ValueError(f"it was tokenised with {their_file} (sha256 {theirs[:12]}...), not with data.path's "
                         f"{our_file} (sha256 {ours[:12]}...): its ids mean other tokens; prepare it with data.path's "
                         "tokenizer")


def data_identity(config, data_dir: str | None) -> dict | None:
    """What a saved data position belongs to: train.seed, data.path and, as "data.content", the tokenizer
    and the train split's shards that data.path's metadata.json records. None for a stream without position."""
    from osp_jax.data import pipeline

    if data_dir is None:
        return None
    meta = pipeline.load_metadata(data_dir)
    train = meta["splits"]["train"]
    shards = [[s.get("file"), s.get("documents"), s.get("tokens")] for s in train.get("shards", [])]
    content = {"tokenizer_sha256": meta.get("tokenizer_sha256"), "dtype": meta["dtype"],
               "train_documents": int(train["documents"]), "train_tokens": int(train["tokens"]),
               # a digest, not the list: a large corpus has thousands of shards, and meta is saved every step
               "train_shards_sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest()}
    return {"train.seed": int(config.train.seed), "data.path": str(config.data.path), "data.content": content}


def log_epochs(run_tokens: int, split_tokens: int, path: str) -> float:
    """Says how many passes over the training split the run makes; warns past one, where held-out
    loss and quantisation cost measure memorisation too (docs/ablation.md, the epochs sections)."""
    epochs = run_tokens / max(split_tokens, 1)
    if epochs > 1:
        log.warning("this run is %.2f epochs of %s's training split (%s tokens): documents repeat, so "
                    "held-out loss and 4-bit cost measure memorisation as well as learning", epochs, path,
                    f"{split_tokens:,}")
    else:
        log.info("this run is %.3f epoch of %s's training split (%s tokens)", epochs, path, f"{split_tokens:,}")
    return epochs
