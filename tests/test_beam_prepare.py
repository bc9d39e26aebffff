"""prepare --runner=DirectRunner: the same documents, splits and counts as the single-machine path, the same
bytes whatever the workers, train reads the output, nothing published by a failed run or a stray attempt,
gs:// through Beam's filesystems on the GCS emulator, and bad input refused in one line."""
import collections
import gzip
import json
import lzma
import os
import subprocess
import sys
import types

import pytest

from osp_jax.data import prepare as prep
from tests.conftest import require
from tests.helpers import ROOT
from tests.test_prepare import TOKENIZER, write_jsonl

beam = require("apache_beam")
from osp_jax.data import beam_prepare  # noqa: E402 - needs apache_beam

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IN_PROCESS = ["--direct_running_mode=in_memory"]


def corpus_docs(n=160):
    """Real text: the first documents of the built-in corpus (Austen, the Bible, ...), with its split field."""
    from osp_jax.data.pipeline import builtin_files

    with lzma.open(builtin_files()[0], "rt") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Several files of several kinds, some bad records among them, some records with a split field."""
    d = tmp_path_factory.mktemp("corpus")
    docs = corpus_docs()
    texts = [r["text"] for r in docs]
    write_jsonl(d / "a.jsonl", [{"text": t} for t in texts[:50]])
    with open(d / "a.jsonl", "ab") as f:  # bad records, counted by kind and named by file
        f.write(b"{not json\n" + json.dumps({"body": "no text"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    write_jsonl(d / "b.jsonl.gz", [{"text": t, "split": r["split"]} for t, r in zip(texts[50:100], docs[50:100])],
                gzip.open)
    (d / "c").mkdir()
    for i, t in enumerate(texts[100:120]):
        (d / "c" / f"{i:02d}.txt").write_text(t)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[120:] + ["  "]}), d / "d.parquet", row_group_size=9)
    return d


def records(out):
    """Counter of (split, record bytes), and metadata.json."""
    from array_record.python.array_record_module import ArrayRecordReader

    meta = json.loads((out / "metadata.json").read_text())
    got = collections.Counter()
    for split, info in meta["splits"].items():
        for s in info["shards"]:
            r = ArrayRecordReader(str(out / s["file"]))
            got.update((split, b) for b in r.read_all())
            r.close()
    return got, meta


def run_cli(capsys, *args):
    rc = prep.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def prepare_args(corpus, out, *extra):
    return [f"--input={corpus}", f"--output={out}", f"--tokenizer={TOKENIZER}", "--val-fraction=0.1",
            "--shard-size-mb=0.05", *extra]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert prep.main(prepare_args(corpus, out, "--quiet")) == 0
    return out


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_beam_matches_single_machine_and_is_the_same_for_any_worker_count(corpus, single, tmp_path, capsys):
    want, want_meta = records(single)
    outputs = {}
    for name, opts in (("two_processes", MULTI), ("in_process", IN_PROCESS)):
        out = tmp_path / name
        rc, err = run_cli(capsys, *prepare_args(corpus, out, "--runner=DirectRunner", *opts))
        assert rc == 0, err
        assert f"{corpus / 'a.jsonl'}:51: skipped (bad_json)" in err  # bad records named, as without Beam
        got, meta = records(out)
        assert got == want  # the multiset of (split, document tokens)
        for key in ("format", "format_version", "vocab_size", "eos_id", "pad_id", "dtype", "tokenizer",
                    "tokenizer_sha256", "tokenizer_kind", "skipped", "skipped_by_file", "inputs",
                    "tokenizer_source", "options"):
            assert meta[key] == want_meta[key], key
        for split in ("train", "validation"):
            for key in ("documents", "tokens"):
                assert meta["splits"][split][key] == want_meta["splits"][split][key]
            assert meta["splits"][split]["documents"] == sum(s["documents"] for s in meta["splits"][split]["shards"])
        assert set(meta) == set(want_meta) | {"runner"} and meta["runner"] == "DirectRunner"
        assert meta["skipped_by_file"] == {str(corpus / "a.jsonl"): {"bad_json": 1, "bad_utf8": 1, "missing_field": 1},
                                           str(corpus / "d.parquet"): {"empty": 1}}
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # the staging folder is gone
        outputs[name] = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".array_record")}
    assert len(outputs["in_process"]) > 2
    assert outputs["two_processes"] == outputs["in_process"]  # the same shards, byte for byte

    rc, err = run_cli(capsys, *prepare_args(corpus, tmp_path / "in_process", "--runner=DirectRunner", *IN_PROCESS))
    assert rc == 0 and "reusing" in err


@pytest.mark.slow
def test_train_runs_on_the_beam_output(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_cli(capsys, *prepare_args(corpus, out, "--runner=DirectRunner", *MULTI))[0] == 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "osp_jax.train", f"--config={ROOT / 'configs/tiny.py'}",
                           f"--workdir={tmp_path / 'run'}", f"--config.data.path={out}", "--config.train.steps=3",
                           "--config.train.eval_every=3", "--config.train.outlier_every=3",
                           "--config.train.checkpoint_every=3", "--config.train.log_every=1",
                           "--config.optimizer.warmup_steps=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and "val_loss" in rows[-1]


# ----------------------------------------------------------------------------------------------------
# Failed and stray attempts publish nothing


def test_a_failed_worker_leaves_the_previous_output(corpus, single, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, *prepare_args(corpus, out, "--runner=DirectRunner", *IN_PROCESS))[0] == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    from osp_jax.data import shards

    real = shards.write_shard

    def dies_halfway(path, data):  # a worker that writes part of a shard and dies
        real(path, list(data)[:1])
        raise RuntimeError("worker lost")

    monkeypatch.setattr(shards, "write_shard", dies_halfway)
    with pytest.raises(Exception, match="worker lost"):
        beam_prepare.prepare_beam(str(corpus), str(out), TOKENIZER, runner="DirectRunner", beam_args=IN_PROCESS,
                                  val_fraction=0.2, shard_size_mb=0.05, quiet=True)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # staging removed, nothing replaced


@pytest.mark.parametrize("case", ["stray_attempt", "shard_cut_short"])
def test_publish_uses_only_the_shards_the_manifest_names_and_checks_them(corpus, single, tmp_path, monkeypatch,
                                                                         capsys, case):
    """A duplicate (speculative or retried) attempt leaves another file for the same shard: it is not the
    one published. A shard that is not as the committed attempt wrote it stops the publication."""
    out = tmp_path / "out"
    real = beam_prepare.publish

    def publish(manifest, *, staging, **kw):
        entry = manifest["shards"][0]
        staged = os.path.join(staging, entry["staged"])
        if case == "stray_attempt":
            stray = os.path.join(staging, entry["staged"].replace(".array_record", "-stray.array_record"))
            with open(stray, "wb") as f:
                f.write(b"half a shard")
        else:
            with open(staged, "r+b") as f:
                f.truncate(entry["file_bytes"] // 2)
        return real(manifest, staging=staging, **kw)

    monkeypatch.setattr(beam_prepare, "publish", publish)
    rc, err = run_cli(capsys, *prepare_args(corpus, out, "--runner=DirectRunner", *IN_PROCESS))
    if case == "stray_attempt":
        assert rc == 0, err
        assert records(out)[0] == records(single)[0]
        assert not [n for n in os.listdir(out) if "stray" in n or n.startswith(".tmp-")]
    else:
        last = err.splitlines()[-1]
        assert rc == 2 and last.startswith("error: shard ") and " has " in last and "nothing was published" in last
        assert not out.exists()  # made by this run, removed with it


def test_a_damaged_file_found_while_the_pipeline_runs_is_named(corpus, tmp_path, capsys):
    """Damage a cheap look cannot see (inside a gzip stream): found by the workers, every such file named
    at the end, nothing published."""
    src = tmp_path / "in"
    src.mkdir()
    data = gzip.compress(b"".join((json.dumps({"text": f"doc {i} " * 50}) + "\n").encode() for i in range(400)))
    for name in ("x.jsonl.gz", "y.jsonl.gz"):
        (src / name).write_bytes(data[: len(data) // 2])
    write_jsonl(src / "fine.jsonl", [{"text": "a fine document"}])
    rc, err = run_cli(capsys, f"--input={src}", f"--output={tmp_path / 'out'}", f"--tokenizer={TOKENIZER}",
                      "--runner=DirectRunner", *IN_PROCESS)
    last = err.splitlines()[-1]  # after the line saying the pipeline runs: the one error
    assert rc == 2 and [l for l in err.splitlines() if l.startswith("error")] == [last], err
    assert f"error reading {src / 'x.jsonl.gz'}: truncated" in last and f"{src / 'y.jsonl.gz'}" in last
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the pipeline starts, nothing left behind


@pytest.mark.parametrize("case", ["missing_glob", "bad_tokenizer", "train_vocab", "dataflow_without_options",
                                  "dataflow_local_paths", "dataflow_without_package", "unknown_option",
                                  "stray_argument",
                                  "unknown_runner", "workers_flag", "beam_option_without_runner"])
def test_bad_input_with_a_runner(tmp_path, capsys, monkeypatch, case):
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    # Beam's validator asks GCS whether the temp bucket has soft delete on (a warning); no network here.
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled", lambda self, arg: None)
    good = tmp_path / "in.jsonl"
    write_jsonl(good, [{"text": "hello"}])
    out = tmp_path / "out"
    inp, tok, extra, expect = good, TOKENIZER, ["--runner=DirectRunner"], None
    dataflow = ["--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
                "--temp_location=gs://my-bucket/tmp"]
    if case == "missing_glob":
        inp, expect = tmp_path / "none*.jsonl", "matches no file"
    elif case == "bad_tokenizer":
        (tmp_path / "tok.json").write_text("{ not a tokenizer")
        tok, expect = tmp_path / "tok.json", f"cannot read tokenizer {tmp_path / 'tok.json'}"
    elif case == "train_vocab":
        tok, expect = "train:300", "--tokenizer=train:300 with --runner: give a tokenizer file"
    elif case == "dataflow_without_options":
        extra, expect = ["--runner=DataflowRunner"], "Missing required option: project"
    elif case == "dataflow_local_paths":
        extra, expect = dataflow + ["--setup_file=./setup.py"], f"cannot read local paths ({good}"
    elif case == "dataflow_without_package":
        extra, expect = dataflow, "the workers need osp_jax: pass --setup_file"
    elif case == "unknown_option":
        extra, expect = ["--runner=DirectRunner", "--direct_num_worker=2"], "unknown pipeline option(s)"
    elif case == "stray_argument":
        extra, expect = ["--runner=DirectRunner", "stray"], "unknown pipeline option(s) for --runner=DirectRunner: stray"
    elif case == "unknown_runner":
        extra, expect = ["--runner=NoSuchRunner"], "--runner=NoSuchRunner"
    elif case == "workers_flag":
        extra, expect = ["--runner=DirectRunner", "--workers=2"], "--workers is the single-machine path's"
    elif case == "beam_option_without_runner":
        extra, expect = ["--direct_num_workers=2"], "need --runner"
    if case == "beam_option_without_runner":  # argparse's own refusal: usage line, then the error
        with pytest.raises(SystemExit) as e:
            prep.main([f"--input={inp}", f"--output={out}", f"--tokenizer={tok}", *extra])
        assert e.value.code == 2 and expect in capsys.readouterr().err
    else:
        rc, err = run_cli(capsys, f"--input={inp}", f"--output={out}", f"--tokenizer={tok}", *extra)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl"] + (["tok.json"] if case == "bad_tokenizer" else []))


# ----------------------------------------------------------------------------------------------------
# gs:// through Beam's filesystems


@pytest.fixture
def beam_on_emulator(gcs_bucket, monkeypatch):
    """Beam's GCS client on the emulator. Two settings the emulator needs, nothing else changed: no
    credentials (google-auth would spend ~30 s of retries looking for them, then go anonymous anyway), and
    each request of a JSON batch sent on its own (fake-gcs-server has no batch endpoint; Beam's rename and
    delete use one)."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp import gcsio
    from google.cloud.exceptions import NotFound

    def unbatched(self, requests, fn):
        responses = []
        for r in requests:
            try:
                fn(r)
                responses.append(types.SimpleNamespace(status_code=200))
            except NotFound:
                responses.append(types.SimpleNamespace(status_code=404))
        return responses

    monkeypatch.setattr(auth, "get_service_credentials", lambda options: None)
    monkeypatch.setattr(gcsio.GcsIO, "_batch_with_retry", unbatched)
    return gcs_bucket


