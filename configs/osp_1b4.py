"""The OSP paper's 1.4 B model: 24 layers, dim 2048, 16 heads, SwiGLU 5504, vocab 49152, seq 2048,
trained with Muon + Single-Scale RMSNorm + EmbProj.

On a TPU v4-512 (256 devices), as in the paper:
    python -m osp_jax.train --config=configs/osp_1b4.py --workdir=/gcs/BUCKET/osp_1b4 \
        --config.data.path=/gcs/BUCKET/data --config.mesh.dp=2 --config.mesh.op=8 --config.mesh.fsdp=16
"""
from osp_jax.config import defaults


def get_config():
    c = defaults()
    c.model.vocab_size = 49152
    c.model.dim = 2048
    c.model.layers = 24
    c.model.heads = 16
    c.model.kv_heads = 16
    c.model.ffn_dim = 5504
    c.model.rope_theta = 10000.0
    c.model.norm_scale = "single"
    c.model.embed_proj = True
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.optimizer.name = "muon"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.muon_learning_rate = 1e-3
    c.optimizer.schedule = "wsd"
    c.optimizer.warmup_steps = 2000
    c.train.seq_len = 2048
    c.train.global_batch_size = 512   # 1 M tokens per step
    c.train.steps = 1_000_000         # ~1 T tokens
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.train.outlier_every = 500
    return c
