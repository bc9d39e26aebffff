"""The Grain input pipeline: prepared ArrayRecord shards -> packed, batched numpy token windows.

    ArrayRecordDataSource(split shards)
      -> [process_index::process_count]   every data shard reads a disjoint set of documents (a shard is
                                          a process, or the processes a tp group spans, which hold the
                                          same rows: sharding.data_shard)
      -> shuffle(seed) -> repeat(epochs)  documents reshuffled each epoch (grain folds the epoch in)
      -> decode                           uint16/uint32 bytes -> token ids (EOS already at each end)
      -> PackedWindows(seq_len + 1)       concat-and-chunk: no token lost or repeated
      -> batch(global // process_count)   padded to full size at the very end of a finite run
      -> prefetch                         worker processes (worker_count > 0) or one thread

Each batch is a dict of int32 numpy arrays of shape (B, seq_len):
    inputs = window[:-1], targets = window[1:],
    segment_ids: 1, 2, ... per document piece inside the window (0 = padding: no loss, no attention),
    positions:   0, 1, ... restarting at every document start and at the window start.
So `segment_ids > 0` is the loss mask, and attention may stay within `segment_ids` equality.

Windows do not overlap: each token is an input (or the last target) of exactly one window. With
num_epochs=None the token stream runs on across epochs, so a window may hold the end of one epoch and
the start of the next and nothing is dropped; with a finite num_epochs the last window is padded
(segment_ids 0), and so is the last batch. `iterator.get_state()` / `set_state()` restore the exact
position: the parent's state before the current document plus the offset inside it.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import os
import sys
import weakref
from typing import Any

import grain
import numpy as np
from etils import epath

from osp_jax import cli, storage
from osp_jax.data import shards as shards_lib
from osp_jax.data import sources
from osp_jax.data import tokenizer as tokenizer_lib
# Raw text files, tokenised for evaluate: they moved to tokenizer.py; these names stay importable here.
from osp_jax.data.tokenizer import iter_text_file_tokens, text_file_documents, text_file_tokens  # noqa: F401


class PipelineError(sources.DataError, ValueError):
    """Prepared data or a saved iterator state this pipeline cannot use. A DataError and a ValueError,
    so both train and evaluate report it without a traceback."""


BUILTIN = "builtin"
_BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")
FIELDS = ("inputs", "targets", "segment_ids", "positions")


# ----------------------------------------------------------------------------------------------------
# Data directories


def builtin_files() -> tuple[str, str]:
    """Paths of the shipped corpus (.jsonl.xz) and tokenizer (tokenizer.json)."""
    corpus = os.path.join(_BUILTIN_DIR, "corpus.jsonl.xz")
    tok = os.path.join(_BUILTIN_DIR, "tokenizer.json")
    for p in (corpus, tok):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"the built-in data file {p} is missing: is osp_jax installed with its "
                                    "package data (setup.py package_data)?")
    return corpus, tok


def _cache_root() -> str:
    return os.environ.get("OSP_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "osp_jax")


def resolve_data_dir(path: str) -> str:
    """A prepared data directory. "builtin" prepares the shipped corpus once (into $OSP_JAX_CACHE or
    ~/.cache/osp_jax/builtin-<hash of corpus, tokenizer and format>) and returns that directory."""
    from osp_jax.data import prepare as prepare_lib

    if path == BUILTIN:
        corpus, tok = builtin_files()
        h = hashlib.sha256()
        for p in (corpus, tok):
            h.update(tokenizer_lib.file_sha256(p).encode())
        h.update(f"{prepare_lib.FORMAT}-v{prepare_lib.FORMAT_VERSION}".encode())
        out = os.path.join(_cache_root(), f"builtin-{h.hexdigest()[:16]}")
        if not os.path.isfile(os.path.join(out, "metadata.json")):
            print(f"osp_jax: preparing the built-in corpus into {out} (once)", file=sys.stderr, flush=True)
            try:
                prepare_lib.prepare([corpus], out, tok, val_fraction=0.0, quiet=True)
            except OSError as e:  # read-only, not a directory, full: one line for train and evaluate alike
                where = f" ({e.filename})" if e.filename and str(e.filename) != out else ""
                why = str(e) if isinstance(e, prepare_lib.OutputNotWritable) else (e.strerror or str(e))
                raise PipelineError(f"cannot write the built-in data cache {out}{where}: {why}; set "
                                    "OSP_JAX_CACHE to a writable directory") from None
        return out
    out = storage.normalized(path)
    if not storage.is_file(epath.Path(out) / "metadata.json"):
        why = "does not exist" if not storage.exists(out) else "has no metadata.json"
        raise FileNotFoundError(f"data directory {path!r} {why}: expected a directory written by "
                                "`python -m osp_jax.data.prepare`, or 'builtin'")
    return out


def load_metadata(data_dir: str) -> dict:
    """metadata.json of a prepared directory (see osp_jax.data.prepare)."""
    p = epath.Path(data_dir) / "metadata.json"
    if not storage.is_file(p):
        raise FileNotFoundError(f"{data_dir} has no metadata.json: not a directory written by "
                                "`python -m osp_jax.data.prepare` (or it is still being written)")
    meta = cli.read_json(p, "metadata", error=PipelineError)
    for k in ("vocab_size", "eos_id", "dtype", "splits"):
        if k not in meta:
            raise ValueError(f"{p} lacks the key {k!r}: written by an incompatible prepare version?")
    return meta


def check_vocab(metadata: dict, vocab_size: int) -> str | None:
    """Raises when the data holds ids the model cannot embed; returns a note when the model is larger."""
    data_vocab = int(metadata["vocab_size"])
    if data_vocab > vocab_size:
        raise ValueError(f"the data's tokenizer has vocabulary {data_vocab} but the model's vocab_size is "
                         f"{vocab_size}: set model.vocab_size >= {data_vocab} (or prepare the data with a "
                         "smaller tokenizer)")
    if data_vocab < vocab_size:
        return (f"data vocabulary {data_vocab} < model vocab_size {vocab_size}: the last "
                f"{vocab_size - data_vocab} embedding rows are never trained on")
    return None


# ----------------------------------------------------------------------------------------------------
# Packing
#
# Why not Grain's own packers (grain 0.2.18, checked 2026-12):
# - `experimental.FirstFitPackIterDataset` pads bins instead of splitting documents, and refuses one
#   longer than a window ("must be truncated to max length"): tokens would be lost, not packed.
# - `experimental.ConcatThenSplitIterDataset({"tokens": seq_len + 1})` cuts the same windows with the
#   same segment ids and positions; only the end of finite data differs (it pads with 0, not pad_id,
#   and keeps the last real input whose target is padding), which a map could fix. Its state does not
#   survive the JSON our checkpoints store it as: a state saved where a window ends exactly at a
#   document's end holds `remainder_slices: {"tokens": (-1, -1)}`, JSON gives back the list
#   [-1, -1], grain tests `!= (-1, -1)` (a tuple), takes the list for a remainder and slices the next
#   document to [-1:-1]: the restored iterator skips data (5 documents, windows of 5: the restored
#   iterator yields [] where [[8, 0, 9, 0, 0]] remained). It also restores by re-reading the last
#   window's documents, and its state layout differs from the {"parent", "offset"} that checkpoints
#   saved so far hold. So the packing below stays: its state is the parent's state before the current
#   document and the offset inside it, plain JSON that restores without replay.


class _PackedWindowsIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len: int, pad_id: int, drop_remainder: bool = False):
        super().__init__(parent)
        self._w = seq_len + 1
        self._pad = pad_id
        self._drop_remainder = drop_remainder
        self._arange = np.arange(self._w, dtype=np.int32)
        self._doc = None          # the document being consumed
        self._off = 0             # how many of its tokens were already emitted
        self._doc_state = None    # the parent's state just before that document

    def _fetch(self) -> bool:
        state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            self._doc = None
            return False
        self._doc, self._off, self._doc_state = doc, 0, state
        return True

    def __next__(self):
        w = self._w
        buf = np.empty(w, np.int32)
        seg = np.zeros(w, np.int32)
        pos = np.zeros(w, np.int32)
        filled, sid = 0, 0
        while filled < w:
            if self._doc is None or self._off >= len(self._doc):
                if not self._fetch():
                    break
                continue
            take = min(w - filled, len(self._doc) - self._off)
            buf[filled:filled + take] = self._doc[self._off:self._off + take]
            sid += 1
            seg[filled:filled + take] = sid
            pos[filled:filled + take] = self._arange[:take]
            filled += take
            self._off += take
        if filled == 0 or (filled < w and self._drop_remainder):
            raise StopIteration
        seg_in = seg[:-1]
        if filled < w:  # the end of a finite run: pad, and mask the inputs whose target is padding
            buf[filled:] = self._pad
            seg_in = seg_in.copy()
            seg_in[filled - 1:] = 0
        return {"inputs": buf[:-1], "targets": buf[1:], "segment_ids": seg_in, "positions": pos[:-1]}

    def get_state(self) -> dict[str, Any]:
        if self._doc is not None and self._off < len(self._doc):
            return {"parent": self._doc_state, "offset": self._off}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._off, self._doc_state = None, 0, None
        offset = int(state["offset"])
        if offset:
            if not self._fetch():
                raise ValueError("iterator state points past the end of the data")
            self._off = offset

    def __str__(self) -> str:
        return f"PackedWindowsIterator(window={self._w})"


class PackedWindows(grain.IterDataset):
    """Concatenates 1-D token arrays and cuts the stream into windows of seq_len + 1 (see module doc).
    At the end of finite data the last window is padded, or, with `drop_remainder`, dropped."""

    def __init__(self, parent, seq_len: int, pad_id: int = 0, drop_remainder: bool = False):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: expected a positive integer")
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._drop_remainder = drop_remainder

    def __iter__(self):
        return _PackedWindowsIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._drop_remainder)

    def __str__(self) -> str:
        return f"PackedWindows(seq_len={self._seq_len})"


def batched_windows(documents, *, seq_len: int, batch_size: int, pad_id: int, finite: bool = True,
                    drop_remainder: bool = False) -> grain.IterDataset:
    """Documents (1-D token arrays, EOS at each end: a grain.IterDataset, or a sequence held in memory)
    -> PackedWindows -> batches of `batch_size`; with `finite` data the last batch is padded to full size
    (segment ids 0), and with `drop_remainder` a last window the data cannot fill is dropped."""
    if not isinstance(documents, grain.IterDataset):  # in memory: reading threads would only contend
        documents = grain.MapDataset.source(list(documents)).to_iter_dataset(grain.ReadOptions(num_threads=0))
    ds = PackedWindows(documents, seq_len, pad_id, drop_remainder=drop_remainder)
    ds = ds.batch(batch_size, drop_remainder=False)
    if finite:
        ds = ds.map(functools.partial(_pad_batch, batch_size=batch_size, pad_id=pad_id))
    return ds


def _decode(record: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(record, dtype=np.dtype(dtype).newbyteorder("<"))


def _pad_batch(batch: dict, batch_size: int, pad_id: int) -> dict:
    n = batch["inputs"].shape[0]
    if n == batch_size:
        return batch
    out = {}
    for k, v in batch.items():
        fill = pad_id if k in ("inputs", "targets") else 0
        pad = np.full((batch_size - n,) + v.shape[1:], fill, v.dtype)
        out[k] = np.concatenate([v, pad], axis=0)
    return out


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the number of "
                         f"processes {process_count}")
    return global_batch_size // process_count


def make_dataset(data_dir: str, split: str, *, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                 num_epochs: int | None = None, worker_count: int = 0, prefetch_buffer: int = 2,
                 read_threads: int = 2):
    """The pipeline for one split of a prepared directory, as a grain.IterDataset of batch dicts.

    Training: defaults (shuffled, endless). Validation: split="validation", shuffle=False, num_epochs=1.
    Each process yields global_batch_size // process_count windows a batch from its own documents.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}: expected a positive integer or None (endless)")
    batch_size = local_batch_size(global_batch_size, process_count)
    data_dir = resolve_data_dir(data_dir)
    meta = load_metadata(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in {data_dir} (has {sorted(meta['splits'])})")
    info = meta["splits"][split]
    if not info["documents"]:
        raise ValueError(f"split {split!r} of {data_dir} has no documents")
    if info["documents"] < process_count:
        raise ValueError(f"split {split!r} of {data_dir} has {info['documents']} documents, fewer than "
                         f"the {process_count} processes reading it")
    pad_id = meta.get("pad_id")
    pad_id = int(meta["eos_id"] if pad_id is None else pad_id)

    ds = grain.MapDataset.source(_open_shards(data_dir, split, info))
    ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(_decode, dtype=meta["dtype"]))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    ds = batched_windows(ds, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id, finite=num_epochs is not None)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=max(prefetch_buffer, 1)))
    elif prefetch_buffer > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_buffer)
    return ds


