"""The JSON items of a step: `meta` (what the step records about itself) and `config` (the run's config).

`meta` holds the step, the time, the process and device counts, the data-shard layout, what the data position
belongs to (`data`: train.seed, data.path and the data's content, where the caller gives it), the versions, and the
checksum of every state leaf. Its checksums are computed on the devices while the save goes on in the background:
`MetaSave`'s handler waits for them in Orbax's background thread and only then writes the item, which Orbax
finishes before it commits the step. So a save does not wait for them, and a step never becomes complete without
them. The item is the file Orbax's JsonCheckpointHandler writes, so `ocp.args.JsonRestore()` reads it back.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from osp_jax.checkpoint.checksums import Pending

META_FILE = "metadata"  # JsonCheckpointHandler's file name, so that JsonRestore reads the item


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("osp_jax")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a checkout)
        import osp_jax

        return str(getattr(osp_jax, "__version__", "unknown"))


def meta_fields(step: int, data_shards: list[int] | None, data: dict | None = None) -> dict[str, Any]:
    """Everything `meta` records but the checksums; `data`: what the data position belongs to."""
    return {
        "step": step,
        "time": time.time(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_count": jax.process_count(),
        **({"data_shards": list(data_shards)} if data_shards is not None else {}),
        **({"data": data} if data is not None else {}),
        "device_count": jax.device_count(),
        "osp_jax_version": version(),
        "jax_version": jax.__version__,
        "orbax_version": ocp.__version__,
    }


def jsonable(obj):
    """A config as plain JSON values (ConfigDicts, tuples, numpy scalars...); anything else becomes its repr."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


class MetaHandler(ocp.handlers.JsonCheckpointHandler):
    """Writes `meta` once its checksums are ready, in Orbax's background thread; the primary host writes it.
    Reads it as JsonCheckpointHandler does (`MetaRestore`, or `ocp.args.JsonRestore()`)."""

    async def async_save(self, directory: epath.Path, item=None, args: "MetaSave | None" = None):
        args = args if args is not None else item
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(directory, args), name="osp_jax_meta")]

    async def _write(self, directory: epath.Path, args: "MetaSave") -> None:
        checksums = await asyncio.to_thread(args.checksums.result)  # waits for the devices, not for the loop
        if jax.process_index() == 0:
            text = json.dumps({**args.fields, "checksums": checksums})
            await asyncio.to_thread((directory / META_FILE).write_text, text)


@ocp.args.register_with_handler(MetaHandler, for_save=True)
@dataclasses.dataclass
class MetaSave(ocp.args.CheckpointArgs):
    """`meta`: `fields` (`meta_fields`) and the state's checksums, still computing."""

    fields: dict[str, Any]
    checksums: Pending


@ocp.args.register_with_handler(MetaHandler, for_restore=True)
@dataclasses.dataclass
class MetaRestore(ocp.args.CheckpointArgs):
    """Reads `meta` back (what a restore that names no arguments uses, from the handler the step records)."""
