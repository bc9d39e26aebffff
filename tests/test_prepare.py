"""prepare: every input kind, tokenizer kinds, reuse, atomic writes, and the messages for bad input."""
import gzip
import io
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

from osp_jax.data import prepare as prep
from osp_jax.data import sources
from osp_jax.data.pipeline import builtin_files
from osp_jax.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = builtin_files()[1]
WORDS = ("the quick brown fox jumps over a lazy dog while pride and prejudice sit in the garden "
         "of eden reading python tutorials about lists dicts and generators").split()


def make_docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 120))))
            for i in range(n)]


DOCS = make_docs()


def read_records(out, split="train"):
    from array_record.python.array_record_module import ArrayRecordReader

    meta = json.load(open(os.path.join(out, "metadata.json")))
    docs = []
    for s in meta["splits"][split]["shards"]:
        r = ArrayRecordReader(os.path.join(out, s["file"]))
        docs += [np.frombuffer(b, meta["dtype"]) for b in r.read_all()]
        r.close()
    return meta, docs


def expected_tokens(texts):
    tok = load_tokenizer(TOKENIZER)
    return [np.array(tok.encode(t) + [tok.eos_id]) for t in texts]


def write_jsonl(path, records, opener=open):
    with opener(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())


def write_kind(tmp_path, kind, texts):
    """Writes `texts` as one input of `kind`; returns the --input pattern."""
    recs = [{"text": t, "id": i} for i, t in enumerate(texts)]
    if kind == "txt":
        d = tmp_path / "txt"
        d.mkdir()
        for i, t in enumerate(texts):
            (d / f"doc{i:03d}.txt").write_text(t)
        return str(d / "*.txt")
    if kind == "jsonl":
        write_jsonl(tmp_path / "a.jsonl", recs)
        return str(tmp_path / "a.jsonl")
    if kind == "jsonl.gz":
        write_jsonl(tmp_path / "a.jsonl.gz", recs, gzip.open)
        return str(tmp_path / "a.jsonl.gz")
    if kind == "jsonl.xz":
        write_jsonl(tmp_path / "a.jsonl.xz", recs, lzma.open)
        return str(tmp_path / "a.jsonl.xz")
    if kind == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        data = b"".join((json.dumps(r) + "\n").encode() for r in recs)
        (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        return str(tmp_path / "a.jsonl.zst")
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    if kind == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
        return str(tmp_path / "a.parquet")
    if kind == "hf_dataset":  # the layout `datasets.Dataset.save_to_disk` writes
        d = tmp_path / "hf"
        d.mkdir()
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table, max_chunksize=9)
        (d / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "x",
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None}))
        (d / "dataset_info.json").write_text(json.dumps({
            "citation": "", "description": "", "homepage": "", "license": "",
            "features": {"id": {"dtype": "int64", "_type": "Value"},
                         "text": {"dtype": "string", "_type": "Value"}}}))
        return str(d)
    raise AssertionError(kind)


