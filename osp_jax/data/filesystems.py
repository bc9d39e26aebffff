"""The files `prepare` reads and writes: local paths through `os`, URLs (gs://, s3://, ...) through Apache
Beam's own `FileSystems`.

Also the glob syntax of --input that glob lacks: commas between patterns, shell braces.

URLs go through Beam's own filesystems inside a Beam pipeline (`use_beam()`, called by the pipeline's driver
and its workers: a Dataflow worker has Beam and its credentials already), and through `osp_jax.storage`
(etils.epath and gcsfs, as train, evaluate and export use) on the single-machine path, which needs no Beam.
Nothing here caches a listing: every call asks the store (GCS lists are strongly consistent).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import uuid
from typing import BinaryIO, NamedTuple

from osp_jax import cli


class FileInfo(NamedTuple):
    path: str
    size: int
    mtime_ns: int


_BEAM = False  # URLs through Beam's FileSystems (True in a Beam pipeline's processes), else osp_jax.storage


def use_beam() -> None:
    """From now on in this process, URLs go through Beam's FileSystems."""
    global _BEAM
    _beam()
    _BEAM = True


def is_url(path: str) -> bool:
    return "://" in os.fspath(path)


def _storage():
    from osp_jax import storage

    return storage


def _beam():
    """Beam's FileSystems, or a user error saying what to install."""
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError:
        raise cli.UserError("URL paths (gs://...) in prepare go through Apache Beam's filesystems: "
                            "pip install 'osp_jax[beam]'") from None
    return FileSystems


def join(base: str, *names: str) -> str:
    return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return _beam().exists(path) if _BEAM else _storage().exists(path)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    return _beam().exists(path) if _BEAM else _storage().is_file(path)


def isdir(path: str) -> bool:
    """A local directory, or a URL prefix under which some object lies (object stores have no folders)."""
    if not is_url(path):
        return os.path.isdir(path)
    return bool(match(path.rstrip("/") + "/**"))


def match(pattern: str) -> list[FileInfo]:
    """The files a URL glob matches (`*` within a folder, `**` across folders), sorted by path."""
    if not _BEAM:
        storage = _storage()
        return sorted(FileInfo(p, *storage.stat(p)) for p in storage.glob(pattern) if storage.is_file(p))
    result = _beam().match([pattern])[0]
    return sorted(FileInfo(m.path, int(m.size_in_bytes), int((m.last_updated_in_seconds or 0) * 1e9))
                  for m in result.metadata_list)


def stat(path: str) -> FileInfo:
    if not is_url(path):
        st = os.stat(path)
        return FileInfo(path, st.st_size, st.st_mtime_ns)
    if not _BEAM:
        return FileInfo(path, *_storage().stat(path))
    found = [m for m in match(path) if m.path == path]
    if not found:
        raise FileNotFoundError(2, "No such file", path)
    return found[0]


def open_read(path: str) -> BinaryIO:
    """The raw bytes of a file (no decompression: the readers choose by extension)."""
    if not is_url(path):
        return open(path, "rb")
    if not _BEAM:
        return _storage().open_read(path)
    from apache_beam.io.filesystem import CompressionTypes

    return _beam().open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """A reader sees the old file or the new one: locally `cli.write_bytes_atomic` (temporary sibling,
    fsync, rename); an object store's upload appears whole when it is closed."""
    if not is_url(path):
        cli.write_bytes_atomic(path, data)
        return
    if not _BEAM:
        import etils.epath

        etils.epath.Path(path).write_bytes(data)  # an object appears whole when its upload ends
        return
    with _create(path) as f:
        f.write(data)


def upload(local_path: str, dest: str) -> None:
    """Copies a local file to `dest` (a URL): the object appears only once the upload is complete."""
    if not _BEAM:
        _storage().upload(local_path, dest)
        return
    with open(local_path, "rb") as src, _create(dest) as out:
        shutil.copyfileobj(src, out, 8 << 20)


def _create(url: str):
    """A new object, written as given: Beam would otherwise gzip a name ending in .gz once more."""
    from apache_beam.io.filesystem import CompressionTypes

    return _beam().create(url, compression_type=CompressionTypes.UNCOMPRESSED)


def makedirs(path: str) -> None:
    if not is_url(path):  # object stores make folders as objects are written
        os.makedirs(path, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Locally an atomic rename; on an object store a copy and a delete (readers are kept off by
    metadata.json, which is written after every shard is in place)."""
    if is_url(src) and not _BEAM:
        _storage().move(src, dst)
    elif is_url(src):
        _beam().rename([src], [dst])
    else:
        os.replace(src, dst)


def delete(path: str) -> None:
    """Removes a file (missing is fine)."""
    if is_url(path) and not _BEAM:
        _storage().remove(path)
    elif is_url(path):
        if _beam().exists(path):
            _beam().delete([path])
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def rmtree(path: str) -> None:
    """Removes a folder and everything under it (missing is fine)."""
    if is_url(path):
        for m in match(path.rstrip("/") + "/**"):
            delete(m.path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def listdir(path: str) -> list[str]:
    """Names directly under a folder: files, and for a local folder its subfolders too."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    prefix = path.rstrip("/") + "/"
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in match(prefix + "**")})


def split_patterns(pattern: str) -> list[str]:
    """Splits on commas outside braces: "a.jsonl,b/*.txt" -> 2 patterns; "{a,b}.txt" stays one."""
    parts, depth, cur = [], 0, ""
    for ch in pattern:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace alternatives, which glob lacks: "x_{a,b}.jsonl" -> ["x_a.jsonl", "x_b.jsonl"]."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if depth == 0:
            break
    else:
        return [pattern]  # unbalanced: take it literally
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    return [x for alt in split_patterns(body) for x in expand_braces(head + alt + tail)]


def unique_name(stem: str) -> str:
    """`stem` with a random suffix: a name no other attempt or run uses."""
    return f"{stem}-{uuid.uuid4().hex[:12]}"
