"""Text -> tokens -> ArrayRecord shards, ready for the Grain pipeline.

    python -m osp_jax.data.prepare --input='data/*.jsonl.zst' --output=DIR --tokenizer=tokenizer.json \
        [--val-fraction=0.02] [--text-field=text] [--workers=N]
    python -m osp_jax.data.prepare ... --runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner [BEAM OPTIONS]

With --runner the same preparation runs as an Apache Beam pipeline (osp_jax/data/beam_prepare.py, the
[beam] extra), Beam's own pipeline options passed through; without it, in this process as below.

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
reason, and by input file in metadata["skipped_by_file"]; a file that cannot be read whole stops prepare
with an error naming it (sources.py states the rule). Nothing under DIR is ever read as input.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

from etils import epath

from osp_jax import cli, storage
from osp_jax.data import filesystems as fs
from osp_jax.data import shards as shards_lib
from osp_jax.data import sources
from osp_jax.data.output_dir import (OutputNotWritable, check_output, load_existing, locked,  # noqa: F401
                                     remove_created, remove_stale_tmp, reusable)
from osp_jax.data.shards import token_dtype  # noqa: F401 - re-exported: it was defined here
from osp_jax.data.sources import DataError, Document, SkipLog
from osp_jax.data import tokenizer as tokenizer_lib
from osp_jax.data.tokenize_workers import CHUNK_CHARS, CHUNK_DOCS, _Progress, _tokenized  # noqa: F401 - were here

FORMAT = "osp_jax.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_MB = 256
def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic hold-out by content: the same text always falls on the same side."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Kept for old imports: `cli.write_text_atomic` of UTF-8 `data` (metadata.json goes through
    `cli.write_json`)."""
    cli.write_text_atomic(path, data.decode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# prepare


def _tokenizer_source(spec: str) -> dict:
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise DataError(f"--tokenizer={spec!r}: expected train:VOCAB with an integer VOCAB") from None
        return {"train_vocab": vocab}
    path = storage.normalized(tokenizer_lib.resolve_tokenizer_path(storage.normalized(spec)))
    return {"path": path, "sha256": tokenizer_lib.file_sha256(path)}


def prepare(inputs: str | Sequence[str], output: str, tokenizer: str, *,
            val_fraction: float = DEFAULT_VAL_FRACTION, text_field: str = "text",
            split_field: str | None = "split", workers: int = 1, shard_size_mb: float = DEFAULT_SHARD_MB,
            quiet: bool = False, force: bool = False) -> dict:
    """Tokenises `inputs` into ArrayRecord shards under `output`; returns the metadata dict.

    Raises DataError (a user error, message names the file) for missing inputs, an unreadable
    tokenizer, or no valid document.
    """
    check_options(val_fraction=val_fraction, shard_size_mb=shard_size_mb)
    if workers < 1:
        raise DataError(f"--workers={workers}: expected a positive integer")
    say = (lambda m: None) if quiet else log
    output = storage.normalized(output)
    remote = storage.is_remote(output)
    created = [] if remote else check_output(output)  # a gs:// output is checked by the CLI (storage.check_all)
    input_files = sources.expand_inputs(inputs, exclude=output)
    want = wanted(input_files, tokenizer, val_fraction=val_fraction, text_field=text_field,
                  split_field=split_field)
    sources.check_inputs(input_files)
    if not remote:
        os.makedirs(output, exist_ok=True)
    try:
        with (contextlib.nullcontext() if remote else locked(output)), _staging(output) as stage:
            if not force and reusable(load_existing(output), want, output):
                say(f"prepare: reusing {output} (same inputs, tokenizer and options)")
                return load_existing(output)
            remove_stale_tmp(output)  # on gs://, with no lock there: two prepares into one output are the user's to avoid
            return _prepare_locked(input_files, output, want, stage=stage, text_field=text_field,
                                   split_field=split_field, workers=workers, shard_bytes=int(shard_size_mb * 2**20),
                                   say=say, quiet=quiet)
    except BaseException:
        remove_created(created)
        raise


@contextlib.contextmanager
def _staging(output: str):
    """Where the shards and the tokenizer are written first: `output` itself on a local disk, a temporary local
    directory (removed on leaving) for a gs:// output (array_record and the tokenizer libraries write local
    files); each shard is uploaded once closed, metadata.json last."""
    if not storage.is_remote(output):
        yield output
        return
    with tempfile.TemporaryDirectory(prefix="osp_jax-prepare-") as stage:
        yield stage


def check_options(*, val_fraction: float, shard_size_mb: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction}: expected a number in [0, 1)")
    if not shard_size_mb > 0:
        raise DataError(f"--shard-size-mb={shard_size_mb}: expected a positive number")


def wanted(input_files, tokenizer: str, *, val_fraction: float, text_field: str, split_field: str | None) -> dict:
    """What an output must have been made from to be reused: metadata.json's identifying keys."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "inputs": sources.fingerprint(input_files),
        "tokenizer_source": _tokenizer_source(tokenizer),
        "options": {"val_fraction": val_fraction, "text_field": text_field, "split_field": split_field},
    }


def split_of(doc: Document, val_fraction: float) -> str:
    """A document's split: its record's split field, else a hash of its text against val_fraction."""
    if doc.split is not None:
        return doc.split
    return "validation" if is_validation(doc.text, val_fraction) else "train"


def _prepare_locked(input_files, output, want, *, stage, text_field, split_field, workers, shard_bytes, say,
                    quiet) -> dict:
    t0 = time.monotonic()
    val_fraction = want["options"]["val_fraction"]
    doc_split = functools.partial(split_of, val_fraction=val_fraction)
    tok_name, tmp_tok = _stage_tokenizer(want["tokenizer_source"], input_files, stage, say=say,
                                         text_field=text_field, split_field=split_field, split_of=doc_split)
    try:
        tok = tokenizer_lib.load_tokenizer(tmp_tok)
        writers, shards, skips = _write_splits(input_files, stage, tmp_tok, text_field=text_field,
                                               split_field=split_field, split_of=doc_split, workers=workers,
                                               shard_bytes=shard_bytes, quiet=quiet,
                                               upload_to=output if stage != output else None)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_tok)
        raise
    if writers["validation"].documents == 0 and val_fraction > 0:
        log(f"warning: no document fell into validation (val-fraction {val_fraction}, "
            f"{writers['train'].documents} documents)")

    # Publish: drop the old metadata first, so a crash from here on leaves DIR visibly incomplete.
    storage.remove(epath.Path(output) / "metadata.json")
    shards_lib.publish(output, shards)
    if stage == output:
        os.replace(tmp_tok, os.path.join(output, tok_name))
        cli.fsync(output)
    else:
        storage.upload(tmp_tok, epath.Path(output) / tok_name)

    elapsed = time.monotonic() - t0
    splits = {s: {"documents": writers[s].documents, "tokens": writers[s].tokens, "shards": shards[s]}
              for s in SPLITS}
    meta = metadata(tok, tok_name, tokenizer_lib.file_sha256(epath.Path(output) / tok_name), splits, skips.as_dict(),
                    skips.by_file_dict(), want, elapsed)
    cli.write_json(epath.Path(output) / "metadata.json", meta)  # last: its presence means DIR is complete
    say(summary(output, meta, elapsed))
    return meta


def metadata(tok, tok_name: str, tok_sha256: str, splits: dict, skipped: dict, skipped_by_file: dict, want: dict,
             elapsed: float, **extra) -> dict:
    """metadata.json: the one format both the single-machine and the Beam path write."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": tok_name,
        "tokenizer_sha256": tok_sha256,
        "tokenizer_kind": tok.kind,
        "dtype": shards_lib.token_dtype(tok.vocab_size),
        "splits": splits,
        "skipped": skipped,
        "skipped_by_file": skipped_by_file,  # {input file: {reason: count}}, files with a skipped record
        "inputs": want["inputs"],
        "tokenizer_source": want["tokenizer_source"],
        "options": want["options"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 3),
        **extra,
    }


