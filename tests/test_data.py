"""The Grain pipeline: exact packing, process splits, iterator state, vocab checks, the builtin corpus."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from osp_jax.data import pipeline
from osp_jax.data import prepare as prep
from osp_jax.data.pipeline import builtin_files
from osp_jax.data.tokenizer import load_tokenizer

TOKENIZER = builtin_files()[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """~80 unique documents of 2..~200 tokens, in several shards, with a validation split."""
    rng = np.random.default_rng(1)
    tmp = tmp_path_factory.mktemp("data")
    with open(tmp / "docs.jsonl", "w") as f:
        for i in range(80):
            n = int(rng.choice([1, 3, 10, 40, 150]))
            f.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choice(WORDS, size=n))}) + "\n")
    out = tmp / "out"
    prep.prepare(str(tmp / "docs.jsonl"), str(out), TOKENIZER, val_fraction=0.15, shard_size_mb=0.004,
                 quiet=True)
    return str(out)


def records(data_dir, split="train"):
    from array_record.python.array_record_module import ArrayRecordReader

    meta = pipeline.load_metadata(data_dir)
    docs = []
    for s in meta["splits"][split]["shards"]:
        r = ArrayRecordReader(os.path.join(data_dir, s["file"]))
        docs += [np.frombuffer(b, meta["dtype"]).astype(np.int32) for b in r.read_all()]
        r.close()
    return docs


def window_tokens(batch):
    """The real tokens of each row's seq_len + 1 window (padding stripped), in order."""
    out = []
    for inp, tgt, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
        k = int((seg > 0).sum())
        if k == 0:
            continue
        assert (seg[:k] > 0).all() and (seg[k:] == 0).all()  # padding only at the end
        out.append(np.concatenate([inp[:k], tgt[k - 1:k]]))
    return out


def stream(batches):
    return np.concatenate([w for b in batches for w in window_tokens(b)])


