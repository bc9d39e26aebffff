"""Text -> tokens -> ArrayRecord shards, ready for the Grain pipeline.

    python -m osp_jax.data.prepare --input='data/*.jsonl.zst' --output=DIR --tokenizer=tokenizer.json \
        [--val-fraction=0.02] [--text-field=text] [--workers=N]

Every document becomes one record: its token ids with EOS appended, as little-endian uint16 (vocab <=
65536) or uint32 bytes. Whole documents are held out for validation: a record's `split` field when it
has one ("train"/"validation"), else the split of a save_to_disk DatasetDict it comes from, else a hash
of the text against --val-fraction (so duplicates land on the same side). Output, in DIR:

    train-00000-of-000NN.array_record ...   validation-00000-of-000MM.array_record ...
    tokenizer.json (or tokenizer.model)      a copy of the tokenizer used (trained, with train:VOCAB)
    metadata.json                            written last: its presence means DIR is complete

Writing is atomic: shards are written under .tmp- names, fsynced and renamed; metadata.json goes last.
A second run with the same inputs (path, size, mtime), tokenizer and options prints "reusing" and
does nothing, unless a shard's size (metadata "file_bytes") or the tokenizer's hash no longer matches:
then it rebuilds, as --force does. Malformed records are skipped and counted in metadata["skipped"] by
reason.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from osp_jax.data import sources
from osp_jax.data.sources import DataError, Document, SkipLog
from osp_jax.data import tokenizer as tokenizer_lib

FORMAT = "osp_jax.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_MB = 256
_SHARD_RE = re.compile(r"^(train|validation)-\d{5}-of-\d{5}\.array_record$")
_TMP_PREFIX = ".tmp-"
# Documents (or characters) handed to the tokenizer at once: large enough to amortise the call.
_CHUNK_DOCS = 256
_CHUNK_CHARS = 4 << 20


def token_dtype(vocab_size: int) -> str:
    """The record dtype: uint16 holds every id when all ids are below vocab_size <= 65536."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic hold-out by content: the same text always falls on the same side."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Atomic files


