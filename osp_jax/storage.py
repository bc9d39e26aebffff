"""Files on a local disk or on Cloud Storage (`gs://`), through `etils.epath`: where the two differ, in one place.

What a `gs://` path does not do that a local one does, and what this module does about it:
- **No directories.** A "directory" is a name prefix: it exists once an object lies under it, and making
  one does nothing. `is_dir` asks the storage for one object under the prefix.
- **No rename, no append.** An object is written whole and appears at once (an upload is atomic), so a
  single file needs no temporary sibling; a group of files is published with the file that marks it
  complete last (`publish_dir`). `Appender` appends with GCS's compose: each append uploads the new bytes
  and concatenates them onto the object on the server, so metrics.jsonl grows a line at a time.
- **Cached listings.** gcsfs (epath's backend for gs:// when TensorFlow is absent) keeps every listing
  it made: objects another process wrote since stay invisible. `uncached` drops them before a decision.
- **Libraries that need a local file** (tokenizers, safetensors, array_record's writer): `local_copy`
  downloads into a temporary file; outputs are staged on the local disk and uploaded.
- **Errors.** A bucket that does not exist, missing or refused credentials, a permission error: `check`
  asks the storage at start, before any expensive work, and raises `cli.UserError` naming the path and
  the cause. It goes through google-cloud-storage (a dependency of gcsfs), which fails at once on a 401
  where gcsfs retries for about half a minute.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator

from etils import epath

from osp_jax import cli

PROBE_PREFIX = ".osp_jax-probe-"


def is_remote(path) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return not cli.is_local(os.fspath(path))


def normalized(path) -> str:
    """A user's path as the project keeps it: a URL unchanged (no trailing slash); a local path absolute, with
    `~` expanded."""
    text = os.fspath(path)
    return text.rstrip("/") if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def split_gs(path) -> tuple[str, str]:
    """gs://BUCKET/NAME -> (BUCKET, NAME); NAME without a leading or trailing slash."""
    text = os.fspath(path)
    if not text.startswith("gs://"):
        raise ValueError(f"{text}: expected a gs://BUCKET/... path")
    bucket, _, name = text[len("gs://"):].partition("/")
    return bucket, name.strip("/")


