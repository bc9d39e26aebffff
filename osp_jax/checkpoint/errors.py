"""The checkpoint errors, and how a read error reads in one log line."""
from __future__ import annotations

import re

_MAX_ERR_CHARS = 400  # keeps a log line readable


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which step, where and why."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint holds another train state than this run's (model or optimizer config changed)."""


# TensorStore appends the whole spec of the store it failed to open ("[tensorstore_spec='{...}']"): kilobytes of
# JSON after the part that says what went wrong.
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]", re.DOTALL)


def describe(err: BaseException) -> str:
    """`Type: message` on one line, TensorStore's spec dumps left out, at most ~400 characters."""
    text = " ".join(_TENSORSTORE_SPEC.sub("", str(err)).split())
    if len(text) > _MAX_ERR_CHARS:
        text = text[:_MAX_ERR_CHARS] + " ..."
    return f"{type(err).__name__}: {text}"
