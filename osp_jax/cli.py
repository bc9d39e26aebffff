"""What the command lines share: one-line errors with exit code 2, and JSON files read and written whole.

Every CLI (`train`, `evaluate`, `export`, `data.prepare`, `plot`) reports a problem the user can fix (a
flag, a config key, a missing or unreadable file, a path that cannot be written) as one line on stderr,
`python -m osp_jax.X: error: ...`, and exits with status 2, before any expensive work. No traceback.

Paths go through `etils.epath`, so a `gs://` path is read and written like a local one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from etils import epath

EXIT_OK = 0
EXIT_USER = 2          # bad input: a flag, a config key, a file, a path
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix: reported as one line naming it, exit code 2."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line, without the quotes a KeyError adds (another message may end
    in a quoted name: its quote stays)."""
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if isinstance(e, KeyError):
        text = text.strip("'\"")
    return text or type(e).__name__


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (loaders often wrap the real reason)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def say(prog: str, message: str) -> None:
    """`prog: message` on stderr; the message alone when `prog` is empty (data.prepare's lines)."""
    print(f"{prog}: {message}" if prog else message, file=sys.stderr, flush=True)


def die(prog: str, message: str, code: int = EXIT_USER) -> NoReturn:
    """Prints `prog: message` on stderr and exits with `code`."""
    say(prog, message)
    sys.exit(code)


def guarded(prog: str, fn: Callable[[], Any], labels: Mapping[type, str]) -> int:
    """Runs `fn()` and returns the exit status: 0, or 2 when it raises one of the exception types of
    `labels` (the first that matches, in order), printed as `prog: LABEL: message`; 130 on Ctrl-C.
    Any other exception is a bug and keeps its traceback."""
    try:
        fn()
    except KeyboardInterrupt:
        say(prog, "interrupted")
        return EXIT_INTERRUPTED
    except tuple(labels) as e:
        label = next(text for kind, text in labels.items() if isinstance(e, kind))
        say(prog, f"{label}: {one_line(e)}")
        return EXIT_USER
    return EXIT_OK


