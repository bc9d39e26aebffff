"""JAX's persistent compilation cache, as train, evaluate and the benchmarks turn it on.

A second start of the same program (a resumed run, a rerun, a benchmark) loads its executables from the
cache instead of compiling them: minutes on a pod for the 1.4B train step. The directory is
`train.compilation_cache_dir` (evaluate: `--compilation-cache-dir`), by default `default_dir()`, next to
the built-in corpus's cache; `''` turns the cache off. jax reads and writes it through etils.epath, so a
`gs://` directory works as it is.

Only process 0 writes entries (jax's rule, against write contention on GCS), so on a pod a directory on
each host's own disk helps process 0 alone: give every host the same `gs://` directory there.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("osp_jax")

# Entries are written for programs that took at least this long to compile: the ones that make a start
# slow (train step, eval step, outlier statistics, state init: seconds on CPU, up to minutes on a pod).
# The many small programs jax compiles besides (a device_put, a key split) take milliseconds, less than
# fetching an entry from gs:// would, and would only fill the directory with objects. jax's default
# today, pinned here so that the figures in docs/benchmarks.md stay what they were measured with.
MIN_COMPILE_TIME_SECS = 1.0
# No size threshold: an entry's size says nothing about the compile time it saves. -1 also stops jax
# from putting a filesystem-dependent minimum of its own in place of 0.
MIN_ENTRY_SIZE_BYTES = -1


def default_dir() -> str:
    """$OSP_JAX_CACHE/jax_compilation, else ~/.cache/osp_jax/jax_compilation (the root osp_jax caches
    the built-in corpus under, osp_jax.data.pipeline)."""
    root = os.environ.get("OSP_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "osp_jax")
    return os.path.join(root, "jax_compilation")


def enable(directory: str | None) -> str | None:
    """Turns the persistent compilation cache on in `directory` (a local path, `~` expanded, or a URL such
    as gs://bucket/jax_cache), or off for '' or None; returns the directory in use, or None. Call it before
    the programs it should cover are compiled; calling it again with another directory moves the cache
    there (the next compilation reads and writes the new one). Raises cli.UserError, naming the directory,
    if it cannot be made: jax itself would only warn, at the first compilation, and go on without a cache."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    directory = os.fspath(directory) if directory else None
    if directory and "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
    if directory:
        _check_usable(directory)
    if directory != jax.config.jax_compilation_cache_dir:
        # jax opens its cache once, at the first compilation that looks for it: forget the one it opened.
        jax_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", directory is not None)
    jax.config.update("jax_compilation_cache_dir", directory)
    if directory is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    return directory


def _check_usable(directory: str) -> None:
    """Makes `directory` as jax will (etils.epath; gs:// needs gcsfs, osp_jax[gcs]), now, so that a
    path that cannot be used is one line before any work."""
    from etils import epath

    from osp_jax import cli

    try:
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - the causes differ by file system (permissions, gcsfs, credentials)
        raise cli.UserError(f"compilation cache directory {directory} cannot be used: {cli.one_line(e)} (give "
                            "another with train.compilation_cache_dir / --compilation-cache-dir, or '' for "
                            "no cache)") from e