def split_docs(tokens, eos=0):
    ends = np.flatnonzero(tokens == eos)
    return [tuple(d) for d in np.split(tokens, ends + 1) if len(d)]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(data_dir):
    it = pipeline.make_iterator(data_dir, "train", seq_len=32, global_batch_size=4, seed=0,
                                process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    for v in b.values():
        assert v.shape == (4, 32) and v.dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    it.close()


def test_packing_reproduces_the_token_stream_exactly(data_dir):
    docs = records(data_dir)
    it = pipeline.make_iterator(data_dir, "train", seq_len=16, global_batch_size=3, seed=0, shuffle=False,
                                num_epochs=1, process_index=0, process_count=1)
    batches = list(it)
    np.testing.assert_array_equal(stream(batches), np.concatenate(docs))  # nothing lost or repeated
    # segment_ids and positions follow document boundaries inside each window.
    bounds = np.cumsum([0] + [len(d) for d in docs])
    offset = 0
    for b in batches:
        for inp, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
            k = int((seg > 0).sum())
            if k == 0:
                continue
            idx = offset + np.arange(k)  # stream index of each real input token
            doc = np.searchsorted(bounds, idx, side="right") - 1
            np.testing.assert_array_equal(seg[:k], doc - doc[0] + 1)
            start = np.maximum(bounds[doc], offset)
            np.testing.assert_array_equal(pos[:k], idx - start)
            offset += 17 if k == 16 else k + 1
    assert offset == bounds[-1]
    # The last batch is padded to full size, with segment_ids 0 on the padding.
    assert batches[-1]["inputs"].shape == (3, 16)


def test_shuffled_epochs_keep_every_document(data_dir):
    docs = [tuple(d) for d in records(data_dir)]
    it = pipeline.make_iterator(data_dir, "train", seq_len=24, global_batch_size=2, seed=3, num_epochs=2,
                                process_index=0, process_count=1)
    got = split_docs(stream(list(it)))
    assert sorted(got) == sorted(docs * 2)
    first = got[: len(docs)]
    assert sorted(first) == sorted(docs) and first != docs  # one full, shuffled epoch, then the next
    assert got[len(docs):] != first  # reshuffled per epoch


def test_processes_see_disjoint_documents(data_dir):
    docs = [tuple(d) for d in records(data_dir)]
    seen = []
    for p in range(2):
        it = pipeline.make_iterator(data_dir, "train", seq_len=16, global_batch_size=4, seed=0,
                                    num_epochs=1, process_index=p, process_count=2)
        b = list(it)
        assert b[0]["inputs"].shape == (2, 16)  # global 4 over 2 processes
        seen.append(set(split_docs(stream(b))))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(docs)


def test_global_batch_must_divide(data_dir):
    with pytest.raises(ValueError, match=r"global_batch_size 5 .* processes 2"):
        pipeline.make_dataset(data_dir, "train", seq_len=8, global_batch_size=5, seed=0, process_index=0,
                              process_count=2)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_restores_mid_epoch_and_across_epochs(data_dir, prefetch):
    kw = dict(seq_len=16, global_batch_size=4, seed=7, process_index=0, process_count=1,
              prefetch_buffer=prefetch)
    n_tokens = pipeline.load_metadata(data_dir)["splits"]["train"]["tokens"]
    per_epoch = n_tokens // (17 * 4)  # batches an epoch
    it = pipeline.make_iterator(data_dir, "train", **kw)
    take(it, 3)
    mid = it.get_state()
    json.dumps(mid)  # checkpointable as JSON
    expect_mid = take(it, 4)
    take(it, per_epoch - 9)
    edge = it.get_state()
    expect_edge = take(it, 6)  # crosses into the second epoch
    it.close()

    for state, expect in ((mid, expect_mid), (edge, expect_edge)):
        fresh = pipeline.make_iterator(data_dir, "train", **kw)
        fresh.set_state(state)
        assert_batches_equal(take(fresh, len(expect)), expect)
        fresh.close()


def test_worker_count_change_is_a_clear_error(data_dir):
    kw = dict(seq_len=16, global_batch_size=4, seed=7, process_index=0, process_count=1)
    it = pipeline.make_iterator(data_dir, "train", **kw)
    take(it, 2)
    state = it.get_state()
    expect = take(it, 2)
    it.close()
    assert state["worker_count"] == 0
    old = {k: v for k, v in state.items() if k != "worker_count"}  # saved before the field existed
    for saved in (state, old):
        other = pipeline.make_iterator(data_dir, "train", worker_count=1, **kw)
        with pytest.raises(pipeline.PipelineError, match=r"worker_count=0.*worker_count=1"):
            other.set_state(saved)
        other.close()
        same = pipeline.make_iterator(data_dir, "train", **kw)
        same.set_state(saved)
        assert_batches_equal(take(same, 2), expect)
        same.close()


def test_damaged_shard_names_the_directory(data_dir, tmp_path):
    d = str(shutil.copytree(data_dir, tmp_path / "d"))
    meta = pipeline.load_metadata(d)
    kw = dict(seq_len=16, global_batch_size=2, seed=0, process_index=0, process_count=1)

    def fails(what):
        with pytest.raises(pipeline.PipelineError, match=re.escape(d) + f": {what}.*--force"):
            pipeline.make_iterator(d, "train", **kw)

    def write_meta(meta):
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump(meta, f)

    write_meta(dict(meta, splits={"train": dict(meta["splits"]["train"], documents=1000)}))
    fails("the train shards hold .* records, metadata.json says 1000")
    write_meta(meta)
    shard = os.path.join(d, meta["splits"]["train"]["shards"][1]["file"])
    intact = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(intact[: len(intact) // 2])
    fails(r"shard .* has \d+ bytes, metadata.json says \d+")
    # Metadata from before shard sizes were recorded: the unreadable shard is reported all the same.
    for s in meta["splits"]["train"]["shards"]:
        del s["file_bytes"]
    write_meta(meta)
    fails("cannot read the train shards")
    os.remove(shard)
    fails("shard .* is missing")


def test_validation_split(data_dir):
    docs = records(data_dir, "validation")
    assert docs
    ds = pipeline.make_dataset(data_dir, "validation", seq_len=16, global_batch_size=2, seed=0,
                               shuffle=False, num_epochs=1, process_index=0, process_count=1)
    np.testing.assert_array_equal(stream(list(ds)), np.concatenate(docs))


def test_check_vocab():
    meta = {"vocab_size": 4096}
    with pytest.raises(ValueError, match=r"4096.*1000|1000.*4096"):
        pipeline.check_vocab(meta, 1000)
    assert pipeline.check_vocab(meta, 4096) is None
    note = pipeline.check_vocab(meta, 8192)
    assert "4096" in note and "8192" in note


def test_resolve_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pipeline.resolve_data_dir(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        pipeline.resolve_data_dir(str(tmp_path))


def test_builtin_resolves_and_yields():
    # The real cache ($OSP_JAX_CACHE or ~/.cache/osp_jax): prepared once (~5 s), reused afterwards.
    d = pipeline.resolve_data_dir("builtin")
    assert os.path.basename(d).startswith("builtin-") and pipeline.resolve_data_dir("builtin") == d
    meta = pipeline.load_metadata(d)
    assert meta["vocab_size"] == 4096 and meta["splits"]["train"]["tokens"] > 2_000_000
    assert meta["splits"]["validation"]["documents"] >= 40
    it = pipeline.make_iterator("builtin", "train", seq_len=128, global_batch_size=8, seed=0,
                                process_index=0, process_count=1)
    b = next(it)
    assert b["inputs"].shape == (8, 128) and b["inputs"].max() < 4096
    text = load_tokenizer(os.path.join(d, meta["tokenizer"])).decode(b["inputs"][0])
    assert len(text) > 200
    it.close()


def test_text_file_tokens(tmp_path):
    texts = ["First document.", "Second one, a little longer."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(TOKENIZER)
    got = pipeline.text_file_tokens(str(tmp_path / "a.jsonl"), TOKENIZER)
    want = np.array(tok.encode(texts[0]) + [0] + tok.encode(texts[1]) + [0])
    np.testing.assert_array_equal(got, want)
    (tmp_path / "b.txt").write_text(texts[1])
    np.testing.assert_array_equal(pipeline.text_file_tokens(str(tmp_path / "b.txt"), tok),
                                  tok.encode(texts[1]) + [0])


def test_worker_processes(data_dir):
    kw = dict(seq_len=16, global_batch_size=2, seed=0, process_index=0, process_count=1, shuffle=False,
              num_epochs=1)
    it = pipeline.make_iterator(data_dir, "train", worker_count=1, **kw)
    got = list(it)
    it.close()
    assert_batches_equal(got, list(pipeline.make_dataset(data_dir, "train", **kw)))


def _stream_windows(tokens, seq_len, eos_id):
    """Reference, independent of the pipeline: non-overlapping windows of seq_len + 1 of one token stream
    (the tail dropped), segment ids and positions restarting at the window start and after every EOS."""
    w = seq_len + 1
    n = len(tokens) // w
    win = tokens[: n * w].reshape(n, w).astype(np.int32)
    starts = np.zeros_like(win, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = win[:, :-1] == eos_id
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(w), win.shape)
    pos = (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)
    return {"inputs": win[:, :-1], "targets": win[:, 1:], "segment_ids": seg[:, :-1], "positions": pos[:, :-1]}


@pytest.mark.parametrize("seq_len", [1, 7, 16, 300])
def test_batched_windows_of_documents_in_memory(seq_len):
    """evaluate's --data=FILE path: documents held in memory, packed as training packs them, the tail that
    fills no window dropped, the last batch padded with rows of segment id 0."""
    rng = np.random.default_rng(seq_len)
    docs = [np.append(rng.integers(1, 50, int(n)), 0).astype(np.int32) for n in rng.integers(0, 40, 30)]
    want = _stream_windows(np.concatenate(docs), seq_len, eos_id=0)
    batches = list(pipeline.batched_windows(docs, seq_len=seq_len, batch_size=4, pad_id=0, drop_remainder=True))
    assert all(b[k].shape == (4, seq_len) for b in batches for k in pipeline.FIELDS)
    got = {k: np.concatenate([b[k] for b in batches]) for k in pipeline.FIELDS}
    n = len(want["inputs"])
    assert (got["segment_ids"][n:] == 0).all() and len(got["inputs"]) - n < 4
    for k in pipeline.FIELDS:
        np.testing.assert_array_equal(got[k][:n], want[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------- streams


def _streams(data_dir, shard, shards, stream_count=None, global_batch_size=8):
    from osp_jax.data.streams import DataStreams

    def open_stream(stream, count, global_batch):
        return pipeline.make_iterator(data_dir, "train", seq_len=16, global_batch_size=global_batch, seed=5,
                                      process_index=stream, process_count=count, prefetch_buffer=0)

    return DataStreams(open_stream, shard=shard, shards=shards, global_batch_size=global_batch_size,
                       stream_count=stream_count)


def _global(iterators, n):
    """`n` global batches: each iterator's (a data shard's) rows, in shard order."""
    per = [take(it, n) for it in iterators]
    return [{k: np.concatenate([p[i][k] for p in per]) for k in pipeline.FIELDS} for i in range(n)]


def test_streams_give_the_same_global_batches_on_any_layout(data_dir):
    """Two streams read by two data shards, or both by one; one stream read by one shard, or shared by two
    (each keeping its half of the rows): the same global batches. Two shards of two streams are the two
    processes' pipelines of before (so checkpoints saved then go on)."""
    two = [_streams(data_dir, p, 2) for p in range(2)]
    want = _global(two, 3)
    before = [pipeline.make_iterator(data_dir, "train", seq_len=16, global_batch_size=8, seed=5, process_index=p,
                                     process_count=2, prefetch_buffer=0) for p in range(2)]
    assert_batches_equal(_global(before, 3), want)
    assert_batches_equal(_global([_streams(data_dir, 0, 1, stream_count=2)], 3), want)
    one = _global([_streams(data_dir, 0, 1)], 3)
    assert_batches_equal(_global([_streams(data_dir, p, 2, stream_count=1) for p in range(2)], 3), one)
    assert not np.array_equal(one[0]["inputs"], want[0]["inputs"])


def test_a_position_saved_by_two_data_shards_goes_on_in_one_and_back(data_dir):
    """The position two shards saved goes on exactly in one shard, and one shard's in two (through
    set_state_from, reading only the states it needs); so does a state saved before streams existed."""
    two = [_streams(data_dir, p, 2) for p in range(2)]
    _global(two, 3)
    saved = [it.get_state() for it in two]
    json.dumps(saved)
    want = _global(two, 4)
    one = _streams(data_dir, 0, 1)
    read = []
    one.set_state_from([0, 1], lambda i: read.append(i) or saved[i])
    assert one.stream_count == 2 and sorted(read) == [0, 1]
    assert_batches_equal(_global([one], 4), want)
    legacy = [s["streams"][str(p)] for p, s in enumerate(saved)]  # a process's own pipeline state, as before
    one = _streams(data_dir, 0, 1)
    one.set_state_from([0, 1], legacy.__getitem__)
    assert_batches_equal(_global([one], 4), want)

    single = _streams(data_dir, 0, 1)
    _global([single], 2)
    state = single.get_state()
    want = _global([single], 4)
    halves = [_streams(data_dir, p, 2) for p in range(2)]
    for half in halves:
        half.set_state_from([0], [state].__getitem__)
    assert [h.stream_count for h in halves] == [1, 1]
    assert_batches_equal(_global(halves, 4), want)
    halves[0].restart()  # a fresh run's layout again: one stream a shard
    assert halves[0].stream_count == 2


def test_a_layout_the_streams_do_not_divide_is_refused(data_dir):
    from osp_jax.data.streams import StreamLayoutError

    two = [_streams(data_dir, p, 2) for p in range(2)]
    saved = [it.get_state() for it in two]
    three = _streams(data_dir, 0, 3, global_batch_size=6)
    with pytest.raises(StreamLayoutError, match="3 data shards cannot share 2 data streams evenly"):
        three.set_state_from([0, 1], saved.__getitem__)
    four = _streams(data_dir, 0, 1, global_batch_size=6, stream_count=3)
    with pytest.raises(StreamLayoutError, match="global_batch_size=6 does not split into the run's 4"):
        four.set_state({"stream_count": 4, "streams": {}})
    assert isinstance(StreamLayoutError("x"), pipeline.PipelineError)


def test_an_unwritable_builtin_cache_is_one_data_error_naming_it(tmp_path, monkeypatch):
    """train and evaluate both report a pipeline DataError in one line: the cache that cannot be written, and
    OSP_JAX_CACHE (was a PermissionError traceback)."""
    from osp_jax.data.sources import DataError

    (tmp_path / "file").write_text("x")
    for cache in (str(tmp_path / "file" / "cache"), "/sys/osp_jax_test_cache"):
        if cache.startswith("/sys") and not os.path.isdir("/sys"):
            continue
        monkeypatch.setenv("OSP_JAX_CACHE", cache)
        with pytest.raises(DataError, match=re.escape(cache) + r"/builtin-.*set OSP_JAX_CACHE to a writable"):
            pipeline.resolve_data_dir("builtin")
    assert os.listdir(tmp_path) == ["file"]
