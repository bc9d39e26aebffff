"""prepare's output directory: checked before any work, one prepare at a time (local), reused while what
it holds is intact, and cleaned of what a crashed or refused run left.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os

from osp_jax import cli
from osp_jax.data import filesystems as fs
from osp_jax.data import shards as shards_lib
from osp_jax.data.sources import DataError


class OutputNotWritable(DataError, PermissionError):
    """An output directory that cannot be written: a user error to the CLI, and a PermissionError to
    callers that handle one (the built-in data cache, whose message names OSP_JAX_CACHE)."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.EACCES, "Permission denied", path)
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_existing(output: str) -> dict | None:
    """metadata.json of an earlier run, or None when missing or unreadable (then it is rebuilt)."""
    path = fs.join(output, "metadata.json")
    try:
        if fs.is_url(output):
            return json.loads(fs.read_bytes(path)) if fs.isfile(path) else None
        return cli.read_json(path, "metadata")
    except (cli.UserError, ValueError, OSError):
        return None


def reusable(meta: dict | None, want: dict, output: str) -> bool:
    """Whether `output` already holds what `want` describes, its files intact as far as cheaply seen."""
    if not meta:
        return False
    for k in ("format", "format_version", "inputs", "tokenizer_source", "options"):
        if meta.get(k) != want[k]:
            return False
    tok = fs.join(output, meta.get("tokenizer") or "")
    if not (fs.isfile(tok) and fs.sha256(tok) == meta.get("tokenizer_sha256")):
        return False
    return all(_intact(fs.join(output, s["file"]), s)
               for sp in meta.get("splits", {}).values() for s in sp.get("shards", []))


def _intact(path: str, shard: dict) -> bool:
    if not fs.is_url(path):
        return shards_lib.intact(path, shard)
    return "file_bytes" in shard and fs.isfile(path) and fs.stat(path).size == shard["file_bytes"]


LOCK_NAME = ".prepare.lock"


@contextlib.contextmanager
def locked(output: str):
    """One prepare at a time per local output directory (e.g. several processes resolving "builtin")."""
    with open(os.path.join(output, LOCK_NAME), "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def check_output(output: str) -> list[str]:
    """DataError unless `output` is (or can be made) a writable directory; checked before any work.
    Returns the directories that making it will create, so that a failed run can remove them."""
    missing, d = [], output
    while not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise OutputNotWritable(f"--output {output} exists and is not a directory" if d == output else
                                f"--output {output} cannot be made: {d} is not a directory", d)
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"--output {output}: {d} is not writable", d)
    return missing[::-1]


def remove_created(created: list[str]) -> None:
    """Removes the directories a failed run made (deepest first), with the lock file it left in them, so
    that a refused run leaves nothing behind; a directory something else has written into stays."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(d, LOCK_NAME))
        with contextlib.suppress(OSError):
            os.rmdir(d)


def remove_stale_tmp(output: str) -> None:
    """Removes what crashed runs left under .tmp- names (files, and Beam's staging folders). Called with
    the lock held, so none of it belongs to a live run."""
    for name in fs.listdir(output):  # a local directory or a gs:// prefix alike
        if shards_lib.TMP_PREFIX in name:  # ours, and cli.write_text_atomic's .NAME.tmp-
            path = fs.join(output, name)
            if fs.isdir(path):
                fs.rmtree(path)
            else:
                fs.delete(path)
