"""The Apache Beam pipeline of `prepare --runner=...`: what runs on the workers (beam_prepare.py launches
it and publishes its output).

    Create(input files)        one element a file (Create reshuffles them over the workers)
    -> ReadFile                sources.read_documents; documents in chunks, each with its key (file index,
                               record index) and split; each file's counts (and a whole-file error) to FILES
    -> Reshuffle               spreads the chunks of one large file over the workers
    -> Tokenize                tokenizer.encode_documents: (split, key, record bytes, tokens)
    -> shard counts            each split's record bytes / shard size, a side input
    -> GroupByKey(split, bucket of the key's hash)
    -> WriteShard              records sorted by key, one ArrayRecord file under a name no other attempt
                               uses, in the staging folder
    -> Manifest                one manifest.json: the shards, each file's counts and errors, the totals

A bundle's outputs count only once it commits, so the manifest names exactly one attempt's file for each
shard, whatever failed or ran twice. A document's split depends on its text (or split field), its bucket
on its key, and a shard's order on the keys: the shards are the same bytes whatever the runner and the
number of workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import apache_beam as beam

from osp_jax import cli
from osp_jax.data import filesystems as fs
from osp_jax.data import prepare as prepare_lib
from osp_jax.data import shards as shards_lib
from osp_jax.data import sources
from osp_jax.data import tokenizer as tokenizer_lib

MANIFEST = "manifest.json"
FILES, ERRORS = "files", "errors"
_WARNINGS_A_FILE = 3  # bad records named in each file's report; all are counted
# A chunk is the unit the Reshuffle spreads over the workers: small enough that one file makes many, large
# enough to amortise a tokenizer call (the single-machine path hands over 256 documents / 4 MiB at once).
CHUNK_DOCS, CHUNK_CHARS = 64, 1 << 20


def build(p, files, *, staging: str, tokenizer: str, dtype: str, text_field: str, split_field: str | None,
          val_fraction: float, shard_bytes: int) -> None:
    """Adds the pipeline to `p`: `files` (InputFile) in, shards and manifest.json under `staging` out.
    `tokenizer` is the staged copy of the tokenizer file, which every worker reads."""
    inputs = p | "Inputs" >> beam.Create([(i, f.path, f.kind) for i, f in enumerate(files)])
    read = inputs | "Read" >> beam.ParDo(ReadFile(text_field, split_field, val_fraction)).with_outputs(
        FILES, main="chunks")
    docs = (read.chunks
            | "Spread" >> beam.Reshuffle()
            | "Tokenize" >> beam.ParDo(Tokenize(tokenizer, dtype)).with_outputs(ERRORS, main="docs"))
    totals = (docs.docs
              | "Sizes" >> beam.Map(lambda d: (d[0], (1, d[3], len(d[2]))))
              | "Totals" >> beam.CombinePerKey(_add))
    counts = totals | "ShardCounts" >> beam.Map(lambda kv: (kv[0], max(1, -(-kv[1][2] // shard_bytes))))
    shards = (docs.docs
              | "Bucket" >> beam.Map(_bucketed, beam.pvalue.AsDict(counts))
              | "Group" >> beam.GroupByKey()
              | "Write" >> beam.ParDo(WriteShard(staging)))
    _ = ((shards | "ShardReports" >> beam.Map(lambda e: ("shard", e)),
          read[FILES] | "FileReports" >> beam.Map(lambda r: ("file", r)),
          docs[ERRORS] | "ErrorReports" >> beam.Map(lambda e: ("error", e)),
          totals | "TotalReports" >> beam.Map(lambda kv: ("total", kv)))
         | "Reports" >> beam.Flatten()
         | "Collect" >> beam.combiners.ToList()
         | "Manifest" >> beam.Map(write_manifest, staging))


def _add(values):
    """Element-wise sum of (documents, tokens, bytes) tuples (associative: Beam combines in any order)."""
    return tuple(sum(x) for x in zip(*values)) or (0, 0, 0)


def bucket_of(key: tuple[int, int], count: int) -> int:
    """The shard bucket of a document key: a hash, so the buckets fill evenly whatever the input order."""
    h = hashlib.blake2b(struct.pack("<qq", *key), digest_size=8).digest()
    return int.from_bytes(h, "little") % count


def _bucketed(doc, counts):
    split, key, record, n_tokens = doc
    return (split, bucket_of(key, counts[split])), (key, record, n_tokens)


class ReadFile(beam.DoFn):
    """(file index, path, kind) -> (file index, [(record index, text, split), ...]) chunks, and to FILES
    the file's report: documents, skipped counts by reason, the first warnings, and `error` when the
    file cannot be read whole (reported, not raised: every bad file is named at the end, at once)."""

    def __init__(self, text_field: str, split_field: str | None, val_fraction: float):
        self.text_field, self.split_field, self.val_fraction = text_field, split_field, val_fraction

    def setup(self):
        fs.use_beam()  # a worker reads gs:// through Beam's filesystems

    def process(self, element):
        index, path, kind = element
        warnings: list[str] = []
        skips = sources.SkipLog(max_warnings=_WARNINGS_A_FILE, warn=warnings.append)
        chunk, chars, n = [], 0, 0
        report = {"path": path}
        try:
            for doc in sources.read_documents(sources.InputFile(path, kind), self.text_field, skips,
                                              self.split_field):
                chunk.append((n, doc.text, prepare_lib.split_of(doc, self.val_fraction)))
                n += 1
                chars += len(doc.text)
                if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                    yield index, chunk
                    chunk, chars = [], 0
        except sources.DataError as e:
            report["error"] = cli.one_line(e)
        if chunk:
            yield index, chunk
        report.update(documents=n, skipped=skips.as_dict(), warnings=warnings)
        yield beam.pvalue.TaggedOutput(FILES, report)


class Tokenize(beam.DoFn):
    """(file index, chunk) -> (split, (file index, record index), record bytes, tokens) a document; a
    tokenizer error (an id past its vocabulary) to ERRORS."""

    def __init__(self, tokenizer: str, dtype: str):
        self.tokenizer, self.dtype = tokenizer, dtype
        self._tok = None

    def setup(self):
        fs.use_beam()
        path = self.tokenizer
        if fs.is_url(path):  # the tokenizer libraries read local files only
            self._tmp = tempfile.TemporaryDirectory(prefix="osp_jax-tokenizer-")
            local = os.path.join(self._tmp.name, fs.basename(path))
            with open(local, "wb") as f:
                f.write(fs.read_bytes(path))
            path = local
        self._tok = tokenizer_lib.load_tokenizer(path)

    def teardown(self):
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()

    def process(self, element):
        index, chunk = element
        try:
            records = tokenizer_lib.encode_documents(self._tok, [text for _, text, _ in chunk], self.dtype)
        except tokenizer_lib.TokenizerError as e:
            yield beam.pvalue.TaggedOutput(ERRORS, cli.one_line(e))
            return
        for (n, _, split), ids in zip(chunk, records):
            yield split, (index, n), ids.tobytes(), len(ids)


class WriteShard(beam.DoFn):
    """((split, bucket), [(key, record, tokens)]) -> the shard's manifest entry, after writing its records,
    sorted by key, to `staging`/SPLIT-bBUCKET-RANDOM.array_record: a name no other attempt uses, so a
    failed or duplicate attempt cannot touch the file the committed one names. A worker holds the shard
    it writes in memory (about --shard-size-mb)."""

    def __init__(self, staging: str):
        self.staging = staging

    def setup(self):
        fs.use_beam()

    def process(self, element):
        (split, bucket), records = element
        records = sorted(records, key=lambda r: r[0])
        name = fs.unique_name(f"{split}-b{bucket:05d}") + ".array_record"
        dest = fs.join(self.staging, name)
        data = (r[1] for r in records)
        if fs.is_url(dest):  # array_record writes local files: write here, then upload whole
            fd, local = tempfile.mkstemp(suffix=".array_record")
            os.close(fd)
            try:
                size = shards_lib.write_shard(local, data)
                fs.upload(local, dest)
            finally:
                os.remove(local)
        else:
            size = shards_lib.write_shard(dest, data)
        yield {"split": split, "bucket": bucket, "staged": name, "documents": len(records),
               "tokens": sum(r[2] for r in records), "bytes": sum(len(r[1]) for r in records),
               "file_bytes": size}


def write_manifest(reports, staging: str) -> None:
    """One JSON file of everything the launcher publishes from: written whole (a retry rewrites it)."""
    manifest = {"shards": [], "files": [], "errors": [], "totals": {}}
    for kind, value in reports:
        if kind == "total":
            split, (documents, tokens, nbytes) = value
            manifest["totals"][split] = {"documents": documents, "tokens": tokens, "bytes": nbytes}
        else:
            manifest[kind + "s"].append(value)
    manifest["shards"].sort(key=lambda s: (s["split"], s["bucket"]))
    manifest["files"].sort(key=lambda f: f["path"])
    manifest["errors"].sort()
    fs.write_bytes_atomic(fs.join(staging, MANIFEST), json.dumps(manifest).encode())
