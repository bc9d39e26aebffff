"""The training input as a fixed number of streams, so that its position survives a change of process layout.

A run's training split is read as `stream_count` streams: stream s packs the documents [s::stream_count] (the
pipeline of `pipeline.make_dataset` with process_index=s, process_count=stream_count) and gives
global_batch_size // stream_count windows to every global batch. The count is fixed when a run starts (its
number of data shards, `sharding.data_shard`: so each shard reads one stream, as before streams existed) and kept
by every resume, whatever the layout then:

    stream_count >= data shards   each shard reads stream_count // shards whole streams, one after another
    stream_count <  data shards   shards // stream_count shards read each stream, each keeping its part of the rows

So every global batch holds the same windows on any layout (rows may come in another order: the loss and its
gradient are sums over them), and the saved position is each stream's own, which `DataStreams.set_state` and
`set_state_from` put back on another layout. The counts must divide one another (StreamLayoutError otherwise).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from osp_jax.data.pipeline import PipelineError


class StreamLayoutError(PipelineError):
    """A saved position that this job's layout of data shards cannot read on from exactly."""


def shard_streams(shard: int, shards: int, stream_count: int) -> tuple[list[int], int, int]:
    """(streams, part, parts): the streams data shard `shard` of `shards` reads, and that it keeps part
    `part` of `parts` of their rows (0 of 1: all)."""
    if stream_count >= shards:
        if stream_count % shards:
            raise StreamLayoutError(f"{stream_count} data streams cannot be split evenly over {shards} data shards")
        per = stream_count // shards
        return list(range(shard * per, (shard + 1) * per)), 0, 1
    if shards % stream_count:
        raise StreamLayoutError(f"{shards} data shards cannot share {stream_count} data streams evenly")
    parts = shards // stream_count
    return [shard // parts], shard % parts, parts


def stream_holder(stream: int, stream_count: int, shards: int) -> int:
    """The data shard that reads `stream` (the first of those that share it)."""
    if stream_count >= shards:
        return stream // (stream_count // shards)
    return stream * (shards // stream_count)


class DataStreams:
    """This data shard's training batches: its streams' batches, concatenated (or its part of one stream's).

    `make_stream(stream, stream_count, global_batch_size)` opens one stream: an iterator of that stream's
    share of each global batch (global_batch_size // stream_count windows) with get_state/set_state/close.
    """

    def __init__(self, make_stream: Callable[[int, int, int], Any], *, shard: int, shards: int,
                 global_batch_size: int, stream_count: int | None = None):
        self._make, self._shard, self._shards, self._global = make_stream, int(shard), int(shards), global_batch_size
        self._streams: dict[int, Any] = {}
        self._open(stream_count or self._shards)

    @property
    def stream_count(self) -> int:
        return self._count

    def _open(self, stream_count: int) -> None:
        streams, part, parts = shard_streams(self._shard, self._shards, stream_count)
        if self._global % stream_count:
            raise StreamLayoutError(f"train.global_batch_size={self._global} does not split into the run's "
                                    f"{stream_count} data streams")
        self.close()
        self._count, self._part, self._parts = stream_count, part, parts
        self._streams = {s: self._make(s, stream_count, self._global) for s in streams}

    def restart(self) -> None:
        """From the start of the data, as a fresh run on this layout reads it."""
        self._open(self._shards)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(it) for it in self._streams.values()]
        batch = {k: np.concatenate([b[k] for b in batches]) if len(batches) > 1 else batches[0][k] for k in batches[0]}
        if self._parts > 1:
            rows = len(batch["inputs"]) // self._parts
            batch = {k: v[self._part * rows:(self._part + 1) * rows] for k, v in batch.items()}
        return batch

    def get_state(self) -> dict:
        return {"stream_count": self._count, "streams": {str(s): it.get_state() for s, it in self._streams.items()}}

    def set_state(self, state: dict) -> None:
        """A state this shard saved (or, saved before streams existed, the state of its own shard's pipeline)."""
        if "streams" not in state:
            state = {"stream_count": self._shards, "streams": {str(self._shard): state}}
        self._apply(int(state["stream_count"]), {int(s): v for s, v in state["streams"].items()})

    def set_state_from(self, saved_shards: list[int], read: Callable[[int], dict]) -> None:
        """The position another layout of processes saved: `saved_shards[i]` is the data shard process i read,
        `read(i)` the state it saved. Reads only the states of the processes that held this shard's streams."""
        shards = len(set(saved_shards))
        cache: dict[int, dict] = {}

        def saved(i: int) -> dict:
            if i not in cache:
                cache[i] = read(i)
            return cache[i]

        count = int(saved(0).get("stream_count", shards))  # before streams: one stream a data shard
        streams, _, _ = shard_streams(self._shard, self._shards, count)
        states = {}
        for s in streams:
            process = saved_shards.index(stream_holder(s, count, shards))
            state = saved(process)
            states[s] = state["streams"][str(s)] if "streams" in state else state
        self._apply(count, states)

    def _apply(self, stream_count: int, states: dict[int, Any]) -> None:
        if stream_count != self._count:
            self._open(stream_count)
        missing = sorted(set(self._streams) - set(states))
        if missing:
            raise StreamLayoutError(f"the saved data position has no state for stream(s) {missing} of {stream_count}")
        for s, it in self._streams.items():
            it.set_state(states[s])

    def close(self) -> None:
        for it in self._streams.values():
            it.close()
        self._streams = {}
