"""`python -m osp_jax.data.prepare ... --runner=RUNNER [Beam pipeline options]`: the same preparation as
an Apache Beam pipeline (beam_pipeline.py), launched, checked and published from this process.

    prepare --input='gs://b/corpus/*.jsonl.zst' --output=gs://b/tokens --tokenizer=tokenizer.json \\
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp --setup_file=./setup.py

Everything a user can get wrong is checked before the pipeline starts (one line, exit 2): the runner and
its options (Beam's own validator; unknown options), the inputs (globs, and a few bytes of every file),
the tokenizer, the output. Then:
1. the tokenizer is copied into OUTPUT/.tmp-beam-RUN/ (the staging folder), where every worker reads it;
2. the pipeline writes shards and manifest.json there;
3. after it has succeeded, this process checks every shard the manifest names (size; locally also its
   record count) and the totals, renames them to train-00000-of-0000N.array_record ..., and writes
   metadata.json last, in the single-machine format (plus "runner"). The staging folder is removed.
A failed run leaves the previous output as it was; a failed or retried worker leaves only files that no
manifest names.

The tokenizer must be given (tokenizer.json or a SentencePiece model): `train:VOCAB` is refused here.
Training a BPE is one machine's work over one sample held in memory; which sample (how much of each
source) is the user's decision, and a tokenizer made once is reused across corpora and reruns. Train it
with the single-machine path on a sample (`prepare --input=SAMPLE --tokenizer=train:VOCAB`), then pass
its tokenizer.json here: the distributed run is then a pure function of (inputs, tokenizer, options).
"""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import sys
import time
from typing import Sequence

from osp_jax import cli
from osp_jax.data import filesystems as fs
from osp_jax.data import output_dir
from osp_jax.data import prepare as prepare_lib
from osp_jax.data import shards as shards_lib
from osp_jax.data import sources
from osp_jax.data import tokenizer as tokenizer_lib
from osp_jax.data.sources import DataError

STAGING = shards_lib.TMP_PREFIX + "beam"
# Options one of which a Dataflow worker needs to import osp_jax (it is not on the worker image).
_WORKER_PACKAGE_OPTIONS = ("setup_file", "extra_packages", "requirements_file", "sdk_container_image")
_MAX_WARNINGS = 10


def prepare_beam(inputs: str | Sequence[str], output: str, tokenizer: str, *, runner: str,
                 beam_args: Sequence[str] = (), val_fraction: float = prepare_lib.DEFAULT_VAL_FRACTION,
                 text_field: str = "text", split_field: str | None = "split",
                 shard_size_mb: float = prepare_lib.DEFAULT_SHARD_MB, quiet: bool = False,
                 force: bool = False) -> dict:
    """`prepare.prepare` as a Beam pipeline on `runner`, with Beam's options `beam_args`; returns the
    metadata dict. DataError / cli.UserError (one line) for anything wrong before the pipeline starts,
    and for input files found damaged while it ran (then nothing is published)."""
    t0 = time.monotonic()
    say = (lambda m: None) if quiet else prepare_lib.log
    fs.use_beam()  # this process's gs:// paths through Beam's filesystems, as its workers'
    prepare_lib.check_options(val_fraction=val_fraction, shard_size_mb=shard_size_mb)
    options = pipeline_options(runner, beam_args)
    output = output.rstrip("/") if fs.is_url(output) else os.path.abspath(os.path.expanduser(output))
    created = [] if fs.is_url(output) else output_dir.check_output(output)
    input_files = sources.expand_inputs(inputs, exclude=output)
    _check_reachable(options, input_files, output)
    if tokenizer.startswith("train:"):
        raise DataError(f"--tokenizer={tokenizer} with --runner: give a tokenizer file. Train one on a sample "
                        "first without --runner (prepare --input=SAMPLE --tokenizer=train:VOCAB --output=DIR), "
                        "then pass DIR/tokenizer.json")
    want = prepare_lib.wanted(input_files, tokenizer, val_fraction=val_fraction, text_field=text_field,
                              split_field=split_field)
    tok = tokenizer_lib.load_tokenizer(want["tokenizer_source"]["path"])  # unreadable: a DataError here
    sources.check_inputs(input_files)
    job = dict(options=options, input_files=input_files, output=output, tok=tok, want=want,
               shard_bytes=int(shard_size_mb * 2**20), say=say, t0=t0)
    if fs.is_url(output):  # no lock on an object store: one prepare at a time per output is the user's care
        return _reuse_or_run(job, force)
    os.makedirs(output, exist_ok=True)
    try:
        with output_dir.locked(output):
            output_dir.remove_stale_tmp(output)
            return _reuse_or_run(job, force)
    except BaseException:
        output_dir.remove_created(created)
        raise


def _reuse_or_run(job: dict, force: bool) -> dict:
    existing = output_dir.load_existing(job["output"])
    if not force and output_dir.reusable(existing, job["want"], job["output"]):
        job["say"](f"prepare: reusing {job['output']} (same inputs, tokenizer and options)")
        return existing
    return _run(**job)


