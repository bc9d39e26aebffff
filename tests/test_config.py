"""Config recipes load and validate; bad configs stop before training with the key named."""
import os
import subprocess
import sys

import pytest

from osp_jax import config as config_lib
from tests.helpers import CONFIG_FILES, ROOT, load_recipe


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    config_lib.validate(load_recipe(path.stem))


def test_recipes_are_the_paper_models():
    osp, adam = load_recipe("osp_1b4"), load_recipe("adam_1b4")
    m = osp.model
    assert (m.layers, m.dim, m.heads, m.ffn_dim, m.vocab_size, osp.train.seq_len) == (24, 2048, 16, 5504, 49152, 2048)
    assert (m.norm_scale, m.embed_proj, osp.optimizer.name) == ("single", True, "muon")
    assert (adam.model.norm_scale, adam.model.embed_proj, adam.optimizer.name) == ("channel", False, "adamw")


BAD = [
    # (override, what the message must name, exit code: 2 for config and data errors)
    ("--config.model.dim=130", "model.dim", 2),                 # not divisible by heads=4
    ("--config.model.kv_heads=3", "model.kv_heads", 2),         # does not divide heads
    ("--config.train.seq_len=0", "train.seq_len", 2),
    ("--config.model.norm_scale=layer", "model.norm_scale", 2),
    ("--config.optimizer.name=sgd", "optimizer.name", 2),
    ("--config.train.steps=-5", "train.steps", 2),
    ("--config.model.max_segments=-1", "model.max_segments", 2),
    ("--config.model.nonexistent=1", "nonexistent", 2),         # unknown key (ml_collections refuses it)
    ("--config.model.dims=64", 'Did you mean "dim"', 2),        # a misspelt key: a traceback once
    ("--config.train.steps=1.5", "train.steps=1.5", 2),         # wrong type: absl's bare FATAL, exit 1, once
    ("--config=configs/tinny.py", "configs/tinny.py", 2),       # no such recipe: a traceback once
    ("--config.mesh.fsdp=3", "fsdp=3", 2),                      # mesh does not fit 1 device
    ("--config.model.vocab_size=1000", "data error: the data's tokenizer has vocabulary 4096 but the model's "
                                       "vocab_size is 1000", 2),  # data vs model: exit 1 once
    ("--config.data.path=/nowhere", "data error: ", 2),            # exit 1, "FileNotFoundError: ...", once
    ("--config.model.attention=splash", "model.attention='splash' is not allowed on this machine", 2),  # traceback once
]


@pytest.mark.slow  # over 15 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_bad_configs_exit_nonzero_naming_the_key(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = []
    for i, (flag, _, _) in enumerate(BAD):
        cmd = [sys.executable, "-m", "osp_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / str(i)}", flag]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for (flag, key, code), p in zip(BAD, procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == code, f"{flag}: exit {p.returncode}, not {code}:\n{out[-2000:]}"
        assert key in out, f"{flag}: message does not name {key}:\n{out[-2000:]}"
        assert "Traceback" not in out, f"{flag}: a traceback, not a one-line error:\n{out[-2000:]}"
        assert not (tmp_path / "0" / "checkpoints").exists()
    for i, (flag, _, _) in enumerate(BAD):  # refused before the workdir is made
        assert not (tmp_path / str(i)).exists(), flag


@pytest.mark.parametrize("key,value,fragment", [
    ("model.dim", 130, "multiple of model.heads"),
    ("model.kv_heads", 3, "divisor of model.heads"),
    ("train.seq_len", 0, "positive"),
    ("optimizer.grad_accum_steps", 3, "divisor of train.global_batch_size"),
    ("optimizer.b2", 1.0, "[0, 1)"),
    ("model.attention", "flash", "one of auto"),
    ("model.attention", "cudnn", "model.dtype='float32'"),  # tiny computes in float32; cuDNN takes bf16
    ("model.max_segments", -1, ">= 0"),
    ("model.max_segments", None, "type int"),  # ConfigDict itself refuses floats and strings
    ("optimizer.clip_norm", float("nan"), "finite value >= 0"),  # NaN would turn clipping off unseen
    ("model.dtype", "float16", "one of float32, bfloat16"),  # no loss scaling: the head's gradient underflowed
    ("optimizer.weight_decay", float("inf"), "finite value >= 0"),
])
def test_validate_messages(key, value, fragment):
    c = load_recipe("tiny")
    section, name = key.split(".")
    with c.unlocked():
        c[section][name] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert key in str(e.value) and fragment in str(e.value) and repr(value) in str(e.value)


def test_unknown_key_added_in_a_recipe_is_refused():
    c = load_recipe("tiny")
    with c.unlocked():
        c.train.stepz = 3
    with pytest.raises(config_lib.ConfigError, match="train.stepz is not a known key; did you mean"):
        config_lib.validate(c)


def test_wrong_type_is_refused():
    c = load_recipe("tiny")
    with c.unlocked():
        c.model.embed_proj = None
    with pytest.raises(config_lib.ConfigError, match="model.embed_proj"):
        config_lib.validate(c)


def test_round_trip_through_dict():
    c = load_recipe("osp_124m")
    assert config_lib.from_dict(c.to_dict()).to_dict() == c.to_dict()
