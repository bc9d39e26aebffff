"""Tiny OSP model (~1.8 M parameters) on the built-in corpus: trains on 2 CPU cores in about a minute.

    python -m osp_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""
from osp_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 4096
    c.model.dim = 128
    c.model.layers = 4
    c.model.heads = 4
    c.model.kv_heads = 2
    c.model.ffn_dim = 352
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPU; GPU/TPU recipes compute in bf16
    c.model.remat = "none"
    c.train.steps = 150
    c.train.global_batch_size = 16
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.train.outlier_every = 50
    c.optimizer.name = "muon"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.muon_learning_rate = 3e-3
    c.optimizer.warmup_steps = 10
    return c