# ----------------------------------------------------------------------------------------------------
# Options


def pipeline_options(runner: str, beam_args: Sequence[str]):
    """Beam's PipelineOptions for `--runner=runner` and `beam_args`, checked the way the runner will check
    them (Beam's validator), plus: no option Beam does not know (a misspelt one would be ignored)."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
        from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
        from apache_beam.runners.runner import create_runner
    except ImportError:
        raise cli.UserError(f"--runner={runner} needs Apache Beam: pip install 'osp_jax[beam]'") from None
    argv = [f"--runner={runner}", *beam_args]
    with _quiet_beam() as discarded:
        options = PipelineOptions(argv)
        known = options.get_all_options()
        unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown or discarded:
        what = ", ".join([f"--{u}" for u in unknown] + discarded)
        raise cli.UserError(f"unknown pipeline option(s) for --runner={runner}: {what} (see Beam's pipeline "
                            "options; flags of prepare itself use dashes: --val-fraction, --shard-size-mb)")
    try:
        runner_obj = create_runner(runner)
    except (ValueError, ImportError) as e:
        raise cli.UserError(f"--runner={runner}: {cli.one_line(e)}") from None
    with _quiet_beam():
        errors = PipelineOptionsValidator(options, runner_obj).validate()
    if errors:
        raise cli.UserError(f"--runner={runner}: " + " ".join(e.rstrip(".") + "." for e in errors))
    if _is_dataflow(options):
        setup = {k: v for k, v in options.get_all_options().items() if k in _WORKER_PACKAGE_OPTIONS and v}
        if not setup:
            raise cli.UserError(f"--runner={runner}: the workers need osp_jax: pass --setup_file=PATH/setup.py, "
                                "--extra_package=osp_jax-VERSION.tar.gz (python -m build --sdist) or "
                                "--sdk_container_image=IMAGE")
    return options


@contextlib.contextmanager
def _quiet_beam():
    """Holds back Beam's log lines while options are parsed and checked (the user sees one line); yields
    the arguments Beam discarded ("Discarding unparseable args: [...]"), which are reported instead."""
    held: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record.getMessage())

    beam_log = logging.getLogger("apache_beam")
    saved = beam_log.propagate, beam_log.handlers
    beam_log.propagate, beam_log.handlers = False, [Hold()]
    discarded: list[str] = []
    try:
        yield discarded
    finally:
        beam_log.propagate, beam_log.handlers = saved
        for msg in held:
            if msg.startswith("Discarding unparseable args: "):
                with contextlib.suppress(ValueError, SyntaxError):
                    discarded.extend(map(str, ast.literal_eval(msg.split(": ", 1)[1])))


def _is_dataflow(options) -> bool:
    return "Dataflow" in str(options.get_all_options().get("runner") or "")


def _check_reachable(options, input_files, output: str) -> None:
    """Dataflow's workers run elsewhere: every input and the output must be URLs they can reach."""
    if not _is_dataflow(options):
        return
    local = [f.path for f in input_files if not fs.is_url(f.path)] + ([output] if not fs.is_url(output) else [])
    if local:
        raise cli.UserError(f"--runner=DataflowRunner: the workers cannot read local paths ({local[0]}"
                            f"{f' and {len(local) - 1} more' if len(local) > 1 else ''}): put the inputs and "
                            "--output on gs://")


# ----------------------------------------------------------------------------------------------------
# Run and publish


def _run(*, options, input_files, output, tok, want, shard_bytes, say, t0) -> dict:
    import apache_beam as beam
    from apache_beam.runners.runner import PipelineState

    from osp_jax.data import beam_pipeline

    runner = options.get_all_options()["runner"]
    tok_name = "tokenizer.json" if tok.kind == "hf" else "tokenizer.model"
    staging = fs.join(output, fs.unique_name(STAGING))
    fs.makedirs(staging)
    try:
        staged_tok = fs.join(staging, tok_name)
        with open(tok.path, "rb") as f:
            data = f.read()
        try:  # the first write to the output: a store that refuses (no bucket, no permission) says so here
            fs.write_bytes_atomic(staged_tok, data)
        except Exception as e:  # the object stores' clients raise their own types
            raise cli.UserError(f"cannot write to --output {output}: {cli.one_line(e)}") from None
        opts = want["options"]
        pipeline = beam.Pipeline(options=options)
        beam_pipeline.build(pipeline, input_files, staging=staging, tokenizer=staged_tok,
                            dtype=shards_lib.token_dtype(tok.vocab_size), text_field=opts["text_field"],
                            split_field=opts["split_field"], val_fraction=opts["val_fraction"],
                            shard_bytes=shard_bytes)
        say(f"prepare: {len(input_files)} input file(s) through a Beam pipeline on {runner}")
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
        state = pipeline.run().wait_until_finish()
        if state not in (None, PipelineState.DONE):
            raise DataError(f"the pipeline on {runner} ended {state}: nothing was published to {output}")
        manifest = json.loads(fs.read_bytes(fs.join(staging, beam_pipeline.MANIFEST)))
        return publish(manifest, staging=staging, output=output, tok=tok, tok_name=tok_name, want=want,
                       input_files=input_files, runner=runner, say=say, t0=t0)
    finally:
        fs.rmtree(staging)


