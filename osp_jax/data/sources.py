"""Readers for the text inputs `prepare` accepts, yielding one document at a time.

Kinds (chosen by name):
- `.txt` (also `.txt.gz/.xz/.zst`): the whole file is one document.
- `.jsonl` / `.json` lines, plain or `.gz`, `.xz`, `.zst`: one JSON object a line, text under `text_field`.
- `.parquet`: a string column named `text_field` (needs pyarrow).
- a directory written by Hugging Face `datasets` `save_to_disk` (state.json + data-*.arrow in Arrow IPC
  stream format, or a DatasetDict with dataset_dict.json and a folder a split): read with pyarrow, so
  the `datasets` package is not needed. Every split of a DatasetDict is read, and its name is the split
  hint of its documents ("train"; "validation", "valid", "test", ... count as validation). Local only.
- any other directory: the supported files under it, recursively.
Paths may be URLs (gs://...): read through Apache Beam's filesystems (`filesystems.py`).

A record may carry a split hint (`split_field`, "train" or "validation"), which overrides the hashed
hold-out (and a DatasetDict split's name); the shipped corpus uses it.

The rule for bad input:
- a bad record (not JSON, no text field, not UTF-8, empty, ...) is skipped, counted by reason and by
  file in `SkipLog`, and named (file:line) in the first warnings; the rest is prepared;
- a whole file that cannot be read whole (empty, not the compression its name says, UTF-16/32 rather
  than UTF-8, truncated or corrupt) is a DataError naming the file and the reason: found before any work
  where a few bytes show it (`check_inputs`), else when reading reaches the damage. Dropping it, or the
  part after the damage, would silently prepare another dataset than the one asked for.
A UTF-8 byte-order mark at the start of a file is not a problem: it is dropped, as JSON readers may.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import sys
from typing import Callable, Iterator, Sequence

from osp_jax.data import compressed
from osp_jax.data import filesystems as fs
from osp_jax.data.compressed import COMPRESSIONS, open_binary  # noqa: F401 - re-exported: defined here before

JSONL_EXTS = (".jsonl", ".json", ".ndjson")
VALIDATION_NAMES = {"validation", "valid", "val", "dev", "test", "eval"}
TRAIN_NAMES = {"train", "training"}
BOM = "\ufeff"


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
    """Counts skipped records by reason, in all and by input file (`file`, set by `read_documents`), and
    warns, naming file:line, for the first few."""

    def __init__(self, max_warnings: int = 10, warn: Callable[[str], None] | None = None):
        self.counts: collections.Counter = collections.Counter()
        self.by_file: dict[str, collections.Counter] = {}
        self.file: str | None = None
        self.max_warnings = max_warnings
        self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self._warned = 0
        self.first: str | None = None  # the first skip, "where: skipped (reason): detail"

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.by_file.setdefault(self.file or where, collections.Counter())[reason] += 1
        self._warned += 1
        line = f"{where}: skipped ({reason}){': ' + detail if detail else ''}"
        self.first = self.first or line
        if self._warned <= self.max_warnings:
            self._warn(line)
        elif self._warned == self.max_warnings + 1:
            self._warn("further skipped records are counted but not reported")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def by_file_dict(self) -> dict[str, dict[str, int]]:
        """{input file: {reason: count}} for the files that had a skipped record (metadata's
        "skipped_by_file")."""
        return {f: dict(sorted(c.items())) for f, c in sorted(self.by_file.items())}


def kind_of(path: str) -> str | None:
    """The input kind of a path, or None if it is not a supported input."""
    if not fs.is_url(path) and os.path.isdir(path):
        return "hf_dataset" if _is_hf_dataset(path) else None
    base, comp = compressed.strip_compression(path.lower())
    if base.endswith(".txt"):
        return "txt"
    if base.endswith(JSONL_EXTS):
        return "jsonl"
    if base.endswith(".parquet") and not comp:
        return "parquet"
    return None


def _is_hf_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n))
               for n in ("state.json", "dataset_info.json", "dataset_dict.json"))


def expand_inputs(patterns: str | Sequence[str], exclude: str | None = None) -> list[InputFile]:
    """Glob patterns (comma-separated or a list; `**` recurses) -> sorted, de-duplicated inputs. Nothing
    under the directory `exclude` (prepare's output) is an input: a later run must not read back what an
    earlier one wrote (its metadata.json and tokenizer.json would read as JSON lines).

    Raises DataError naming the pattern when one matches nothing usable.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    parts = [p.strip() for pat in patterns for p in fs.split_patterns(str(pat)) if p.strip()]
    if not parts:
        raise DataError("no --input given")
    outside = _outside(exclude)
    out: dict[str, InputFile] = {}
    for pat in parts:
        pat = pat if fs.is_url(pat) else os.path.expanduser(pat)
        matches = []
        for one in fs.expand_braces(pat):
            matches += _glob(one)
        every = [f for m in matches for f in _expand_one(m)]
        found = [f for f in every if outside(f.path)]
        if not found:
            if not matches:
                raise DataError(f"--input {pat!r} matches no file")
            if every:
                raise DataError(f"--input {pat!r} matches only files inside the output directory {exclude}, "
                                "which is never read as input: write the output elsewhere")
            raise DataError(f"--input {pat!r} matches no supported input (.txt, .jsonl[.gz|.xz|.zst], "
                            f".parquet, or a save_to_disk dataset directory): {matches[:5]}")
        for f in found:
            out.setdefault(f.path, f)
    return sorted(out.values(), key=lambda f: f.path)


def _outside(exclude: str | None) -> Callable[[str], bool]:
    """Whether a path lies outside the directory `exclude` (always, when it is None)."""
    if exclude is None:
        return lambda path: True
    root = exclude.rstrip("/") if fs.is_url(exclude) else os.path.realpath(exclude)
    sep = "/" if fs.is_url(exclude) else os.sep

    def outside(path: str) -> bool:
        p = path.rstrip("/") if fs.is_url(path) else os.path.realpath(path)
        return p != root and not p.startswith(root + sep)

    return outside


def _glob(pattern: str) -> list[str]:
    """The paths `pattern` matches; one that names a path that exists is that path (a file may be `a[1].txt`)."""
    if fs.is_url(pattern):
        if glob.has_magic(pattern) and not fs.isfile(pattern):  # an object named like a pattern is itself
            return [m.path for m in fs.match(pattern)]
        return [pattern] if fs.isfile(pattern) or fs.isdir(pattern) else []
    if os.path.exists(pattern):
        return [pattern]
    return sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []


def _expand_one(path: str) -> list[InputFile]:
    if fs.is_url(path):
        if kind_of(path) is not None:
            return [InputFile(path, kind_of(path))]
        return [InputFile(m.path, kind_of(m.path)) for m in fs.match(path.rstrip("/") + "/**")
                if kind_of(m.path) is not None]
    path = os.path.abspath(path)
    k = kind_of(path)
    if k is not None:
        return [InputFile(path, k)]
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if _is_hf_dataset(root) and root != path:
                found.append(InputFile(root, "hf_dataset"))
                dirs[:] = []
                continue
            for name in sorted(files):
                p = os.path.join(root, name)
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
            st = fs.stat(p)
            out.append({"path": p, "size": st.size, "mtime_ns": st.mtime_ns}
                       | ({"split": split} if split is not None else {}))
    return out


def check_inputs(inputs: Sequence[InputFile], threads: int = 16) -> None:
    """DataError naming every input file that a look at a few of its bytes shows cannot be read whole
    (`compressed.file_problem`): before any work. Threads, because on an object store each look is a
    round trip."""
    files = [(inp, p) for inp in inputs for p, _ in inp.data_files() if inp.kind != "hf_dataset"]
    with concurrent.futures.ThreadPoolExecutor(min(threads, max(1, len(files)))) as pool:
        problems = list(pool.map(lambda f: compressed.file_problem(f[1], f[0].kind), files))
    raise_file_errors([(p, why) for (_, p), why in zip(files, problems) if why])


def raise_file_errors(bad: Sequence[tuple[str, str]]) -> None:
    """DataError naming every (file, reason), or the first five and a count: `error reading PATH: REASON`."""
    if len(bad) == 1:
        raise DataError(f"error reading {bad[0][0]}: {bad[0][1]}")
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"error reading {len(bad)} input files: " + "; ".join(f"{p} ({why})" for p, why in bad[:5])
                        + more)


