"""Small shared builders for tests."""
import importlib.util
import pathlib

from osp_jax.config import defaults, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def load_recipe(name: str):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small_config(**model):
    """A very small model config for fast unit tests."""
    c = defaults()
    c.model.vocab_size = 64
    c.model.dim = 32
    c.model.layers = 2
    c.model.heads = 4
    c.model.kv_heads = 2
    c.model.ffn_dim = 48
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.train.seq_len = 16
    for k, v in model.items():
        c.model[k] = v
    return validate(c)


def train_and_save_run(c, docs, tok_path, workdir, *, steps: int, seq: int) -> float:
    """`steps` of Adam (lr 1e-2, batch 8) on random windows of `docs` tokenised as one stream, the model of
    config `c` starting from seeded random parameters; saves WORKDIR/checkpoints/`steps` with the config and
    copies the tokenizer there. Returns the last step's loss (for the caller's "it learned" check)."""
    import shutil

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from osp_jax.checkpoint import Checkpointer
    from osp_jax.data.tokenizer import load_tokenizer
    from osp_jax.model import Transformer
    from osp_jax.step import TrainState, cross_entropy
    from tests.test_quant import random_params

    tok = load_tokenizer(tok_path)
    stream = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id], np.int32) for t in docs])
    model = Transformer(c.model)
    params = jax.tree.map(jnp.asarray, random_params(c.model, seed=0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, window):
        loss_fn = lambda p: cross_entropy(model.apply({"params": p}, window[:, :-1]), window[:, 1:])  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq - 1, 8)
        params, opt_state, loss = step(params, opt_state, np.stack([stream[s:s + seq + 1] for s in starts]))
    state = TrainState(step=jnp.asarray(steps, jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.random.key_data(jax.random.key(0)), bad_steps=jnp.zeros([], jnp.int32))
    ckpt = Checkpointer(str(pathlib.Path(workdir) / "checkpoints"), save_every=1, keep=1, async_save=False)
    ckpt.save(steps, state, config=c.to_dict(), force=True)
    ckpt.close()
    shutil.copyfile(tok_path, pathlib.Path(workdir) / "tokenizer.json")
    return float(loss)
