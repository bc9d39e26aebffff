"""The 1.4 B baseline trained the standard way: AdamW everywhere, per-channel RMSNorm, no EmbProj."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("osp_1b4", pathlib.Path(__file__).with_name("osp_1b4.py"))
osp_1b4 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(osp_1b4)


def get_config():
    c = osp_1b4.get_config()
    c.model.norm_scale = "channel"
    c.model.embed_proj = False
    c.optimizer.name = "adamw"
    return c