KINDS = ["txt", "jsonl", "jsonl.gz", "jsonl.xz", "jsonl.zst", "parquet", "hf_dataset"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_input_kind(tmp_path, kind):
    pattern = write_kind(tmp_path, kind, DOCS)
    out = tmp_path / "out"
    meta = prep.prepare(pattern, str(out), TOKENIZER, val_fraction=0.0, quiet=True)
    _, docs = read_records(out)
    want = expected_tokens(DOCS)
    assert len(docs) == len(want) == meta["splits"]["train"]["documents"]
    for got, exp in zip(docs, want):
        np.testing.assert_array_equal(got, exp)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 4096 and meta["eos_id"] == 0
    assert meta["pad_id"] == 1 and meta["tokenizer"] == "tokenizer.json"
    assert meta["splits"]["train"]["tokens"] == sum(map(len, want))
    assert os.path.isfile(out / "tokenizer.json")
    assert meta["inputs"] and all({"path", "size", "mtime_ns"} <= set(f) for f in meta["inputs"])


def test_hf_dataset_dict_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    root = tmp_path / "dd"
    for split, texts in (("train", DOCS[:30]), ("test", DOCS[30:])):
        (root / split).mkdir(parents=True)
        table = pa.table({"text": texts})
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
        (root / split / "state.json").write_text(json.dumps(
            {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    out = tmp_path / "out"
    # The splits decide, not the hash: none of the 30 train documents is held out, even at 0.5.
    meta = prep.prepare(str(root), str(out), TOKENIZER, val_fraction=0.5, quiet=True)
    assert meta["splits"]["train"]["documents"] == 30 and meta["splits"]["validation"]["documents"] == 10
    _, val_docs = read_records(out, "validation")
    assert [list(d) for d in val_docs] == [list(d) for d in expected_tokens(DOCS[30:])]
    assert [f.get("split") for f in meta["inputs"]] == ["train", "test"]


def test_glob_of_several_kinds_and_validation_holdout(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS[:20]])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in DOCS[20:]], gzip.open)
    (tmp_path / "c.txt").write_text("A plain text document.")
    (tmp_path / "notes.csv").write_text("ignored,1")
    out = tmp_path / "out"
    meta = prep.prepare(str(tmp_path / "*"), str(out), TOKENIZER, val_fraction=0.3, quiet=True)
    tr, va = meta["splits"]["train"]["documents"], meta["splits"]["validation"]["documents"]
    assert tr + va == 41 and 0 < va < 41
    # Deterministic: hashed on the text, so the same documents are held out every time.
    held = {t for t in DOCS + ["A plain text document."] if prep.is_validation(t, 0.3)}
    assert len(held) == va
    _, val_docs = read_records(out, "validation")
    assert sorted(map(tuple, val_docs)) == sorted(map(tuple, expected_tokens(sorted(held))))


def test_split_field_overrides_hash(tmp_path):
    recs = [{"text": t, "split": "validation" if i % 4 == 0 else "train"} for i, t in enumerate(DOCS)]
    write_jsonl(tmp_path / "a.jsonl", recs)
    meta = prep.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "out"), TOKENIZER, val_fraction=0.0,
                        quiet=True)
    assert meta["splits"]["validation"]["documents"] == 10


def test_train_tokenizer(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    meta = prep.prepare(str(tmp_path / "a.jsonl"), str(out), "train:300", val_fraction=0.0, quiet=True)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert meta["vocab_size"] == tok.vocab_size <= 300 and meta["eos_id"] == tok.eos_id == 0
    assert meta["tokenizer_source"] == {"train_vocab": 300}
    _, docs = read_records(out)
    assert tok.decode(docs[3][:-1]) == DOCS[3]


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 3), model_writer=model, vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    meta = prep.prepare(str(tmp_path / "a.jsonl"), str(out), str(tmp_path / "sp.model"), val_fraction=0.0,
                        quiet=True)
    assert meta["tokenizer"] == "tokenizer.model" and meta["tokenizer_kind"] == "sentencepiece"
    tok = load_tokenizer(str(out / "tokenizer.model"))
    _, docs = read_records(out)
    assert docs[0][-1] == tok.eos_id == meta["eos_id"]
    assert tok.decode(docs[0][:-1]) == DOCS[0]