def publish(manifest: dict, *, staging: str, output: str, tok, tok_name: str, want: dict, input_files,
            runner: str, say, t0: float) -> dict:
    """Checks the pipeline's output against its manifest, then publishes it: shards renamed into place,
    the previous run's shards removed, metadata.json last. DataError, with nothing published, for input
    files that could not be read and for any shard that is not as the manifest says."""
    errors = [f["error"] for f in manifest["files"] if f.get("error")] + manifest["errors"]
    if errors:  # whole files that could not be read, all of them named (the single-machine path stops at one)
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DataError("; ".join(errors[:5]) + more + f"; nothing was published to {output}")
    _warn_skipped(manifest["files"])
    skipped: dict[str, int] = {}
    for f in manifest["files"]:
        for reason, n in f["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    totals = manifest["totals"]
    prepare_lib.check_counts({s: t["documents"] for s, t in totals.items()}, input_files, dict(sorted(skipped.items())))
    shards = {s: [e for e in manifest["shards"] if e["split"] == s] for s in prepare_lib.SPLITS}
    for split, entries in shards.items():
        for i, e in enumerate(entries):
            e["file"] = shards_lib.shard_name(split, i, len(entries))
            _verify(fs.join(staging, e["staged"]), e)
        got = {k: sum(e[k] for e in entries) for k in ("documents", "tokens", "bytes")}
        if got != totals.get(split, dict.fromkeys(got, 0)):
            raise DataError(f"the {split} shards hold {got}, the pipeline counted {totals.get(split)}: "
                            f"nothing was published to {output}")
    val_fraction = want["options"]["val_fraction"]
    if not shards["validation"] and val_fraction > 0:
        prepare_lib.log(f"warning: no document fell into validation (val-fraction {val_fraction}, "
                        f"{totals['train']['documents']} documents)")

    # Publish: drop the old metadata first, so that a crash from here on leaves DIR visibly incomplete.
    fs.delete(fs.join(output, "metadata.json"))
    keep = set()
    for entries in shards.values():
        for e in entries:
            fs.rename(fs.join(staging, e.pop("staged")), fs.join(output, e["file"]))
            keep.add(e["file"])
            del e["split"], e["bucket"]
    for name in fs.listdir(output):
        if shards_lib.SHARD_RE.match(name) and name not in keep:
            fs.delete(fs.join(output, name))
    fs.rename(fs.join(staging, tok_name), fs.join(output, tok_name))
    if not fs.is_url(output):
        cli.fsync(output)
    elapsed = time.monotonic() - t0
    splits = {s: {"documents": sum(e["documents"] for e in shards[s]), "tokens": sum(e["tokens"] for e in shards[s]),
                  "shards": shards[s]} for s in prepare_lib.SPLITS}
    by_file = {f["path"]: f["skipped"] for f in manifest["files"] if f["skipped"]}
    meta = prepare_lib.metadata(tok, tok_name, fs.sha256(fs.join(output, tok_name)), splits, dict(sorted(skipped.items())),
                                by_file, want, elapsed, runner=runner)
    text = json.dumps(cli.finite_or_none(meta), indent=2, allow_nan=False) + "\n"
    fs.write_bytes_atomic(fs.join(output, "metadata.json"), text.encode())  # last: DIR is complete
    say(prepare_lib.summary(output, meta, elapsed))
    return meta


def _verify(path: str, entry: dict) -> None:
    """DataError unless the staged shard is the file the committed attempt wrote: its size, and locally
    its record count."""
    try:
        size = fs.stat(path).size
    except FileNotFoundError:
        size = None
    problem = None
    if size != entry["file_bytes"]:
        problem = "is missing" if size is None else f"has {size} bytes, the pipeline wrote {entry['file_bytes']}"
    elif not fs.is_url(path) and shards_lib.record_count(path) != entry["documents"]:
        problem = f"does not hold the {entry['documents']} records the pipeline wrote"
    if problem:
        raise DataError(f"shard {path} {problem}: nothing was published")


def _warn_skipped(files: list[dict]) -> None:
    """The first few bad records of the run, named file:line as the single-machine path names them."""
    shown = 0
    for f in files:
        for w in f.get("warnings", []):
            if shown == _MAX_WARNINGS:
                prepare_lib.log("warning: further skipped records are counted but not reported")
                return
            if not w.startswith("further skipped"):
                print(f"warning: {w}", file=sys.stderr, flush=True)
                shown += 1