def absl_flags_parser(prog: str, label: str = "config error", recipe_flag: str | None = "config"
                      ) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for absl's `app.run`: what absl leaves as a traceback or a bare "FATAL" (a
    malformed flag, an unknown or misspelt `--config.KEY` of ml_collections' config flags, a value of
    the wrong type) becomes one line, `prog: LABEL: ...`, with exit code 2. The recipe file of
    `--RECIPE_FLAG` is loaded first (`check_recipe`), so that one that fails to load is named as such."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        spec = _flag_value(argv, recipe_flag) if recipe_flag else None
        if spec is not None:
            try:
                check_recipe(spec, f"--{recipe_flag}")
            except UserError as e:
                die(prog, f"{label}: {e}")
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            die(prog, f"{label}: {e}")
        except (AttributeError, KeyError) as e:  # config_flags: a key the config does not have
            overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
            die(prog, f"{label}: unknown config key {one_line(e).replace(chr(39), '')} (in {overrides})")
        except (TypeError, ValueError) as e:
            die(prog, f"{label}: {one_line(e)} (in {' '.join(argv[1:])})")

    return parse


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=VALUE` (or `--name VALUE`) in `argv`, the last one given; None if absent."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def check_recipe(spec: str, flag: str = "--config") -> None:
    """Raises UserError naming the recipe file `spec` (`FILE.py` or `FILE.py:ARG`, as ml_collections' config
    flags take it) and why, unless it loads and its `get_config(ARG)` returns a config: missing, not a file,
    empty, a syntax error (with its line), an exception while it runs (its type, message and line), no
    get_config, or a get_config that returns something else. The recipe runs here once more than it will."""
    import importlib.util
    import traceback

    import ml_collections

    path, _, arg = spec.partition(":")
    where = f"{flag}={spec}"
    p = epath.Path(path)
    if not p.exists():
        raise UserError(f"{where}: no such file")
    if p.is_dir():
        raise UserError(f"{where}: a directory, expected a Python file defining get_config()")
    if not p.read_bytes().strip():
        raise UserError(f"{where}: the file is empty, expected Python defining get_config()")
    try:
        module_spec = importlib.util.spec_from_file_location("osp_jax_recipe_check", os.fspath(p))
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UserError(f"{where}: the file defines no get_config()")
        config = get_config(arg) if arg else get_config()
    except UserError:
        raise
    except SyntaxError as e:
        raise UserError(f"{where}: line {e.lineno}: {type(e).__name__}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - whatever the recipe raises is the user's to fix
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == os.fspath(p)]
        at = f" line {lines[-1]}:" if lines else ""
        raise UserError(f"{where}:{at} {type(e).__name__} while loading it: {one_line(e)}") from None
    if not isinstance(config, (Mapping, ml_collections.ConfigDict)):
        raise UserError(f"{where}: get_config() returned {type(config).__name__}, expected a ConfigDict")


def check_output_dir(path, flag: str) -> None:
    """Raises UserError unless `path` can be written as a directory: it is one, or it does not exist and its
    nearest existing ancestor is a directory (the missing ones are made when it is written); and that directory
    takes a file. Tried by writing and removing a probe file: permission bits do not tell (root, read-only mounts,
    ACLs). On an object store (gs://) only a file at the path itself is refused; the store checks the rest."""
    p = epath.Path(path)
    where = f"{flag}={path}"
    if not is_local(p):
        if p.is_file():
            raise UserError(f"{where} exists and is not a directory")
        return
    target = os.path.abspath(os.fspath(p))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UserError(f"{where} exists and is not a directory")
    _check_writable(target, where)


def check_output_file(path, flag: str) -> None:
    """Raises UserError unless a file can be written at `path`: it is not a directory, and its folder is one that
    takes a file, or can be made (as `check_output_dir`). Nothing is left behind. Local paths only: a gs:// one is
    `osp_jax.storage.check`'s."""
    if not is_local(path):
        return
    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        raise UserError(f"{flag}={path} is a directory, expected a file")
    _check_writable(os.path.dirname(target), f"{flag}={path}")


def _check_writable(directory: str, where: str) -> None:
    """UserError unless the local `directory`, or its nearest existing ancestor, is a directory that takes a file
    (a probe file written and removed)."""
    probe_dir = directory
    while not os.path.lexists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise UserError(f"{where} cannot be made: {probe_dir} is a file, not a directory")
    probe = os.path.join(probe_dir, f".osp_jax-write-check-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{where} cannot be written: {probe_dir} is not writable ({e.strerror or one_line(e)})") from None


def check_input_file(path, what: str) -> None:
    """Raises UserError naming `what` and `path` unless it is a non-empty file."""
    p = epath.Path(path)
    if not p.exists():
        raise UserError(f"{what} {path} not found")
    if p.is_dir():
        raise UserError(f"{what} {path} is a directory, expected a file")
    try:
        size = p.stat().length
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or one_line(e)}") from None
    if size == 0:
        raise UserError(f"{what} {path} is empty")


# ---------------------------------------------------------------------------------------------------
# JSON files


def finite_or_none(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, at any depth: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def fsync(path) -> None:
    """Flushes a local file, or a directory's entries (so that a rename into it survives a crash), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes) -> None:
    """Writes `data` so that a reader sees the old file or the new one, never a part, even after a crash:
    a local file through a temporary sibling, flushed to disk, and a rename; an object store's upload
    is atomic by itself."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text_atomic(path, text: str) -> None:
    """`text` as UTF-8, written atomically (`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def copy_atomic(src, dst) -> None:
    """Copies the file `src` to `dst`, written atomically (`write_bytes_atomic`): for small files."""
    write_bytes_atomic(dst, epath.Path(src).read_bytes())


def write_json(path, obj, *, sort_keys: bool = False) -> None:
    """`obj` as indented strict JSON (non-finite numbers as null), written atomically."""
    text = json.dumps(finite_or_none(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def read_json(path, what: str = "file", error: type[Exception] = UserError) -> dict:
    """The JSON object in `path`; raises `error` naming `what`, the path and why it cannot be read
    (missing, not UTF-8, not JSON, not an object)."""
    path = epath.Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM is tolerated, as editors write one
        value = json.loads(text)
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, expected a JSON file") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or one_line(e)}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    except ValueError as e:
        why = "is empty" if not text.strip() else f"is not valid JSON (truncated or corrupt?): {e}"
        raise error(f"{what} {path} {why}") from None
    if not isinstance(value, dict):
        raise error(f"{what} {path} holds a JSON {type(value).__name__}, expected an object")
    return value