def summary(output: str, meta: dict, elapsed: float) -> str:
    tr, va = meta["splits"]["train"], meta["splits"]["validation"]
    return (f"prepare: wrote {output}: train {tr['documents']:,} docs / {tr['tokens']:,} tokens in "
            f"{len(tr['shards'])} shard(s), validation {va['documents']:,} docs / {va['tokens']:,} tokens; "
            f"skipped {sum(meta['skipped'].values())} {meta['skipped'] or ''} ({elapsed:.1f} s)")


def _stage_tokenizer(src: dict, input_files, stage: str, *, say, text_field, split_field,
                     split_of) -> tuple[str, str]:
    """(final name, .tmp- path in the local directory `stage`) of the tokenizer DIR will keep: trained on the
    training documents, or a copy of the given file."""
    if "train_vocab" not in src:
        tok_name = "tokenizer.json" if tokenizer_lib.load_tokenizer(src["path"]).kind == "hf" else "tokenizer.model"
        tmp_tok = shards_lib.tmp_name(stage, tok_name)
        with storage.open_read(src["path"]) as f_in, open(tmp_tok, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
        return tok_name, tmp_tok
    say(f"prepare: training a byte-level BPE with vocabulary {src['train_vocab']} on the inputs")
    n_train = [0]

    def train_texts():
        for d in sources.iter_documents(input_files, text_field, SkipLog(warn=lambda m: None), split_field):
            if split_of(d) == "train":
                n_train[0] += 1
                yield d.text

    tok = tokenizer_lib.train_bpe(train_texts(), src["train_vocab"])
    if n_train[0] == 0:
        raise DataError(f"no valid training documents in {len(input_files)} input(s) to train a tokenizer on")
    tmp_tok = shards_lib.tmp_name(stage, "tokenizer.json")
    tok.save(tmp_tok)
    return "tokenizer.json", tmp_tok


def _write_splits(input_files, stage: str, tokenizer_path: str, *, text_field, split_field, split_of, workers,
                  shard_bytes, quiet, upload_to: str | None = None) -> tuple[dict, dict, SkipLog]:
    """Reads, tokenises and writes every document into .tmp- shards of its split in the local directory `stage`
    (uploaded to `upload_to` as each closes, if given): (writers, shards, skips) by split. On any failure its
    .tmp- shards are removed."""
    skips = SkipLog()
    writers = {s: shards_lib.ShardWriter(stage, s, shard_bytes, upload_to=upload_to) for s in SPLITS}
    progress = _Progress(enabled=not quiet, files=len(input_files))

    def documents():
        for progress.file, inp in enumerate(input_files, 1):
            yield from sources.read_documents(inp, text_field, skips, split_field)

    try:
        for doc, ids in _tokenized(documents(), tokenizer_path, workers):
            writers[split_of(doc)].write(ids.tobytes(), len(ids))
            progress.update(1, len(ids))
        progress.close()
        check_counts({s: w.documents for s, w in writers.items()}, input_files, skips.as_dict())
        return writers, {s: w.finish() for s, w in writers.items()}, skips
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def check_counts(documents: dict[str, int], input_files, skipped: dict) -> None:
    """DataError when nothing can be trained on: no valid document, or none in train."""
    total = sum(documents.values())
    if total == 0:
        names = ", ".join(f.path for f in input_files[:3]) + (", ..." if len(input_files) > 3 else "")
        raise DataError(f"no valid documents in {len(input_files)} input(s) ({names}); "
                        f"skipped: {skipped or 'none'}")
    if documents.get("train", 0) == 0:
        raise DataError(f"all {total} documents went to validation: lower --val-fraction or fix the "
                        "records' split field")


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
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default 1; not with --runner)")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB,
                   help=f"start a new shard past this many MB (default {DEFAULT_SHARD_MB})")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--runner", metavar="RUNNER",
                   help="run as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, FlinkRunner, "
                        "SparkRunner; needs osp_jax[beam]); Beam's pipeline options (--project, --temp_location, "
                        "--direct_num_workers, ...) follow as they are")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 2 user error: one line `error: ...`, 130 interrupted)."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and not args.runner:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need --runner)")
    return cli.guarded("", lambda: _main(args, beam_args), {DataError: "error", cli.UserError: "error"})