def gcsfs_filesystem():
    """The gcsfs instance epath uses for gs:// (one per process)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs("gs://")


def uncached(path) -> epath.Path:
    """`path`, after dropping the directory listings fsspec remembers (epath reaches gs:// through gcsfs when
    TensorFlow is absent, and gcsfs keeps every listing it made: objects written since by TensorStore or another
    process would stay invisible). Local paths have no such cache."""
    path = epath.Path(path)
    if is_remote(path):
        from etils.epath import backend

        if getattr(path, "_backend", None) is backend.fsspec_backend:  # epath's own choice for this path
            backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()
    return path


def exists(path) -> bool:
    """Whether `path` exists now (a gs:// prefix: whether an object lies under it), never from a cached listing."""
    return uncached(path).exists()


def is_dir(path) -> bool:
    """A local directory; on gs://, a prefix with at least one object under it (asked of the storage now)."""
    return uncached(path).is_dir()


def is_file(path) -> bool:
    """A local file, or a gs:// object (asked of the storage now)."""
    return uncached(path).is_file()


def glob(pattern) -> list[str]:
    """The paths matching a glob `pattern` (`**` recurses), sorted; a pattern that names a path that exists (with
    or without wildcards: a file may be called `val[1].txt`) matches that path alone. On gs://, asked of the
    storage now."""
    import glob as glob_lib

    text = os.fspath(pattern)
    if exists(text) or not glob_lib.has_magic(text):
        return [text] if exists(text) else []
    if not is_remote(text):
        return sorted(glob_lib.glob(text, recursive=True))
    fs = gcsfs_filesystem()  # epath refuses `**` on gs://; gcsfs lists the prefix once for it
    fs.invalidate_cache()
    return sorted("gs://" + p.removeprefix("gs://") for p in fs.glob(text))


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top)` (top-down; sort `dirs` in place to order the descent), for a local or gs:// directory."""
    if not is_remote(top):
        yield from os.walk(top)
        return
    scheme = os.fspath(top).split("://", 1)[0] + "://"
    for root, dirs, files in uncached(top).walk():
        root = os.fspath(root)
        yield (root if "://" in root else scheme + root), dirs, files  # fsspec gives roots without the scheme


def open_read(path):
    """A binary file object reading `path`, local or gs://."""
    return open(path, "rb") if not is_remote(path) else epath.Path(path).open("rb")  # noqa: SIM115


def stat(path) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file; on gs://, the object's (its time to the second)."""
    if not is_remote(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = uncached(path).stat()
    return int(st.length), int(st.mtime) * 10**9


def names(directory) -> list[str]:
    """The names directly under `directory`, sorted, asked of the storage now; [] if it does not exist."""
    try:
        return sorted(p.name for p in uncached(directory).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(path) -> None:
    """Removes a file (a gs:// object); no error if it is absent."""
    with contextlib.suppress(FileNotFoundError):
        epath.Path(path).unlink()


def move(src, dst) -> None:
    """Moves the file `src` to `dst`, replacing it: a local rename; on gs://, a copy made by the server and a
    delete (an object has no rename; the copy appears whole)."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    fs = gcsfs_filesystem()
    fs.copy(os.fspath(src), os.fspath(dst))
    fs.rm_file(os.fspath(src))


def remove_tree(path) -> None:
    """Removes a directory and everything under it (a gs:// prefix: every object under it); no error if absent."""
    path = epath.Path(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        uncached(path).rmtree()


# ---------------------------------------------------------------------------------------------------
# Whole files: uploads, local copies, a directory published with its marker last


def upload(local_path, remote_path) -> None:
    """Streams the local file to `remote_path`; the object appears whole when the upload ends."""
    with open(local_path, "rb") as src, epath.Path(remote_path).open("wb") as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


def download(path, local_path) -> None:
    """Streams the file `path` (local or gs://) to the local file `local_path`."""
    with open_read(path) as src, open(local_path, "wb") as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


@contextlib.contextmanager
def local_copy(path, suffix: str = "") -> Iterator[str]:
    """A local file with `path`'s bytes, for libraries that read only local files: `path` itself when it is
    local, else a temporary copy removed on leaving."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="osp_jax-", suffix=suffix or epath.Path(path).suffix)
    os.close(fd)
    try:
        download(path, tmp)
        yield tmp
    finally:
        os.unlink(tmp)


def publish_dir(local_dir, remote_dir, last: Iterable[str] = ()) -> list[str]:
    """Uploads every file under `local_dir` to the same name under `remote_dir`: the names in `last`
    (relative paths, or file names anywhere in the tree such as a commit marker) after all the others, in
    the order given, so that a reader who waits for them never sees a partial copy. Returns the names."""
    local_dir = os.fspath(local_dir)
    names = sorted(os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
                   for root, _, files in os.walk(local_dir) for f in files)
    last = list(last)
    rank = lambda n: next((i for i, m in enumerate(last) if n == m or n.endswith("/" + m)), -1)  # noqa: E731
    for name in sorted(names, key=lambda n: (rank(n), n)):
        upload(os.path.join(local_dir, name), epath.Path(remote_dir) / name)
    return names


class Appender:
    """Appends text to a file, each `write` durable on return: a local file held open in append mode; on
    gs://, an upload of the new bytes composed onto the object (GCS has no append). The one writer of the file
    (the workdir's lock holder): whether the object exists is asked once, then known."""

    def __init__(self, path):
        self.path = epath.Path(path)
        remote = is_remote(self.path)
        self._file = None if remote else open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._exists = remote and is_file(self.path)

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
            return
        append_remote(self.path, text.encode("utf-8"), exists=self._exists)
        self._exists = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def append_remote(path, data: bytes, exists: bool) -> None:
    """Appends `data` to the object `path`: if it `exists`, by one upload of `data` as a part object, one compose
    of [object, part] into the object and one delete of the part; else by writing it."""
    fs, target = gcsfs_filesystem(), os.fspath(path)
    if not exists:
        fs.pipe_file(target, data)
        return
    part = f"{target}.part-{uuid.uuid4().hex[:12]}"
    fs.pipe_file(part, data)
    try:
        fs.merge(target, [target, part])
    finally:
        fs.rm_file(part)


def append_text(path, text: str) -> None:
    """Appends `text` to the file; a local file is flushed to disk."""
    if is_remote(path):
        append_remote(path, text.encode("utf-8"), exists=is_file(path))
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------
# Access checks: a bucket that does not exist, missing or refused credentials, a permission error


def gcs_client():
    """A google-cloud-storage client (the emulator's when STORAGE_EMULATOR_HOST is set)."""
    from google.cloud import storage

    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)


def cause(e: BaseException) -> str:
    """What a storage error means, for a user: a missing bucket, credentials, a permission, else its text."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    code = getattr(e, "code", None)
    if isinstance(e, auth.GoogleAuthError) or code == 401:
        return (f"no usable Google Cloud credentials ({cli.one_line(e)}): run `gcloud auth application-default "
                "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key")
    if isinstance(e, api.Forbidden) or code == 403:
        return f"permission denied ({getattr(e, 'message', None) or cli.one_line(e)})"
    if isinstance(e, api.NotFound):
        return "the bucket does not exist"
    return cli.one_line(e)


def check(path, *, write: bool, flag: str, file: bool = False) -> None:
    """For a gs:// `path`: raises cli.UserError, one line naming `flag`, the path and the cause, unless the
    bucket exists and this process may read there (and, with `write`, write: a small object is written and
    deleted, under the directory `path`, or beside it if it names a `file`). Local paths are left to the
    callers' own checks."""
    if not is_remote(path):
        return
    try:
        bucket_name, name = split_gs(path)
    except ValueError as e:
        raise cli.UserError(f"{flag}={path}: {e}") from None
    if not bucket_name:
        raise cli.UserError(f"{flag}={path}: no bucket named (expected gs://BUCKET/PATH)")
    try:
        bucket = gcs_client().bucket(bucket_name)
        if write:
            where = name.rpartition("/")[0] if file else name
            probe = bucket.blob(f"{where}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}".lstrip("/"))
            probe.upload_from_string(b"", if_generation_match=0)
            probe.delete()
        else:  # a glob's fixed part: the bucket and the prefix are what can be refused
            prefix = re.split(r"[*?\[{]", name, maxsplit=1)[0]
            next(iter(bucket.list_blobs(prefix=prefix, max_results=1)), None)
    except Exception as e:  # noqa: BLE001 - every failure here is reported as the cause it names
        raise cli.UserError(f"{flag}={path}: cannot {'write' if write else 'read'} there: {cause(e)}") from None


def check_all(reads=(), writes=(), files=()) -> None:
    """`check` for every (flag, path) of `reads` and `writes` (dicts or pairs; '' and None skipped), writes
    first; `files` names the flags whose path is a file (its directory is probed)."""
    pairs = lambda given: given.items() if isinstance(given, dict) else given  # noqa: E731
    for flag, path in pairs(writes):
        if path:
            check(path, write=True, flag=flag, file=flag in files)
    for flag, path in pairs(reads):
        if path:
            check(path, write=False, flag=flag)