def test_reuse_rebuild_and_atomic_output(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    args = [f"--input={src}", f"--output={out}", f"--tokenizer={TOKENIZER}", "--val-fraction=0.2",
            "--shard-size-mb=0.0005"]
    assert prep.main(args) == 0
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".tmp-")]
    shards = [n for n in names if n.endswith(".array_record")]
    assert len([n for n in shards if n.startswith("train-")]) > 1  # the tiny shard size rolled over
    n_train = len([n for n in shards if n.startswith("train-")])
    assert f"train-00000-of-{n_train:05d}.array_record" in shards
    meta_mtime = os.stat(out / "metadata.json").st_mtime_ns
    assert all(os.stat(out / n).st_mtime_ns <= meta_mtime for n in shards)  # metadata written last
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err

    assert prep.main(args) == 0
    assert "reusing" in capsys.readouterr().err
    assert os.stat(out / "metadata.json").st_mtime_ns == meta_mtime

    write_jsonl(src, [{"text": t} for t in DOCS[:10]])  # changed input: rebuilt, stale shards removed
    assert prep.main(args) == 0
    assert "reusing" not in capsys.readouterr().err
    meta = json.load(open(out / "metadata.json"))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == 10
    listed = {s["file"] for sp in meta["splits"].values() for s in sp["shards"]}
    assert {n for n in os.listdir(out) if n.endswith(".array_record")} == listed


def test_failed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    prep.prepare(str(src), str(out), TOKENIZER, quiet=True)
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    write_jsonl(src, [{"text": t} for t in DOCS[::-1]])

    def boom(texts):
        raise RuntimeError("disk full")

    from osp_jax.data import tokenize_workers

    monkeypatch.setattr(tokenize_workers, "_encode_texts", boom)
    with pytest.raises(RuntimeError):
        prep.prepare(str(src), str(out), TOKENIZER, quiet=True)
    after = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    assert after == before  # no .tmp- left, old shards and metadata untouched


def test_workers_match_single_process(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    prep.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "one"), TOKENIZER, quiet=True)
    prep.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "two"), TOKENIZER, quiet=True, workers=2)
    for split in ("train", "validation"):
        _, a = read_records(tmp_path / "one", split)
        _, b = read_records(tmp_path / "two", split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------
# Bad input


def run_main(capsys, *args):
    rc = prep.main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_bad_records_are_skipped_and_named(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "good one"}).encode(),
             b"{not json",
             json.dumps({"body": "no text field"}).encode(),
             b'{"text": "caf\xe9 latin-1"}',
             json.dumps({"text": 17}).encode(),
             json.dumps({"text": "   "}).encode(),
             json.dumps({"text": "good two"}).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc, err = run_main(capsys, f"--input={src}", f"--output={out}", f"--tokenizer={TOKENIZER}",
                       "--val-fraction=0")
    assert rc == 0
    assert f"{src}:2" in err and "bad_json" in err
    assert f"{src}:3" in err and "missing_field" in err
    assert f"{src}:4" in err and "bad_utf8" in err
    assert f"{src}:5" in err
    meta = json.load(open(out / "metadata.json"))
    assert meta["skipped"] == {"bad_json": 1, "missing_field": 1, "bad_utf8": 1, "not_a_string": 1,
                               "empty": 1}
    assert meta["splits"]["train"]["documents"] == 2


def test_bad_txt_utf8_names_file_and_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    (tmp_path / "b.txt").write_text("fine")
    rc, err = run_main(capsys, f"--input={tmp_path}/*.txt", f"--output={tmp_path / 'out'}",
                       f"--tokenizer={TOKENIZER}")
    assert rc == 0 and f"{tmp_path / 'a.txt'}:2" in err and "bad_utf8" in err


@pytest.mark.parametrize("case", ["empty_glob", "missing_file", "bad_tokenizer", "missing_tokenizer",
                                  "no_valid_docs", "bad_train_spec", "parquet_no_column"])