def test_gcs_inputs_and_output_through_beam_filesystems(corpus, single, beam_on_emulator, tmp_path, capsys):
    from osp_jax.data import filesystems as fs

    bucket = beam_on_emulator
    for root, _, files in os.walk(corpus):
        for name in files:
            local = os.path.join(root, name)
            fs.upload(local, f"{bucket}/corpus/{os.path.relpath(local, corpus)}")
    out = f"{bucket}/tokens"
    args = [f"--input={bucket}/corpus", f"--output={out}", f"--tokenizer={TOKENIZER}", "--val-fraction=0.1",
            "--shard-size-mb=0.05", "--runner=DirectRunner", *IN_PROCESS]
    rc, err = run_cli(capsys, *args)
    assert rc == 0, err
    local = tmp_path / "copy"
    local.mkdir()
    names = fs.listdir(out)
    assert "metadata.json" in names and not [n for n in names if n.startswith(".tmp-")]
    for name in names:
        (local / name).write_bytes(fs.read_bytes(f"{out}/{name}"))
    got, meta = records(local)
    want, want_meta = records(single)
    assert got == want
    assert meta["splits"]["train"]["tokens"] == want_meta["splits"]["train"]["tokens"]
    assert all(f["path"].startswith(f"{bucket}/corpus/") for f in meta["inputs"])
    assert run_cli(capsys, *args)[1].count("reusing") == 1
