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
