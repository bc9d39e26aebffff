"""What export (osp_jax.export) and import (osp_jax.hf_import) share: their error, the file names of a
Hugging Face directory, JSON files, the staged output that a failed run never leaves behind, and the
check that a parameter tree is the one its config builds.

Outputs are written into a temporary directory next to the destination and renamed into place (an atomic
rename; safetensors writes through the OS, so this directory is always local). A gs:// destination has no
rename: the output is written into a local temporary directory and uploaded object by object, the files a
reader starts from (`PUBLISH_LAST`: the weight index, config.json) last, so that a reader never takes a
partial upload for an output; with --overwrite, the old config.json and index are deleted first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from typing import Any

import numpy as np

from osp_jax import cli, storage

PROG = "osp_jax.export"
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes; no timestamps, so output is reproducible
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
RECIPE_FILE = "import_recipe.py"
# Uploaded last, in this order, to a gs:// output: Orbax's commit file of a checkpoint step (an imported
# workdir's), then the weight index, then config.json, which transformers and osp_jax read first.
PUBLISH_LAST = ("commit_success.txt", INDEX_FILE, "config.json")


class ExportError(cli.UserError):
    """Bad input or an output that cannot be written; the message is one line for the user (exit code 2)."""


def say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def write_json(path: str, obj: Any) -> None:
    """Indented, keys sorted, one trailing newline: the same bytes for the same object."""
    cli.write_json(path, obj, sort_keys=True)


def read_json(path: str, what: str) -> dict:
    return cli.read_json(path, what, error=ExportError)


# ----------------------------------------------------------------------------------------------------
# Staged output: everything goes into a temporary sibling directory, renamed into place at the end.


def check_output(path: str, overwrite: bool, flag: str = "--output") -> None:
    if storage.is_remote(path):
        _check_remote_output(path, overwrite, flag)
        return
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise ExportError(f"{flag}={path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ExportError(f"{flag}={path} is not empty ({len(os.listdir(path))} entries); "
                          "pass --overwrite to replace it")


def _check_remote_output(path: str, overwrite: bool, flag: str) -> None:
    if storage.is_file(path):
        raise ExportError(f"{flag}={path} exists and is not a directory")
    entries = storage.names(path)
    if entries and not overwrite:
        raise ExportError(f"{flag}={path} is not empty ({len(entries)} entries); pass --overwrite to replace it")


def check_not_clobbering(output: str, source: str, flag: str, source_flag: str, keep: tuple[str, ...] = ()) -> None:
    """Refuses an output directory whose replacement would delete the input: `output` (symlinks resolved)
    is `source`, contains it, or lies inside it under one of `keep` (names of entries of `source`)."""
    if storage.is_remote(output) != storage.is_remote(source):
        return  # one on a local disk, the other on gs://
    resolve = storage.normalized if storage.is_remote(output) else os.path.realpath
    out, src = resolve(output), resolve(source)
    if out == src or src.startswith(out.rstrip(os.sep) + os.sep):
        how = "is" if out == src else "contains"
        raise ExportError(f"{flag}={output} {how} {source_flag}={source}: writing it would delete what is "
                          f"being read; choose a {flag} outside it")
    top = os.path.relpath(out, src).split(os.sep)[0] if out.startswith(src + os.sep) else None
    if top in keep:
        raise ExportError(f"{flag}={output} is {source_flag}={source}'s own {top}, or inside it: writing it "
                          f"would damage the run; choose a {flag} outside it (or another subdirectory)")


@contextlib.contextmanager
def staged_directory(final: str, overwrite: bool, flag: str = "--output"):
    """Yields a fresh temporary directory next to `final`; on success it replaces `final`, on any
    failure it is removed, so a partial output is never left behind. A gs:// `final`: `_staged_remote`."""
    if storage.is_remote(final):
        with _staged_remote(final, overwrite, flag) as tmp:
            yield tmp
        return
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    made = []  # the missing ancestors this makes, removed again on a failure
    while not os.path.lexists(os.path.dirname(made[-1] if made else final)):
        made.append(os.path.dirname(made[-1] if made else final))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        check_output(final, overwrite, flag)  # checked again: something may have appeared meanwhile
        old = None
        if os.path.isdir(final):
            if os.listdir(final):
                old = tmp + ".old"
                os.rename(final, old)
            else:
                os.rmdir(final)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in made:  # innermost first; one something else wrote into meanwhile stays
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


@contextlib.contextmanager
def _staged_remote(final: str, overwrite: bool, flag: str):
    """Yields a local temporary directory; on success its files are uploaded to the gs:// directory `final`
    (`PUBLISH_LAST` last; with `overwrite`, the old ones of those deleted first and the other old objects after
    the upload), and it is removed. If the upload fails, what it wrote into a `final` that was empty is removed
    again; an overwritten `final` is left without its config.json, visibly incomplete."""
    with tempfile.TemporaryDirectory(prefix="osp_jax-staged-") as tmp:
        yield tmp
        check_output(final, overwrite, flag)  # checked again: something may have appeared meanwhile
        old = storage.names(final)
        try:
            for name in PUBLISH_LAST:
                storage.remove(f"{final}/{name}")
            new = storage.publish_dir(tmp, final, last=PUBLISH_LAST)
            for name in sorted(set(_all_names(final)) - set(new)):
                storage.remove(f"{final}/{name}")
        except BaseException:
            if not old:
                storage.remove_tree(final)
            raise


def _all_names(directory: str) -> list[str]:
    """Every file under `directory`, as paths relative to it."""
    top = storage.normalized(directory)
    return [f"{root}/{f}"[len(top) + 1:] for root, _, files in storage.walk(top) for f in files]


def check_params(params: dict, config) -> None:
    """The tree must be the one `config` builds (same paths, same shapes)."""
    import jax
    from flax import linen as nn

    from osp_jax.model import abstract_params

    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config.model)))[0]}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ExportError(f"the checkpoint's parameters do not match its config.model (first differences, "
                          f"(path, shape): {diff})")