def test_fatal_errors(tmp_path, capsys, case):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"text": "hello"}])
    inp, tok, expect = str(good), TOKENIZER, None
    if case == "empty_glob":
        inp, expect = str(tmp_path / "nothing*.jsonl"), "matches no file"
    elif case == "missing_file":
        inp, expect = str(tmp_path / "gone.jsonl"), "gone.jsonl"
    elif case == "bad_tokenizer":
        (tmp_path / "tok.json").write_text("{ this is not a tokenizer")
        tok, expect = str(tmp_path / "tok.json"), f"cannot read tokenizer {tmp_path / 'tok.json'}"
    elif case == "missing_tokenizer":
        tok, expect = str(tmp_path / "nope.json"), "nope.json not found"
    elif case == "no_valid_docs":
        (tmp_path / "bad.jsonl").write_text("{oops\n[1, 2]\n")
        inp, expect = str(tmp_path / "bad.jsonl"), "no valid documents"
    elif case == "bad_train_spec":
        tok, expect = "train:lots", "train:VOCAB"
    elif case == "parquet_no_column":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
        inp, expect = str(tmp_path / "a.parquet"), "has no column 'text'"
    out = tmp_path / "out"
    rc, err = run_main(capsys, f"--input={inp}", f"--output={out}", f"--tokenizer={tok}")
    assert rc == 2 and any(l.startswith("error:") for l in err.splitlines()) and expect in err, err
    assert not os.path.exists(out / "metadata.json")
    if os.path.isdir(out):
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-") or n.endswith(".array_record")]


def test_error_lines_keep_the_message_whole():
    """The shared CLI plumbing prints one line; it strips the quotes str() adds to a KeyError only, not
    the closing quote of a message that ends in a quoted name."""
    from osp_jax import cli

    assert cli.one_line(sources.DataError("a.parquet has\n  no column 'text'")) == "a.parquet has no column 'text'"
    assert cli.one_line(KeyError("model.dim")) == "model.dim"


