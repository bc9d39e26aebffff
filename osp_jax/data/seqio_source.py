"""Batches from a registered seqio Task or Mixture, in the same dict layout as the Grain pipeline.

Optional: seqio pulls in TensorFlow (about 3 GB), so it is imported only when this is called;
install with `pip install osp_jax[seqio]`. The task must be registered (its module imported) first.

seqio's DecoderFeatureConverter(pack=True) packs examples of the "targets" feature into windows of
seq_len; its features map to ours as
    decoder_input_tokens -> inputs     (targets shifted right, 0 at each segment start: seqio's way)
    decoder_target_tokens -> targets
    decoder_segment_ids -> segment_ids (0 = padding)
    decoder_positions -> positions
Unlike the Grain pipeline this iterator has no get_state(): resuming restarts the seqio stream.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

_FEATURES = {
    "decoder_input_tokens": "inputs",
    "decoder_target_tokens": "targets",
    "decoder_segment_ids": "segment_ids",
    "decoder_positions": "positions",
}


def _import_seqio():
    try:
        import seqio
    except ImportError:
        raise ImportError("data.source='seqio' needs the seqio package (and TensorFlow): "
                          "pip install osp_jax[seqio]") from None
    return seqio


def _resolve_task(seqio, name: str) -> str:
    """"module.path:TaskName" imports the module that registers the task first."""
    if ":" in name:
        import importlib

        module, name = name.split(":", 1)
        importlib.import_module(module)
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        raise ValueError(f"data.seqio_task={name!r} is not a registered seqio Task or Mixture; pass "
                         "'module.path:TaskName' to import the module that registers it")
    return name


def make_seqio_iterator(task_or_mixture_name: str, *, seq_len: int, global_batch_size: int, seed: int,
                        split: str = "train", shuffle: bool = True, num_epochs: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        vocab_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"inputs", "targets", "segment_ids", "positions"}: int32 (B, seq_len), with
    B = global_batch_size // process_count; each process reads its own shard of the task.
    With `vocab_size` (the model's), a task whose "targets" vocabulary is larger is refused (ValueError)."""
    from osp_jax.data.pipeline import check_vocab, local_batch_size

    seqio = _import_seqio()
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    batch_size = local_batch_size(global_batch_size, process_count)
    task_or_mixture_name = _resolve_task(seqio, task_or_mixture_name)
    if vocab_size is not None:  # else an id past the table embeds as NaN, and training stops on "non-finite loss"
        vocab = seqio.get_mixture_or_task(task_or_mixture_name).output_features["targets"].vocabulary
        try:
            check_vocab({"vocab_size": vocab.vocab_size}, vocab_size)
        except ValueError as e:
            raise ValueError(f"data.seqio_task={task_or_mixture_name!r}: {e}") from None
    ds = seqio.get_dataset(
        task_or_mixture_name,
        task_feature_lengths={"targets": seq_len},
        feature_converter=seqio.DecoderFeatureConverter(pack=True),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count),
        seed=seed,
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)

    def gen():
        for ex in ds.as_numpy_iterator():
            yield {ours: np.asarray(ex[theirs], np.int32) for theirs, ours in _FEATURES.items()}

    return gen()