def _main(args: argparse.Namespace, beam_args: list[str]) -> None:
    options = dict(val_fraction=args.val_fraction, text_field=args.text_field, split_field=args.split_field or None,
                   shard_size_mb=args.shard_size_mb, quiet=args.quiet, force=args.force)
    if not args.runner:  # the gs:// paths' buckets, credentials and permissions, at start (Beam checks its own)
        inputs = [p.strip() for pat in args.input for p in fs.split_patterns(pat) if p.strip()]
        tokenizer = "" if args.tokenizer.startswith("train:") else args.tokenizer
        storage.check_all(reads=[("--tokenizer", tokenizer)] + [("--input", p) for p in inputs],
                          writes={"--output": args.output})
    try:
        if args.runner:
            if args.workers is not None:
                raise cli.UserError("--workers is the single-machine path's; with --runner, set the runner's own "
                                    "(--direct_num_workers, --num_workers, ...)")
            from osp_jax.data import beam_prepare  # imports nothing of Beam until it runs

            beam_prepare.prepare_beam(args.input, args.output, args.tokenizer, runner=args.runner,
                                      beam_args=beam_args, **options)
        else:
            prepare(args.input, args.output, args.tokenizer, workers=1 if args.workers is None else args.workers,
                    **options)
    except DataError:
        raise  # (output_dir.OutputNotWritable is an OSError too, with its own message)
    except OSError as e:  # e.g. an output directory that cannot be written
        raise cli.UserError(f"{e.filename}: {e.strerror or e}" if e.filename else str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
