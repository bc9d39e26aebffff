"""A seqio Task over osp_jax's built-in corpus: an example of `data.source=seqio`.

    pip install -e ".[seqio]"
    python -m osp_jax.train --config=configs/tiny.py --workdir=runs/seqio \
        --config.data.source=seqio --config.data.seqio_task=examples.seqio_builtin_task:osp_builtin

Tokens come from the built-in tokenizer, so the vocabulary is a PassThroughVocabulary of its size.
"""
import json
import lzma

import numpy as np
import seqio
import tensorflow as tf

from osp_jax.data.pipeline import builtin_files
from osp_jax.data.tokenizer import load_tokenizer

TASK = "osp_builtin"


def _documents(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # one file; seqio shuffles examples itself
    corpus, tok_path = builtin_files()
    tok = load_tokenizer(tok_path)
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    wanted = [d["text"] for d in docs if d.get("split", "train") == split]
    tokens = [np.asarray(tok.encode(t) + [tok.eos_id], np.int32) for t in wanted]
    return tf.data.Dataset.from_generator(lambda: ({"targets": t} for t in tokens),
                                          output_signature={"targets": tf.TensorSpec([None], tf.int32)})


def _register() -> None:
    if TASK in seqio.TaskRegistry.names():
        return
    vocab_size = load_tokenizer(builtin_files()[1]).vocab_size
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_documents, splits=("train", "validation")),
        preprocessors=[],  # already tokenised, EOS appended
        output_features={"targets": seqio.Feature(seqio.PassThroughVocabulary(vocab_size), add_eos=False)},
    )


_register()
