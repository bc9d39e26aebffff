"""The ArrayRecord shards `prepare` writes: one record a document, written under .tmp- names, published
by rename, and checked before they are reused.

array_record writes local files only (its reader also reads gs://): for a gs:// output, each shard is written
on the local disk, uploaded under its .tmp- name once closed and removed locally, and published by a copy
the server makes.

A record is a document's token ids, EOS appended, as little-endian uint16 (vocabulary <= 65536) or
uint32 bytes. Shard names: `{split}-{i:05d}-of-{n:05d}.array_record`.
"""
from __future__ import annotations

import contextlib
import os
import re

from etils import epath

from osp_jax import cli, storage

TMP_PREFIX = ".tmp-"
SHARD_RE = re.compile(r"^(train|validation)-\d{5}-of-\d{5}\.array_record$")
# group_size:1 makes every record its own chunk: what random access (Grain) wants.
WRITER_OPTIONS = "group_size:1"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
    """The record dtype: uint16 holds every id when all ids are below vocab_size <= 65536."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tmp_name(directory: str, name: str) -> str:
    """A name in `directory` that a crashed run's cleanup recognises (TMP_PREFIX) and this process owns."""
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{name}")


class ShardWriter:
    """Writes one split's records into .tmp- shards in the local `directory`, starting a new shard past
    `shard_bytes`. With `upload_to` (a gs:// directory), each shard, once closed, is uploaded there under its
    .tmp- name and removed locally: the local disk holds one shard at a time."""

    def __init__(self, directory: str, split: str, shard_bytes: int, upload_to: str | None = None):
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.upload_to = upload_to
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
        tmp = tmp_name(self.directory, f"{self.split}-{len(self.shards):05d}.array_record")
        self._writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        self.shards.append({"tmp": tmp, "documents": 0, "tokens": 0, "bytes": 0})

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            cur = self.shards[-1]
            if not self.upload_to:
                cli.fsync(cur["tmp"])
                return
            remote = os.fspath(epath.Path(self.upload_to) / os.path.basename(cur["tmp"]))
            storage.upload(cur["tmp"], remote)
            os.remove(cur["tmp"])
            cur["tmp"] = remote

    def finish(self) -> list[dict]:
        """Closes the last shard; returns shard entries with their final file names."""
        self._close_current()
        n = len(self.shards)
        for i, s in enumerate(self.shards):
            s["file"] = shard_name(self.split, i, n)
        return self.shards

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        for s in self.shards:
            with contextlib.suppress(OSError):
                storage.remove(s["tmp"])


def write_shard(path: str, records) -> int:
    """Writes `records` (bytes) as one local shard, fsynced; returns the file's size. A failure removes
    the part written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    try:
        for r in records:
            writer.write(r)
        writer.close()
        cli.fsync(path)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return os.path.getsize(path)


def record_count(path: str) -> int | None:
    """The records in a local shard, or None when array_record cannot read it."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()  # a damaged file raises here
    except RuntimeError:
        return None
    return n


def publish(output: str, shards: dict[str, list[dict]]) -> None:
    """Renames the finished shards of every split to their final names, records each one's size as
    "file_bytes", and removes the shards of an earlier, different run."""
    keep = set()
    for split_shards in shards.values():
        for s in split_shards:
            final = os.fspath(epath.Path(output) / s["file"])
            storage.move(s.pop("tmp"), final)
            s["file_bytes"] = storage.stat(final)[0]
            keep.add(s["file"])
    for name in storage.names(output):
        if SHARD_RE.match(name) and name not in keep:
            storage.remove(epath.Path(output) / name)


def size_problem(path: str, shard: dict) -> str | None:
    """What is wrong with a shard by what is cheap to see (missing, or of another size than metadata.json's
    "file_bytes", where recorded), or None."""
    path = storage.uncached(path)
    if not path.is_file():
        return f"shard {shard['file']} is missing"
    size = path.stat().length
    if size != shard.get("file_bytes", size):
        return f"shard {shard['file']} has {size} bytes, metadata.json says {shard['file_bytes']}"
    return None


def intact(path: str, shard: dict) -> bool:
    """Whether a shard is as written: its size against metadata's file_bytes, or (metadata written before
    file_bytes was recorded) its record count against documents."""
    if size_problem(path, shard) is not None:
        return False
    if "file_bytes" in shard:
        return True
    return record_count(path) == shard["documents"]
