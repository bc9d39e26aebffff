"""Readers for the text inputs `prepare` accepts, yielding one document at a time.

Kinds (chosen by name):
- `.txt` (also `.txt.gz/.xz/.zst`): the whole file is one document.
- `.jsonl` / `.json` lines, plain or `.gz`, `.xz`, `.zst`: one JSON object a line, text under `text_field`.
- `.parquet`: a string column named `text_field` (needs pyarrow).
- a directory written by Hugging Face `datasets` `save_to_disk` (state.json + data-*.arrow in Arrow IPC
  stream format, or a DatasetDict with dataset_dict.json and a folder a split): read with pyarrow, so
  the `datasets` package is not needed. Every split of a DatasetDict is read, and its name is the split
  hint of its documents ("train"; "validation", "valid", "test", ... count as validation).
- any other directory: the supported files under it, recursively.

Paths and globs may be local or gs:// (read through etils.epath: osp_jax.storage).

A record may carry a split hint (`split_field`, "train" or "validation"), which overrides the hashed
hold-out (and a DatasetDict split's name); the shipped corpus uses it. Malformed records are skipped and
counted by reason in `SkipLog`. A truncated or corrupt compressed file is a DataError naming the file.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import lzma
import os
import sys
from typing import Callable, Iterator, Sequence

from etils import epath

from osp_jax import storage

COMPRESSIONS = (".gz", ".xz", ".zst", ".bz2")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
VALIDATION_NAMES = {"validation", "valid", "val", "dev", "test", "eval"}
TRAIN_NAMES = {"train", "training"}


class DataError(Exception):
    """A user error in the inputs (bad file, missing field, nothing to read). Printed without traceback."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "txt" | "jsonl" | "parquet" | "hf_dataset"

    def data_files(self) -> list[tuple[str, str | None]]:
        """(file, DatasetDict split name or None) for every file whose content this input reads."""
        if self.kind == "hf_dataset":
            return _hf_arrow_files(self.path)
        return [(self.path, None)]


@dataclasses.dataclass
class Document:
    text: str
    where: str               # "file:line" (or "file:row N") for messages
    split: str | None = None  # "train" | "validation" from the record's split field, else None


class SkipLog:
    """Counts skipped records by reason and warns, naming file:line, for the first few."""

    def __init__(self, max_warnings: int = 10, warn: Callable[[str], None] | None = None):
        self.counts: collections.Counter = collections.Counter()
        self.max_warnings = max_warnings
        self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self._warned = 0

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self._warned += 1
        if self._warned <= self.max_warnings:
            self._warn(f"{where}: skipped ({reason}){': ' + detail if detail else ''}")
        elif self._warned == self.max_warnings + 1:
            self._warn("further skipped records are counted but not reported")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _strip_compression(path: str) -> tuple[str, str]:
    for c in COMPRESSIONS:
        if path.endswith(c):
            return path[: -len(c)], c
    return path, ""


def kind_of(path: str) -> str | None:
    """The input kind of a path, or None if it is not a supported input."""
    if storage.is_dir(path):
        return "hf_dataset" if _is_hf_dataset(path) else None
    base, comp = _strip_compression(path.lower())
    if base.endswith(".txt"):
        return "txt"
    if base.endswith(JSONL_EXTS):
        return "jsonl"
    if base.endswith(".parquet") and not comp:
        return "parquet"
    return None


def _is_hf_dataset(path: str) -> bool:
    return any(storage.is_file(epath.Path(path) / n) for n in ("state.json", "dataset_info.json", "dataset_dict.json"))