# ----------------------------------------------------------------------------------------------------
# Readers


def read_documents(inp: InputFile, text_field: str = "text", skips: SkipLog | None = None,
                   split_field: str | None = "split") -> Iterator[Document]:
    """Yields the valid documents of one input; malformed records go to `skips`."""
    skips = skips if skips is not None else SkipLog()
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet,
              "hf_dataset": _read_hf_dataset}[inp.kind]
    skips.file = inp.path
    try:
        yield from reader(inp.path, text_field, skips, split_field)
    except DataError:
        raise
    except compressed.DECOMPRESSION_ERRORS as e:  # truncated or corrupt compressed files land here
        raise DataError(f"error reading {inp.path}: {compressed.describe_damage(e)}") from None


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
    text = text.removeprefix(BOM)
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
            if line_no == 1:  # json.loads refuses a byte-order mark: the first record would be lost
                line = line.removeprefix(BOM)
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
        texts = _column_texts(batch.column(text_field), pa)
        splits = batch.column(split_field).to_pylist() if use_split else [None] * len(texts)
        for text, sp in zip(texts, splits):
            row += 1
            where = f"{path}:row {row}"
            if isinstance(text, UnicodeDecodeError):  # a value that is not UTF-8 (pyarrow does not check)
                skips.skip("bad_utf8", where, f"byte {text.start} of the value is not UTF-8")
            elif _valid_text(text, where, skips):
                yield Document(text, where, _split_hint(sp, where) or default_split)


