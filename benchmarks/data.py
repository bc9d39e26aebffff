"""Input-pipeline throughput: tokens/s one process gets from the Grain pipeline (no accelerator involved).

    python benchmarks/data.py [--data=builtin|DIR] [--seq-len=2048] [--batch=8] [--seconds=5]
                              [--worker-count=0] [--prefetch=2]

Prints one JSON line a configuration. The goal is >= 1M tokens/s per process, far above what one
accelerator consumes for the models this project trains.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from osp_jax.data import pipeline  # noqa: E402


def measure(data_dir: str, *, seq_len: int, batch: int, seconds: float, worker_count: int, prefetch: int,
            split: str = "train") -> dict:
    t0 = time.perf_counter()
    it = pipeline.make_iterator(data_dir, split, seq_len=seq_len, global_batch_size=batch, seed=0,
                                process_index=0, process_count=1, worker_count=worker_count,
                                prefetch_buffer=prefetch)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(3):  # warm-up
        next(it)
    n, tokens = 0, 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        b = next(it)
        n += 1
        tokens += b["inputs"].size
    dt = time.perf_counter() - t
    it.close()
    return {"benchmark": "data_pipeline", "data": data_dir, "split": split, "seq_len": seq_len,
            "batch": batch, "worker_count": worker_count, "prefetch": prefetch, "batches": n,
            "seconds": round(dt, 3), "first_batch_s": round(first, 3),
            "tokens_per_s": round(tokens / dt), "batches_per_s": round(n / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help="builtin (default) or a prepared directory; repeatable")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--worker-count", type=int, action="append",
                    help="Grain worker processes (0: a prefetch thread); repeatable (default 0)")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one short run (1 s, seq 256, batch 4) for CI")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.seq_len, args.batch = 1.0, 256, 4
    for data in args.data or ["builtin"]:
        data_dir = pipeline.resolve_data_dir(data)
        for wc in args.worker_count or [0]:
            r = measure(data_dir, seq_len=args.seq_len, batch=args.batch, seconds=args.seconds,
                        worker_count=wc, prefetch=args.prefetch)
            r["data"] = data
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
