"""seqio as a data source (optional extra: skipped unless seqio is installed)."""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")


def test_builtin_seqio_task_yields_packed_batches():
    from osp_jax.data.seqio_source import make_seqio_iterator

    it = make_seqio_iterator("examples.seqio_builtin_task:osp_builtin", seq_len=64, global_batch_size=4, seed=0,
                             process_index=0, process_count=1)
    batch = next(it)
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in batch.values())
    # seqio's inputs are the targets shifted right inside each segment.
    seg, inp, tgt = batch["segment_ids"][0], batch["inputs"][0], batch["targets"][0]
    same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
    np.testing.assert_array_equal(inp[1:][same], tgt[:-1][same])


def test_unregistered_task_is_a_clear_error():
    from osp_jax.data.seqio_source import make_seqio_iterator

    with pytest.raises(ValueError, match="not a registered seqio Task"):
        make_seqio_iterator("no_such_task", seq_len=8, global_batch_size=1, seed=0, process_index=0, process_count=1)


def test_task_vocabulary_larger_than_the_model_is_refused():
    """Else its ids past the embedding table turn whole rows NaN, and training stops on "non-finite loss"."""
    from osp_jax.data.seqio_source import make_seqio_iterator

    task = "examples.seqio_builtin_task:osp_builtin"
    vocab = seqio.get_mixture_or_task("osp_builtin").output_features["targets"].vocabulary.vocab_size
    kwargs = dict(seq_len=8, global_batch_size=1, seed=0, process_index=0, process_count=1)
    next(make_seqio_iterator(task, vocab_size=vocab, **kwargs))
    with pytest.raises(ValueError, match=f"osp_builtin.*vocabulary {vocab} but the model's vocab_size is {vocab - 1}"):
        make_seqio_iterator(task, vocab_size=vocab - 1, **kwargs)