def _fsync(path: str) -> None:
    """Flushes a file, or a directory's entries (so a rename into it survives a crash), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(directory: str, name: str) -> str:
    return os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-{name}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_name(os.path.dirname(path) or ".", os.path.basename(path))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


class _ShardWriter:
    """Writes one split's records into .tmp- shards, starting a new shard past `shard_bytes`."""

    def __init__(self, directory: str, split: str, shard_bytes: int):
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.shards: list[dict] = []  # {"tmp", "documents", "tokens", "bytes"}
        self._writer = None
        self.documents = 0
        self.tokens = 0

    def write(self, record: bytes, n_tokens: int) -> None:
        if self._writer is None or self.shards[-1]["bytes"] >= self.shard_bytes:
            self._open()
        self._writer.write(record)
        cur = self.shards[-1]
        cur["documents"] += 1
        cur["tokens"] += n_tokens
        cur["bytes"] += len(record)
        self.documents += 1
        self.tokens += n_tokens

    def _open(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self._close_current()
        tmp = _tmp_name(self.directory, f"{self.split}-{len(self.shards):05d}.array_record")
        # group_size:1 makes every record its own chunk: what random access (Grain) wants.
        self._writer = ArrayRecordWriter(tmp, "group_size:1")
        self.shards.append({"tmp": tmp, "documents": 0, "tokens": 0, "bytes": 0})

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            _fsync(self.shards[-1]["tmp"])
            self._writer = None

    def finish(self) -> list[dict]:
        """Closes the last shard; returns shard entries with their final file names."""
        self._close_current()
        n = len(self.shards)
        for i, s in enumerate(self.shards):
            s["file"] = f"{self.split}-{i:05d}-of-{n:05d}.array_record"
        return self.shards

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        for s in self.shards:
            with contextlib.suppress(FileNotFoundError):
                os.remove(s["tmp"])


# ----------------------------------------------------------------------------------------------------
# Tokenisation (in this process, or in worker processes)

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    # Each worker is one process: keep the Rust tokenizer from starting a thread per core as well.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer_lib.load_tokenizer(tokenizer_path)


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token arrays with EOS appended; raises DataError for an id at or past the tokenizer's
    vocab_size (the size metadata records, and what the uint16/uint32 choice rests on)."""
    tok = _WORKER_TOKENIZER
    dtype = np.dtype(token_dtype(tok.vocab_size)).newbyteorder("<")
    out = []
    for ids in tok.encode_batch(texts):
        top = max(ids, default=0)
        if top >= tok.vocab_size:
            raise DataError(f"tokenizer {tok.path} produced id {top}, outside its vocabulary of "
                            f"{tok.vocab_size}")
        a = np.empty(len(ids) + 1, dtype)
        a[:-1] = ids
        a[-1] = tok.eos_id
        out.append(a)
    return out


def _chunks(docs: Iterator[Document]) -> Iterator[list[Document]]:
    chunk, chars = [], 0
    for d in docs:
        chunk.append(d)
        chars += len(d.text)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenized(docs: Iterator[Document], tokenizer_path: str, workers: int):
    """Yields (Document, token array) in input order; `workers` > 1 tokenises in that many processes."""
    global _WORKER_TOKENIZER
    if workers <= 1:
        _WORKER_TOKENIZER = tokenizer_lib.load_tokenizer(tokenizer_path)
        for chunk in _chunks(docs):
            yield from zip(chunk, _encode_texts([d.text for d in chunk]))
        return
    # spawn: a forked copy of a process that already ran the Rust thread pool can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()  # bounded, so memory stays flat however large the input
        for chunk in _chunks(docs):
            pending.append((chunk, pool.apply_async(_encode_texts, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                c, r = pending.popleft()
                yield from zip(c, r.get())
        while pending:
            c, r = pending.popleft()
            yield from zip(c, r.get())


class _Progress:
    """One stderr line with documents/s and tokens/s (redrawn on a terminal, every 10 s otherwise)."""

    def __init__(self, enabled: bool, files: int = 0):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.docs = self.tokens = 0
        self.files, self.file = files, 0  # inputs in all, and the one being read

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            self._print(end="\r" if self.tty else "\n")

    def _print(self, end: str) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        where = f"input {self.file}/{self.files}, " if self.files > 1 else ""
        sys.stderr.write(f"prepare: {where}{self.docs:,} docs, {self.tokens:,} tokens | "
                         f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(end="\n")


# ----------------------------------------------------------------------------------------------------
# prepare


def _tokenizer_source(spec: str) -> dict:
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise DataError(f"--tokenizer={spec!r}: expected train:VOCAB with an integer VOCAB") from None
        return {"train_vocab": vocab}
    path = os.path.abspath(tokenizer_lib.resolve_tokenizer_path(os.path.expanduser(spec)))
    return {"path": path, "sha256": tokenizer_lib.file_sha256(path)}


def _load_existing(output: str) -> dict | None:
    try:
        with open(os.path.join(output, "metadata.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _reusable(meta: dict | None, want: dict, output: str) -> bool:
    """Whether `output` already holds what `want` describes, its files intact as far as cheaply seen."""
    if not meta:
        return False
    for k in ("format", "format_version", "inputs", "tokenizer_source", "options"):
        if meta.get(k) != want[k]:
            return False
    tok = os.path.join(output, meta.get("tokenizer") or "")
    if not (os.path.isfile(tok) and tokenizer_lib.file_sha256(tok) == meta.get("tokenizer_sha256")):
        return False
    return all(_shard_intact(os.path.join(output, s["file"]), s)
               for sp in meta.get("splits", {}).values() for s in sp.get("shards", []))


def _shard_intact(path: str, shard: dict) -> bool:
    """Whether a shard is as written: its size against metadata's file_bytes, or (metadata written before
    file_bytes was recorded) its record count against documents."""
    if not os.path.isfile(path):
        return False
    if "file_bytes" in shard:
        return os.path.getsize(path) == shard["file_bytes"]
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()  # a damaged file raises here
    except RuntimeError:
        return False
    return n == shard["documents"]


@contextlib.contextmanager
def _locked(output: str):
    """One prepare at a time per output directory (e.g. several processes resolving "builtin")."""
    with open(os.path.join(output, ".prepare.lock"), "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def prepare(inputs: str | Sequence[str], output: str, tokenizer: str, *,
            val_fraction: float = DEFAULT_VAL_FRACTION, text_field: str = "text",
            split_field: str | None = "split", workers: int = 1, shard_size_mb: float = DEFAULT_SHARD_MB,
            quiet: bool = False, force: bool = False) -> dict:
    """Tokenises `inputs` into ArrayRecord shards under `output`; returns the metadata dict.

    Raises DataError (a user error, message names the file) for missing inputs, an unreadable
    tokenizer, or no valid document.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction}: expected a number in [0, 1)")
    if workers < 1:
        raise DataError(f"--workers={workers}: expected a positive integer")
    say = (lambda m: None) if quiet else log
    output = os.path.abspath(os.path.expanduser(output))
    input_files = sources.expand_inputs(inputs)
    want = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "inputs": sources.fingerprint(input_files),
        "tokenizer_source": _tokenizer_source(tokenizer),
        "options": {"val_fraction": val_fraction, "text_field": text_field, "split_field": split_field},
    }
    os.makedirs(output, exist_ok=True)
    with _locked(output):
        if not force and _reusable(_load_existing(output), want, output):
            say(f"prepare: reusing {output} (same inputs, tokenizer and options)")
            return _load_existing(output)
        for name in os.listdir(output):  # we hold the lock: any .tmp- file is from a crashed run
            if name.startswith(_TMP_PREFIX):
                os.remove(os.path.join(output, name))
        return _prepare_locked(input_files, output, want, text_field=text_field, split_field=split_field,
                               workers=workers, shard_bytes=int(shard_size_mb * 2**20), say=say,
                               quiet=quiet)