def _column_texts(column, pa) -> list:
    """The column's values as str; a value that is not UTF-8 as its UnicodeDecodeError."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        return [_decoded(b) for b in raw.to_pylist()]


def _decoded(b: bytes | None):
    try:
        return None if b is None else b.decode("utf-8")
    except UnicodeDecodeError as e:
        return e


def _read_parquet(path, text_field, skips, split_field):
    _import_pyarrow(path)
    import pyarrow.parquet as pq
    with fs.open_read(path) as fh:
        try:
            pf = pq.ParquetFile(fh)
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
    dd = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dd):
        try:
            splits = json.load(open(dd))["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {dd}: {e}") from None
        out = []
        for s in splits:
            out.extend((p, s) for p, _ in _hf_arrow_files(os.path.join(path, s)))
        return out
    state = os.path.join(path, "state.json")
    files = None
    if os.path.isfile(state):
        try:
            files = [d["filename"] for d in json.load(open(state))["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read {state}: {e}") from None
    if files is None:  # no state.json: take the arrow files in name order
        files = sorted(n for n in os.listdir(path) if n.endswith(".arrow"))
    if not files:
        raise DataError(f"dataset directory {path} lists no .arrow data files")
    out = []
    for n in files:
        p = os.path.join(path, n)
        if not os.path.isfile(p):
            raise DataError(f"dataset directory {path}: data file {n} is missing")
        out.append((p, None))
    return out


def _read_hf_dataset(path, text_field, skips, split_field):
    pa = _import_pyarrow(path)
    for arrow_path, split in _hf_arrow_files(path):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(arrow_path))  # what save_to_disk writes
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(pa.memory_map(arrow_path))
            except pa.ArrowInvalid as e:
                raise DataError(f"cannot read Arrow file {arrow_path}: {e}") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        yield from _read_table_batches(batches, reader.schema, arrow_path, text_field, skips, split_field,
                                       _split_hint(split, arrow_path))
