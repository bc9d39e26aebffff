"""Data: prepare (text -> tokens -> ArrayRecord), the Grain pipeline, tokenizers, a seqio adapter.

    from osp_jax.data import resolve_data_dir, make_iterator
    it = make_iterator(resolve_data_dir("builtin"), "train", seq_len=2048, global_batch_size=8, seed=0)
    batch = next(it)  # {"inputs", "targets", "segment_ids", "positions"}: int32 (B, seq_len)

Names are imported lazily, so `python -m osp_jax.data.prepare` does not pay for jax and grain.
"""
import importlib

_EXPORTS = {
    "resolve_data_dir": "pipeline",
    "load_metadata": "pipeline",
    "check_vocab": "pipeline",
    "make_dataset": "pipeline",
    "make_iterator": "pipeline",
    "iter_text_file_tokens": "tokenizer",
    "text_file_documents": "tokenizer",
    "text_file_tokens": "tokenizer",
    "batched_windows": "pipeline",
    "builtin_files": "pipeline",
    "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "prepare": "prepare",
    "DataError": "sources",
    "make_seqio_iterator": "seqio_source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