def _prepare_locked(input_files, output, want, *, text_field, split_field, workers, shard_bytes, say,
                    quiet) -> dict:
    t0 = time.monotonic()
    val_fraction = want["options"]["val_fraction"]
    src = want["tokenizer_source"]

    def split_of(doc: Document) -> str:
        if doc.split is not None:
            return doc.split
        return "validation" if is_validation(doc.text, val_fraction) else "train"

    # 1. The tokenizer: trained on the training documents, or the given file; a copy goes into DIR.
    tmp_tok = None
    if "train_vocab" in src:
        say(f"prepare: training a byte-level BPE with vocabulary {src['train_vocab']} on the inputs")
        n_train = [0]

        def train_texts():
            for d in sources.iter_documents(input_files, text_field, SkipLog(warn=lambda m: None), split_field):
                if split_of(d) == "train":
                    n_train[0] += 1
                    yield d.text

        tok = tokenizer_lib.train_bpe(train_texts(), src["train_vocab"])
        if n_train[0] == 0:
            raise DataError(f"no valid training documents in {len(input_files)} input(s) to train a "
                            "tokenizer on")
        tok_name = "tokenizer.json"
        tmp_tok = _tmp_name(output, tok_name)
        tok.save(tmp_tok)
    else:
        tok_name = "tokenizer.json" if tokenizer_lib.load_tokenizer(src["path"]).kind == "hf" else "tokenizer.model"
        tmp_tok = _tmp_name(output, tok_name)
        shutil.copyfile(src["path"], tmp_tok)
    tok = tokenizer_lib.load_tokenizer(tmp_tok)
    dtype = token_dtype(tok.vocab_size)

    # 2. Read, tokenise, write.
    skips = SkipLog()
    writers = {s: _ShardWriter(output, s, shard_bytes) for s in SPLITS}
    progress = _Progress(enabled=not quiet, files=len(input_files))

    def documents():
        for progress.file, inp in enumerate(input_files, 1):
            yield from sources.read_documents(inp, text_field, skips, split_field)

    ok = False
    try:
        docs = documents()
        for doc, ids in _tokenized(docs, tmp_tok, workers):
            writers[split_of(doc)].write(ids.tobytes(), len(ids))
            progress.update(1, len(ids))
        progress.close()
        total = sum(w.documents for w in writers.values())
        if total == 0:
            raise DataError(f"no valid documents in {len(input_files)} input(s) "
                            f"({', '.join(f.path for f in input_files[:3])}{', ...' if len(input_files) > 3 else ''}); "
                            f"skipped: {skips.as_dict() or 'none'}")
        if writers["train"].documents == 0:
            raise DataError(f"all {total} documents went to validation: lower --val-fraction or fix the "
                            "records' split field")
        shards = {s: w.finish() for s, w in writers.items()}
        ok = True
    finally:
        if not ok:
            for w in writers.values():
                w.abort()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_tok)
    if writers["validation"].documents == 0 and val_fraction > 0:
        log(f"warning: no document fell into validation (val-fraction {val_fraction}, "
            f"{writers['train'].documents} documents)")

    # 3. Publish: drop the old metadata first, so a crash from here on leaves DIR visibly incomplete.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output, "metadata.json"))
    keep = set()
    for split_shards in shards.values():
        for s in split_shards:
            os.replace(s.pop("tmp"), os.path.join(output, s["file"]))
            s["file_bytes"] = os.path.getsize(os.path.join(output, s["file"]))
            keep.add(s["file"])
    os.replace(tmp_tok, os.path.join(output, tok_name))
    for name in os.listdir(output):  # shards of an earlier, different run
        if _SHARD_RE.match(name) and name not in keep:
            os.remove(os.path.join(output, name))
    _fsync(output)

    elapsed = time.monotonic() - t0
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": tok_name,
        "tokenizer_sha256": tokenizer_lib.file_sha256(os.path.join(output, tok_name)),
        "tokenizer_kind": tok.kind,
        "dtype": dtype,
        "splits": {s: {"documents": writers[s].documents, "tokens": writers[s].tokens, "shards": shards[s]}
                   for s in SPLITS},
        "skipped": skips.as_dict(),
        "inputs": want["inputs"],
        "tokenizer_source": want["tokenizer_source"],
        "options": want["options"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 3),
    }
    atomic_write_bytes(os.path.join(output, "metadata.json"),
                       (json.dumps(meta, indent=2) + "\n").encode())
    tr, va = meta["splits"]["train"], meta["splits"]["validation"]
    say(f"prepare: wrote {output}: train {tr['documents']:,} docs / {tr['tokens']:,} tokens in "
        f"{len(tr['shards'])} shard(s), validation {va['documents']:,} docs / {va['tokens']:,} tokens; "
        f"skipped {sum(meta['skipped'].values())} {meta['skipped'] or ''} ({elapsed:.1f} s)")
    return meta


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m osp_jax.data.prepare",
        description="Tokenise text (txt, jsonl[.gz|.xz|.zst], parquet, save_to_disk datasets) into "
                    "ArrayRecord shards for the osp_jax Grain pipeline.")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="files, directories or globs (repeat the flag or separate with commas); a .txt file is one "
                        "document, a .jsonl line is one document")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer.json, SentencePiece .model, or train:VOCAB to train a byte-level BPE")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"fraction of documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    p.add_argument("--split-field", default="split",
                   help="record field naming a document's split (train/validation), overriding the "
                        "hash; '' to ignore")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB,
                   help=f"start a new shard past this many MB (default {DEFAULT_SHARD_MB})")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.input, args.output, args.tokenizer, val_fraction=args.val_fraction,
                text_field=args.text_field, split_field=args.split_field or None, workers=args.workers,
                shard_size_mb=args.shard_size_mb, quiet=args.quiet, force=args.force)
    except DataError as e:
        log(f"error: {e}")
        return 2
    except OSError as e:  # e.g. an output directory that cannot be written
        log(f"error: {e.filename or ''}: {e.strerror or e}" if e.filename else f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
