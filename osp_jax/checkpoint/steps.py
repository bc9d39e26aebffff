"""Which steps are on disk, and which of them are complete: Orbax's own step names and finalisation check.

Orbax writes a step with the protocol its storage suits: on gs:// into ``<step>/`` directly, on a local disk into a
temporary ``<step>.orbax-checkpoint-tmp-*`` renamed to ``<step>`` at the end. Since 0.12.3 it also writes its commit
file into every step it finalises, whatever the protocol, so that any reader can tell. A step counts as complete
here by Orbax's `is_path_finalized` under that commit-file rule (`COMMIT_RULE`); a save that never finished is one
`is_path_temporary` under the same rule. This module asks Orbax and never looks for the file itself. Orbax's local
default rule would count any ``<step>/`` directory as complete, a partial copy included.

Every decision about what is on disk reads the storage itself, never a cached listing (`uncached`).
"""
from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp
from etils import epath

# Dropping gcsfs's cached listings before a decision: osp_jax.storage's, for every path; kept importable here.
from osp_jax.storage import uncached  # noqa: F401

log = logging.getLogger("osp_jax.checkpoint")

try:  # how steps are read; how they are written stays Orbax's default for the storage
    COMMIT_RULE = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
except AttributeError as e:  # pragma: no cover - depends on the installed Orbax
    raise ImportError(f"osp_jax.checkpoint needs orbax-checkpoint >= 0.12.3 (AtomicityOptions); this is "
                      f"{ocp.__version__}") from e

# `<step>` with no prefix and no padding: the names every osp_jax checkpoint so far has used.
NAME_FORMAT = ocp.path.step.standard_name_format(atomicity_options=COMMIT_RULE)


def absolute(directory) -> epath.Path:
    """Orbax needs absolute paths; a relative local one is taken from the working directory."""
    path = epath.Path(os.fspath(directory))
    return path if "://" in os.fspath(directory) else path.absolute()


def find_checkpoint_dir(workdir) -> str:
    """Where a run keeps its checkpoints: ``WORKDIR/checkpoints``."""
    return os.fspath(absolute(workdir) / "checkpoints")


def step_path(directory: epath.Path, step: int) -> epath.Path:
    return ocp.path.step.build_step_path(directory, NAME_FORMAT, int(step))


def complete_steps(directory: epath.Path) -> list[int]:
    """The complete steps in `directory`, ascending, as Orbax's step finder sees them on the storage now."""
    return sorted(m.step for m in NAME_FORMAT.find_all(uncached(directory)))


def _step_of(name: str) -> int | None:
    """The step a directory name is for (a step's own or an interrupted rename's temporary name), or None."""
    try:
        return ocp.path.step.step_from_checkpoint_name(name)
    except ValueError:
        return None


def unfinished_steps(directory: epath.Path) -> list[int]:
    """Steps whose ``<step>/`` directory holds a save that never finished (Orbax's `is_path_temporary`)."""
    if not uncached(directory).exists():
        return []
    found = []
    for p in directory.iterdir():
        step = _step_of(p.name)
        if step is not None and p.name == NAME_FORMAT.build_name(step) and \
                ocp.path.step.is_path_temporary(p, atomicity_options=COMMIT_RULE):
            found.append(step)
    return sorted(found)


def has_unfinished(directory: epath.Path, step: int) -> bool:
    """Whether an unfinished save of `step` is in `directory`: its ``<step>/`` without the commit file, or a
    temporary directory of Orbax's rename protocol."""
    if not uncached(directory).exists():
        return False
    return any(_step_of(p.name) == step for p in directory.iterdir())


def saved_tree(step_dir: epath.Path):
    """The saved state's tree, leaves Orbax's ArrayMetadata (shape, dtype): its structure, no array read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(step_dir / "state").tree
    finally:
        handler.close()