def _open_shards(data_dir: str, split: str, info: dict):
    """The split's ArrayRecordDataSource. A shard that is missing, of another size than metadata.json
    records, unreadable, or holding another number of records raises PipelineError naming the directory."""
    def damaged(what: str) -> PipelineError:
        return PipelineError(f"{data_dir}: {what}. The prepared data is damaged or incomplete: run "
                             f"`python -m osp_jax.data.prepare` again with --output={data_dir} and --force "
                             "(for the 'builtin' cache, delete the directory)")

    paths = [os.fspath(epath.Path(data_dir) / s["file"]) for s in info["shards"]]
    for p, s in zip(paths, info["shards"]):
        if why := shards_lib.size_problem(p, s):
            raise damaged(why)
    try:
        source = grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError as e:  # array_record's errors, some without text
        reason = str(e) or "array_record gave no reason"
        raise damaged(f"cannot read the {split} shards: {reason}") from None
    if len(source) != info["documents"]:
        raise damaged(f"the {split} shards hold {len(source)} records, metadata.json says "
                      f"{info['documents']}")
    return source


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; a program without absl.app has not parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(data_dir: str, split: str, *, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None, shuffle: bool = True,
                  num_epochs: int | None = None, worker_count: int = 0, prefetch_buffer: int = 2,
                  read_threads: int = 2):
    """`iter(make_dataset(...))`: a grain DatasetIterator with get_state()/set_state(), whose state also
    records worker_count (see _WorkerCountIterator). Call its close() when done; one left open is
    closed at interpreter exit."""
    it = _WorkerCountIterator(
        iter(make_dataset(data_dir, split, seq_len=seq_len, global_batch_size=global_batch_size,
                          seed=seed, process_index=process_index, process_count=process_count,
                          shuffle=shuffle, num_epochs=num_epochs, worker_count=worker_count,
                          prefetch_buffer=prefetch_buffer, read_threads=read_threads)),
        worker_count)
    # Closed before interpreter teardown: grain's prefetch thread otherwise complains from __del__.
    atexit.register(_close_at_exit, weakref.ref(it))
    return it