def test_truncated_compressed_file_is_named(tmp_path):
    data = gzip.compress(b"".join((json.dumps({"text": t}) + "\n").encode() for t in DOCS))
    (tmp_path / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(sources.DataError, match="a.jsonl.gz"):
        prep.prepare(str(tmp_path / "a.jsonl.gz"), str(tmp_path / "out"), TOKENIZER, quiet=True)


@pytest.mark.parametrize("case", ["truncated", "not_zstd", "trailing_partial_frame"])
def test_bad_zstd_file_is_named(tmp_path, capsys, case):
    zstandard = pytest.importorskip("zstandard")
    data = b"".join((json.dumps({"text": t}) + "\n").encode() for t in DOCS)
    frame = zstandard.ZstdCompressor().compress(data)
    bad = {"truncated": frame[: len(frame) // 2], "not_zstd": data,
           "trailing_partial_frame": frame + frame[:20]}[case]
    (tmp_path / "a.jsonl.zst").write_bytes(bad)
    rc, err = run_main(capsys, f"--input={tmp_path / 'a.jsonl.zst'}", f"--output={tmp_path / 'out'}",
                       f"--tokenizer={TOKENIZER}")
    assert rc == 2 and f"error reading {tmp_path / 'a.jsonl.zst'}" in err, err
    assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_zstd_file_of_several_frames(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(b"".join(
        c.compress(b"".join((json.dumps({"text": t}) + "\n").encode() for t in DOCS[i:i + 7]))
        for i in range(0, len(DOCS), 7)))
    meta = prep.prepare(str(tmp_path / "a.jsonl.zst"), str(tmp_path / "out"), TOKENIZER, val_fraction=0.0,
                        quiet=True)
    assert meta["splits"]["train"]["documents"] == len(DOCS)


def test_reuse_checks_the_shards(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "out"
    args = [f"--input={tmp_path / 'a.jsonl'}", f"--output={out}", f"--tokenizer={TOKENIZER}",
            "--val-fraction=0", "--shard-size-mb=0.002"]
    assert prep.main(args) == 0
    meta = json.load(open(out / "metadata.json"))
    shard = meta["splits"]["train"]["shards"][0]
    assert shard["file_bytes"] == os.path.getsize(out / shard["file"])
    intact = (out / shard["file"]).read_bytes()
    capsys.readouterr()

    (out / shard["file"]).write_bytes(intact[: len(intact) // 2])  # cut short: rebuilt
    assert prep.main(args) == 0
    assert "reusing" not in capsys.readouterr().err
    assert (out / shard["file"]).read_bytes() == intact

    # Metadata written before file_bytes existed: reused while intact, the record count checked.
    for s in meta["splits"]["train"]["shards"]:
        del s["file_bytes"]
    prep.atomic_write_bytes(str(out / "metadata.json"), json.dumps(meta).encode())
    assert prep.main(args) == 0
    assert "reusing" in capsys.readouterr().err
    (out / shard["file"]).write_bytes(intact[: len(intact) // 2])
    assert prep.main(args) == 0
    assert "reusing" not in capsys.readouterr().err
    assert (out / shard["file"]).read_bytes() == intact


def write_gappy_tokenizer(path):
    """A word-level tokenizer.json whose 5 tokens have ids 0..3 and 5000."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3, "big": 5000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_vocab_size_is_the_largest_id_plus_one(tmp_path):
    write_gappy_tokenizer(tmp_path / "tok.json")
    assert load_tokenizer(str(tmp_path / "tok.json")).vocab_size == 5001
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello big world"}])
    meta = prep.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "out"), str(tmp_path / "tok.json"),
                        val_fraction=0.0, quiet=True)
    _, docs = read_records(tmp_path / "out")
    assert meta["vocab_size"] == 5001 and meta["dtype"] == "uint16"
    assert docs[0].tolist() == [1, 5000, 2, 0]


def test_ids_past_the_vocab_size_are_an_error(tmp_path, monkeypatch):
    from osp_jax.data import tokenizer as tokenizer_lib

    write_gappy_tokenizer(tmp_path / "tok.json")
    monkeypatch.setattr(tokenizer_lib, "_hf_vocab_size", lambda tok: tok.get_vocab_size())  # counts: 5
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello big world"}])
    with pytest.raises(sources.DataError, match=r"id 5000, outside its vocabulary of 5"):
        prep.prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "out"), str(tmp_path / "tok.json"),
                     val_fraction=0.0, quiet=True)
    assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_cli_module_entry_point(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS[:5]])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "osp_jax.data.prepare", f"--input={tmp_path}/*.jsonl",
                         f"--output={tmp_path / 'out'}", f"--tokenizer={TOKENIZER}"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert os.path.isfile(tmp_path / "out" / "metadata.json")
    bad = subprocess.run([sys.executable, "-m", "osp_jax.data.prepare", f"--input={tmp_path}/none*",
                          f"--output={tmp_path / 'out2'}", f"--tokenizer={TOKENIZER}"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "matches no file" in bad.stderr and "Traceback" not in bad.stderr


def test_progress_names_the_input_being_read(tmp_path, capsys):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jsonl")
        write_jsonl(files[-1], [{"text": t} for t in DOCS])
    progress = prep._Progress(enabled=True, files=3)
    progress.file = 2
    progress.update(4, 40)
    progress.close()
    assert capsys.readouterr().err.startswith("prepare: input 2/3, 4 docs, 40 tokens | ")
    assert prep.main([f"--input={tmp_path}/*.jsonl", f"--output={tmp_path / 'out'}", f"--tokenizer={TOKENIZER}"]) == 0
    assert "prepare: input 3/3, " in capsys.readouterr().err  # the last line, at the end


# ----------------------------------------------------------------------------------------------------
# Every bad input and output of the CLI: one line, exit 2, the offending path named, nothing left behind


def tree(root):
    """{relative path: (size, mtime_ns)} of everything under root, folders included."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size if n in files else None, st.st_mtime_ns)
    return out


def jsonl_bytes(texts=DOCS):
    return b"".join((json.dumps({"text": t}) + "\n").encode() for t in texts)


def corrupt_gzip() -> bytes:
    data = bytearray(gzip.compress(jsonl_bytes(DOCS * 5)))
    for i in range(200, 260):  # damage inside the deflate stream: zlib's "invalid distance too far back"
        data[i] ^= 0x55
    return bytes(data)


def truncated_parquet(path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": DOCS}), path)
    path.write_bytes(path.read_bytes()[:-100])


BATTERY = {
    # case: (input file name, its bytes (or a writer), expected words after the path)
    "empty_file": ("a.jsonl", b"", "empty file"),
    "empty_txt": ("a.txt", b"", "empty file"),
    "utf16_jsonl": ("a.jsonl", '{"text": "hello"}\n'.encode("utf-16"), "UTF-16 text (byte-order mark FF FE), not UTF-8"),
    "utf32_txt": ("a.txt", "hello".encode("utf-32"), "UTF-32 text"),
    "not_gzip": ("a.jsonl.gz", jsonl_bytes(), "not gz data"),
    "not_xz": ("a.jsonl.xz", jsonl_bytes(), "not xz data"),
    "corrupt_gzip": ("a.jsonl.gz", corrupt_gzip(), "corrupt compressed data"),
    "truncated_gzip": ("a.jsonl.gz", gzip.compress(jsonl_bytes())[:600], "truncated"),
    "truncated_xz": ("a.jsonl.xz", lzma.compress(jsonl_bytes())[:600], "truncated (no xz stream footer"),
    "empty_once_decompressed": ("a.jsonl.gz", gzip.compress(b""), "empty once decompressed"),
    "gzip_of_utf16": ("a.jsonl.gz", gzip.compress('{"text": "x"}\n'.encode("utf-16")), "UTF-16 text"),
    "truncated_parquet": ("a.parquet", truncated_parquet, "not a whole parquet file"),
}


@pytest.mark.parametrize("case", list(BATTERY) + [
    "missing_glob", "directory_without_inputs", "missing_tokenizer", "bad_tokenizer", "output_is_a_file",
    "output_under_a_file", "output_not_writable", "output_a_url", "input_only_inside_output", "shard_size_zero",
    "val_fraction_one", "workers_zero"])
def test_cli_refuses_bad_input_and_output(tmp_path, capsys, monkeypatch, case):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes())
    inp, out, tok, extra, named, expect = good, tmp_path / "out", TOKENIZER, [], None, None
    if case in BATTERY:
        name, content, expect = BATTERY[case]
        inp = named = tmp_path / name
        content(inp) if callable(content) else inp.write_bytes(content)
        expect = f"error reading {inp}: {expect}"
    elif case == "missing_glob":
        inp = named = tmp_path / "corpus*.jsonl"
        expect = "matches no file"
    elif case == "directory_without_inputs":
        inp = named = tmp_path / "notes"
        inp.mkdir()
        (inp / "x.csv").write_text("a,b")
        expect = "matches no supported input"
    elif case == "missing_tokenizer":
        tok = named = tmp_path / "tok.json"
        expect = "not found"
    elif case == "bad_tokenizer":
        tok = named = tmp_path / "tok.json"
        tok.write_text("{ not a tokenizer")
        expect = "cannot read tokenizer"
    elif case == "output_is_a_file":
        out = named = tmp_path / "out.txt"
        out.write_text("x")
        expect = "exists and is not a directory"
    elif case == "output_under_a_file":
        (tmp_path / "file").write_text("x")
        out, named, expect = tmp_path / "file" / "sub" / "out", tmp_path / "file", "is not a directory"
    elif case == "output_not_writable":
        (tmp_path / "ro").mkdir(mode=0o555)
        out, named, expect = tmp_path / "ro" / "out", tmp_path / "ro", "is not writable"
        if os.geteuid() == 0:  # root writes anywhere: the permission check is told what a user would see
            access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(named) else access(p, mode))
    elif case == "output_a_url":
        out = named = "gs://bucket/tokens"  # no credentials here: refused at start by the storage check
        expect = "cannot write there"
    elif case == "input_only_inside_output":
        assert prep.main([f"--input={good}", f"--output={out}", f"--tokenizer={TOKENIZER}", "--quiet"]) == 0
        capsys.readouterr()
        inp, named, expect = out / "*.json", out, "never read as input"
    elif case == "shard_size_zero":
        extra, named, expect = ["--shard-size-mb=0"], "--shard-size-mb=0", "expected a positive number"
    elif case == "val_fraction_one":
        extra, named, expect = ["--val-fraction=1"], "--val-fraction=1", "expected a number in [0, 1)"
    elif case == "workers_zero":
        extra, named, expect = ["--workers=0"], "--workers=0", "expected a positive integer"
    before = tree(tmp_path)
    rc = prep.main([f"--input={inp}", f"--output={out}", f"--tokenizer={tok}", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(named) in err and expect in err, err
    assert tree(tmp_path) == before  # no output folder, no lock, no .tmp- file


def test_a_damaged_file_among_good_ones_is_named_before_any_work(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_bytes(jsonl_bytes())
    (tmp_path / "3.jsonl").write_bytes(b"")
    (tmp_path / "4.jsonl.xz").write_bytes(lzma.compress(jsonl_bytes())[:300])
    rc = prep.main([f"--input={tmp_path}/*", f"--output={tmp_path / 'out'}", f"--tokenizer={TOKENIZER}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert (f"error reading 2 input files: {tmp_path / '3.jsonl'} (empty file); {tmp_path / '4.jsonl.xz'} "
            "(truncated (no xz stream footer at its end))") in err
    assert not (tmp_path / "out").exists()


def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(DOCS[:5]))
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + DOCS[5].encode())
    meta = prep.prepare(str(tmp_path / "*"), str(tmp_path / "out"), TOKENIZER, val_fraction=0.0, quiet=True)
    assert meta["splits"]["train"]["documents"] == 6 and meta["skipped"] == {}
    _, docs = read_records(tmp_path / "out")
    assert sorted(map(tuple, docs)) == sorted(map(tuple, expected_tokens(DOCS[:6])))


@pytest.mark.parametrize("kind", ["parquet", "hf_dataset"])
def test_values_that_are_not_utf8_in_arrow_columns_are_counted(tmp_path, capsys, kind):
    pa = pytest.importorskip("pyarrow")
    raw = pa.array([DOCS[0].encode(), b"caf\xe9 au lait", DOCS[1].encode()], pa.binary())
    texts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # pyarrow does not check: as files hold it
    table = pa.table({"text": texts})
    if kind == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, tmp_path / "a.parquet")
        inp, where = tmp_path / "a.parquet", f"{tmp_path / 'a.parquet'}:row 2"
    else:
        (tmp_path / "hf").mkdir()
        with pa.OSFile(str(tmp_path / "hf" / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
        (tmp_path / "hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        inp, where = tmp_path / "hf", f"{tmp_path / 'hf' / 'data-00000-of-00001.arrow'}:row 2"
    rc, err = run_main(capsys, f"--input={inp}", f"--output={tmp_path / 'out'}", f"--tokenizer={TOKENIZER}",
                       "--val-fraction=0")
    assert rc == 0 and f"{where}: skipped (bad_utf8): byte 3 of the value is not UTF-8" in err, err
    meta, docs = read_records(tmp_path / "out")
    assert meta["skipped"] == {"bad_utf8": 1} and meta["skipped_by_file"] == {str(inp): {"bad_utf8": 1}}
    assert [list(d) for d in docs] == [list(d) for d in expected_tokens([DOCS[0], DOCS[1]])]


def test_an_output_inside_an_input_directory_is_not_read_back(tmp_path, capsys):
    """`--input=corpus --output=corpus/tokens`: the second run reads the same inputs (not the first run's
    metadata.json and tokenizer.json, which would read as JSON lines) and so reuses the output."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": t} for t in DOCS])
    args = [f"--input={corpus}", f"--output={corpus / 'tokens'}", f"--tokenizer={TOKENIZER}"]
    assert prep.main(args) == 0
    first = json.loads((corpus / "tokens" / "metadata.json").read_text())
    assert [f["path"] for f in first["inputs"]] == [str(corpus / "a.jsonl")]
    capsys.readouterr()
    assert prep.main(args) == 0
    assert "reusing" in capsys.readouterr().err
