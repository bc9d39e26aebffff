"""OSP at GPT-2 small scale (~124 M non-embedding-heavy parameters): Muon + SSNorm + EmbProj.

    python -m osp_jax.train --config=configs/osp_124m.py --workdir=runs/osp_124m --config.data.path=DATA_DIR
"""
from osp_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 49152
    c.model.dim = 768
    c.model.layers = 12
    c.model.heads = 12
    c.model.kv_heads = 12
    c.model.ffn_dim = 2048
    c.model.remat = "dots"
    c.train.steps = 20000
    c.train.global_batch_size = 256
    c.train.seq_len = 1024
    c.train.log_every = 20
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.outlier_every = 250
    c.optimizer.name = "muon"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.muon_learning_rate = 1e-3
    c.optimizer.warmup_steps = 500
    c.optimizer.grad_accum_steps = 1
    return c