class _WorkerCountIterator(grain.DatasetIterator):
    """Adds "worker_count" to the state. The state's layout depends on it (grain's worker processes each
    hold a slice of the data), so set_state() of a state saved with another data.worker_count raises
    PipelineError naming both. A state without the field (saved before it was recorded) is checked by
    its layout where that tells, and restored as is otherwise."""

    def __init__(self, parent, worker_count: int):
        super().__init__(parent)
        self._worker_count = int(worker_count)

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {**self._parent.get_state(), "worker_count": self._worker_count}

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("worker_count", None)
        if saved is None:
            saved = _layout_worker_count(state)
        if saved is not None and int(saved) != self._worker_count:
            raise PipelineError(f"the saved data-iterator state was written with data.worker_count={saved}, "
                                f"but this run has data.worker_count={self._worker_count}: resume with "
                                f"--config.data.worker_count={saved} (grain cannot map a position between "
                                "worker counts)")
        self._parent.set_state(state)


def _layout_worker_count(state: dict) -> int | None:
    """The worker count a state without the "worker_count" field was saved with, read from grain's
    layout: a list of per-worker states with worker processes, this module's packing state without."""
    if "iterators_in_use_states" in state:
        return len(state["iterators_in_use_states"])
    if {"parent", "offset"} <= state.keys():
        return 0
    return None


def _close_at_exit(ref) -> None:
    it = ref()
    if it is not None:
        try:
            it.close()
            # grain's thread-prefetch close() (the wrapped iterator's, with prefetch in this process)
            # is not idempotent once module globals are torn down.
            it.close = it._parent.close = _noop
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _noop() -> None:
    pass