def expand_inputs(patterns: str | Sequence[str]) -> list[InputFile]:
    """Glob patterns (comma-separated or a list; `**` recurses) -> sorted, de-duplicated inputs.

    Raises DataError naming the pattern when one matches nothing usable.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    parts = [p.strip() for pat in patterns for p in _split_top_level(str(pat)) if p.strip()]
    if not parts:
        raise DataError("no --input given")
    out: dict[str, InputFile] = {}
    for pat in parts:
        pat = os.path.expanduser(pat)
        matches = []
        for one in _expand_braces(pat):
            matches += storage.glob(one)
        found = []
        for m in matches:
            found.extend(_expand_one(m))
        if not found:
            if not matches:
                raise DataError(f"--input {pat!r} matches no file")
            raise DataError(f"--input {pat!r} matches no supported input (.txt, .jsonl[.gz|.xz|.zst], "
                            f".parquet, or a save_to_disk dataset directory): {matches[:5]}")
        for f in found:
            out.setdefault(f.path, f)
    return sorted(out.values(), key=lambda f: f.path)


def _split_top_level(pattern: str) -> list[str]:
    """Splits on commas outside braces: "a.jsonl,b/*.txt" -> 2 patterns; "{a,b}.txt" stays one."""
    parts, depth, cur = [], 0, ""
    for ch in pattern:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style brace alternatives, which glob lacks: "x_{a,b}.jsonl" -> ["x_a.jsonl", "x_b.jsonl"]."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        return [pattern]  # unbalanced: take it literally
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    return [x for alt in _split_top_level(body) for x in _expand_braces(head + alt + tail)]


def _expand_one(path: str) -> list[InputFile]:
    path = storage.normalized(path)
    k = kind_of(path)
    if k is not None:
        return [InputFile(path, k)]
    if storage.is_dir(path):
        found = []
        for root, dirs, files in storage.walk(path):
            dirs.sort()
            if _is_hf_dataset(root) and root != path:
                found.append(InputFile(root, "hf_dataset"))
                dirs[:] = []
                continue
            for name in sorted(files):
                p = os.fspath(epath.Path(root) / name)
                if kind_of(p) is not None:
                    found.append(InputFile(p, kind_of(p)))
        return found
    return []


def fingerprint(inputs: Sequence[InputFile]) -> list[dict]:
    """(path, size, mtime_ns) for every file the inputs read, plus the DatasetDict split a file belongs
    to: cheap, and changes when a file does."""
    out = []
    for inp in inputs:
        for p, split in inp.data_files():
            size, mtime_ns = storage.stat(p)
            out.append({"path": p, "size": size, "mtime_ns": mtime_ns}
                       | ({"split": split} if split is not None else {}))
    return out


# ----------------------------------------------------------------------------------------------------
# Readers


def open_binary(path: str):
    """Opens a file for reading bytes, decompressing by extension."""
    _, comp = _strip_compression(path.lower())
    try:
        if comp in (".gz", ".xz", ".bz2"):
            # A local file by its name, as before; a gs:// object as a file object, closed with the reader.
            return _decompressed(path, comp) if not storage.is_remote(path) else _closing(storage.open_read(path), comp)
        if comp == ".zst":
            return io.BufferedReader(_ZstdReader(path))
        return storage.open_read(path)
    except OSError as e:
        raise DataError(f"cannot open {path}: {e.strerror or e}") from None


def _decompressed(source, comp: str):
    """A reader of `source` (a file name, or a file object: a gs:// object) decompressing `comp`."""
    if comp == ".gz":
        return gzip.open(source, "rb")
    if comp == ".xz":
        return lzma.open(source, "rb")
    import bz2
    return bz2.open(source, "rb")


def _closing(raw, comp: str):
    """A reader decompressing the file object `raw`, whose close() closes `raw` too (a decompressor leaves a file
    object it was given open)."""
    reader = _decompressed(raw, comp)
    close = reader.close

    def close_both():
        try:
            close()
        finally:
            raw.close()

    reader.close = close_both
    return reader


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file frame after frame. Like gzip and lzma, raises EOFError when the file ends
    inside a frame (truncated) and OSError for data that is not zstd."""

    _READ = 1 << 17

    def __init__(self, path: str):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._fh = storage.open_read(path)
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

    def close(self) -> None:
        self._fh.close()
        super().close()


def read_documents(inp: InputFile, text_field: str = "text", skips: SkipLog | None = None,
                   split_field: str | None = "split") -> Iterator[Document]:
    """Yields the valid documents of one input; malformed records go to `skips`."""
    skips = skips if skips is not None else SkipLog()
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet,
              "hf_dataset": _read_hf_dataset}[inp.kind]
    try:
        yield from reader(inp.path, text_field, skips, split_field)
    except DataError:
        raise
    except (OSError, EOFError, lzma.LZMAError) as e:  # truncated or corrupt compressed files land here
        raise DataError(f"error reading {inp.path}: {e}") from None


def iter_documents(inputs: Sequence[InputFile], text_field: str = "text", skips: SkipLog | None = None,
                   split_field: str | None = "split") -> Iterator[Document]:
    for inp in inputs:
        yield from read_documents(inp, text_field, skips, split_field)


def _split_hint(value, where: str) -> str | None:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in TRAIN_NAMES:
            return "train"
        if v in VALIDATION_NAMES:
            return "validation"
    return None


def _valid_text(text, where: str, skips: SkipLog) -> bool:
    if text is None:
        skips.skip("missing_field", where, "text is null")
        return False
    if not isinstance(text, str):
        skips.skip("not_a_string", where, f"text is a {type(text).__name__}")
        return False
    if not text.strip():
        skips.skip("empty", where)
        return False
    try:  # JSON escapes can smuggle in lone surrogates, which no tokenizer accepts
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        skips.skip("bad_utf8", where, f"lone surrogate at character {e.start}")
        return False
    return True


def _read_txt(path, text_field, skips, split_field):
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        skips.skip("bad_utf8", f"{path}:{line}", f"byte {e.start} is not UTF-8")
        return
    text = text.removeprefix("\ufeff")
    if _valid_text(text, path, skips):
        yield Document(text, path)


def _read_jsonl(path, text_field, skips, split_field):
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.skip("bad_utf8", where, f"byte {e.start} of the line is not UTF-8")
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                skips.skip("bad_json", where, str(e))
                continue
            if not isinstance(rec, dict):
                skips.skip("not_an_object", where, f"a JSON {type(rec).__name__}, not an object")
                continue
            if text_field not in rec:
                skips.skip("missing_field", where, f"no {text_field!r} field (has {sorted(rec)[:8]})")
                continue
            text = rec[text_field]
            if _valid_text(text, where, skips):
                split = _split_hint(rec.get(split_field), where) if split_field else None
                yield Document(text, where, split)


def _import_pyarrow(path):
    try:
        import pyarrow
        return pyarrow
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None


def _read_table_batches(batches, schema, path, text_field, skips, split_field, default_split=None):
    names = schema.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {names}); pass --text-field")
    pa = _import_pyarrow(path)
    ftype = schema.field(text_field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise DataError(f"{path}: column {text_field!r} is {ftype}, not a string column")
    use_split = bool(split_field) and split_field in names
    row = 0
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        splits = batch.column(split_field).to_pylist() if use_split else [None] * len(texts)
        for text, sp in zip(texts, splits):
            row += 1
            where = f"{path}:row {row}"
            if _valid_text(text, where, skips):
                yield Document(text, where, _split_hint(sp, where) or default_split)


def _read_parquet(path, text_field, skips, split_field):
    _import_pyarrow(path)
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path if not storage.is_remote(path) else storage.open_read(path))
    except Exception as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    schema = pf.schema_arrow
    cols = [text_field] + ([split_field] if split_field and split_field in schema.names else [])
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {schema.names}); pass --text-field")
    yield from _read_table_batches(pf.iter_batches(batch_size=1024, columns=cols), schema, path,
                                   text_field, skips, split_field)


def _hf_arrow_files(path: str) -> list[tuple[str, str | None]]:
    """(arrow file, split name) pairs of a save_to_disk directory (Dataset or DatasetDict)."""
    dd = os.fspath(epath.Path(path) / "dataset_dict.json")
    if storage.is_file(dd):
        try:
            splits = json.loads(epath.Path(dd).read_text())["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {dd}: {e}") from None
        out = []
        for s in splits:
            out.extend((p, s) for p, _ in _hf_arrow_files(os.fspath(epath.Path(path) / s)))
        return out
    state = os.fspath(epath.Path(path) / "state.json")
    files = None
    if storage.is_file(state):
        try:
            files = [d["filename"] for d in json.loads(epath.Path(state).read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {state}: {e}") from None
    if files is None:  # no state.json: take the arrow files in name order
        files = sorted(p.name for p in storage.uncached(path).iterdir() if p.name.endswith(".arrow"))
    if not files:
        raise DataError(f"dataset directory {path} lists no .arrow data files")
    out = []
    for n in files:
        p = os.fspath(epath.Path(path) / n)
        if not storage.is_file(p):
            raise DataError(f"dataset directory {path}: data file {n} is missing")
        out.append((p, None))
    return out


def _read_hf_dataset(path, text_field, skips, split_field):
    pa = _import_pyarrow(path)
    for arrow_path, split in _hf_arrow_files(path):
        source = (lambda: pa.memory_map(arrow_path)) if not storage.is_remote(arrow_path) else (
            lambda: pa.PythonFile(storage.open_read(arrow_path), mode="r"))
        try:
            reader = pa.ipc.open_stream(source())  # what save_to_disk writes
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(source())
            except pa.ArrowInvalid as e:
                raise DataError(f"cannot read Arrow file {arrow_path}: {e}") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        yield from _read_table_batches(batches, reader.schema, arrow_path, text_field, skips, split_field,
                                       _split_hint(split, arrow_path))
