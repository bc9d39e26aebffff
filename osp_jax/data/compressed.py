"""Input files as bytes: decompressed by extension (.gz, .xz, .zst, .bz2), from a local path or a URL, and a
cheap look at a whole file before any work (`file_problem`).

A file that cannot be read whole (empty, not the compression its name says, UTF-16/32 rather than UTF-8,
truncated or corrupt) is a user error naming it: see sources.py for the rule.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import zlib
from typing import BinaryIO, Iterator

from osp_jax.data import filesystems as fs

COMPRESSIONS = (".gz", ".xz", ".zst", ".bz2")
# What the decompressors raise for damaged data: gzip's zlib.error and BadGzipFile (an OSError), lzma's
# LZMAError, bz2's OSError, EOFError for a stream cut short (all of them), and _ZstdReader's own.
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)

_MAGIC = {".gz": (b"\x1f\x8b",), ".xz": (b"\xfd7zXZ\x00",), ".bz2": (b"BZh",),
          ".zst": (b"\x28\xb5\x2f\xfd",) + tuple(bytes([0x50 + i, 0x2A, 0x4D, 0x18]) for i in range(16))}
_FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                 (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def strip_compression(path: str) -> tuple[str, str]:
    """(path without its compression suffix, the suffix or "")."""
    for c in COMPRESSIONS:
        if path.endswith(c):
            return path[: -len(c)], c
    return path, ""


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed by its extension; the underlying file is closed on exit."""
    _, comp = strip_compression(path.lower())
    raw = fs.open_read(path)
    try:
        if comp == ".gz":
            f = gzip.GzipFile(fileobj=raw, mode="rb")
        elif comp == ".xz":
            f = lzma.LZMAFile(raw)
        elif comp == ".bz2":
            f = bz2.BZ2File(raw)
        elif comp == ".zst":
            f = io.BufferedReader(_ZstdReader(raw, path))
        else:
            f = raw
        with f:
            yield f
    finally:
        raw.close()


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file frame after frame. Like gzip and lzma, raises EOFError when the file ends
    inside a frame (truncated) and OSError for data that is not zstd."""

    _READ = 1 << 17

    def __init__(self, fh: BinaryIO, path: str):
        try:
            import zstandard
        except ImportError:
            from osp_jax.data.sources import DataError
            raise DataError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._fh = fh
        self._frame = None    # the decompressor of the frame being read, None between frames
        self._input = b""     # compressed bytes read past the end of the last frame
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            if not self._decompress_more():
                return 0
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress_more(self) -> bool:
        """Decompresses the next piece of input into self._out; False at the end of the file."""
        data, self._input = self._input or self._fh.read(self._READ), b""
        if not data:
            if self._frame is not None:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        try:
            self._out = memoryview(self._frame.decompress(data))
        except self._zstd.ZstdError as e:
            raise OSError(f"not zstd data or corrupt: {e}") from None
        if self._frame.eof:
            self._frame, self._input = None, self._frame.unused_data
        return True


def describe_damage(e: BaseException) -> str:
    """What a decompression error says about the file, in words."""
    if isinstance(e, EOFError):
        return f"truncated ({e})"
    if isinstance(e, (zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return f"corrupt compressed data ({e})"
    return str(e)


def _head_and_tail(path: str, n: int = 64) -> tuple[bytes, bytes, int]:
    size = fs.stat(path).size
    with fs.open_read(path) as f:
        head = tail = f.read(n)
        if size > n:
            f.seek(size - n)
            tail = f.read(n)
    return head, tail, size


def file_problem(path: str, kind: str) -> str | None:
    """Why a file cannot be read whole, by what a few bytes at each end show, or None. It reads at most
    a few bytes (and the first decompressed ones), so it runs on every input before any work."""
    try:
        head, tail, size = _head_and_tail(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty file"
    _, comp = strip_compression(path.lower())
    if comp and not head.startswith(_MAGIC[comp]):
        return f"not {comp[1:]} data (no {comp[1:]} magic bytes at its start)"
    if comp == ".xz" and tail.rstrip(b"\0") and not tail.rstrip(b"\0").endswith(b"YZ"):  # (after any padding)
        return "truncated (no xz stream footer at its end)"
    if kind == "parquet" and not (head.startswith(b"PAR1") and tail.endswith(b"PAR1")):
        return "not a whole parquet file (no PAR1 marker at " + ("its end)" if head.startswith(b"PAR1") else "its start)")
    if kind in ("txt", "jsonl"):
        try:
            with open_binary(path) as f:
                first = f.read1(4) if comp else f.read(4)  # read1: no more than one block decompressed
        except DECOMPRESSION_ERRORS as e:
            return describe_damage(e)
        if not first:
            return "empty once decompressed"
        for bom, name in _FOREIGN_BOMS:
            if first.startswith(bom):
                return f"{name} text (byte-order mark {bom.hex(' ').upper()}), not UTF-8"
    return None
