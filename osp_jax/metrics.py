"""What a run reports: outlier statistics, throughput and MFU, JSON-lines and TensorBoard writers.

The writers take a local or gs:// workdir (osp_jax.storage): on gs://, metrics.jsonl grows by GCS compose, a
line at a time, and tensorboardX writes its event file through google-cloud-storage itself (the whole file
uploaded again at each of its flushes, every two minutes and at close).

Excess kurtosis follows the OSP paper: for every token's hidden-state vector x,
`relu(mean(x**4) / std(x)**4 - 3)`, averaged over tokens. A Gaussian vector scores ~0; a vector
whose mass sits in a few channels (an activation outlier) scores up to about its width.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from osp_jax import cli, storage

# Dense bf16 peak FLOP/s per device, by `device.device_kind` prefix.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
    "TPU v3": 123.0,
}


def excess_kurtosis(hidden: jax.Array) -> jax.Array:
    """Per-token excess kurtosis `relu(mean(x^4) / std(x)^4 - 3)` over the last axis, in float32, exactly
    as the paper's script computes it (`evaluate_kurtosis.py`, torch): the fourth moment about zero, and
    the std about the mean with Bessel's correction (torch's default, ddof=1). Before 2026-11-23 osp_jax
    used ddof=0, which multiplies each token's ratio by (n / (n - 1))^2: kurtosis figures recorded
    before then (docs/ablation.md) read higher by at most 2 (K + 3) / n, 0.26% of K + 3 at dim 768.
    A token whose features are all equal (zero std) gets 0, not NaN or infinity. (That script also feeds
    each row as `seq.unsqueeze(1)`, tokens without context; osp_jax measures them in context.)"""
    x = hidden.astype(jnp.float32)
    var = jnp.var(x, axis=-1, ddof=1)
    fourth = jnp.mean(x ** 4, axis=-1)
    ratio = jnp.where(var > 0, fourth / jnp.maximum(var * var, jnp.finfo(jnp.float32).tiny), 0.0)
    return jax.nn.relu(ratio - 3.0)


def token_outliers(hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token (excess kurtosis, max |x|) over the last axis, in float32: what every outlier statistic
    of osp_jax is built from."""
    return excess_kurtosis(hidden), jnp.max(jnp.abs(hidden.astype(jnp.float32)), axis=-1)


def outlier_sums(kurtosis: jax.Array, max_abs: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Per layer, from per-token statistics (layers, batch, seq) and token weights (batch, seq): the
    weighted kurtosis sum and the max |x| over the tokens of positive weight. Sums and maxima, so the
    statistics of several batches combine exactly (`accumulate`); divide by the weights' sum for means."""
    weights = weights.astype(jnp.float32)
    return {"kurtosis_sum": jnp.sum(kurtosis * weights, axis=(1, 2)),
            "max_abs": jnp.max(jnp.where(weights > 0, max_abs, 0.0), axis=(1, 2))}


def accumulate(total: dict, stats: dict) -> dict:
    """`total` with one batch's `stats` added, host-side in float64: sums add, `*max_abs` keys take the
    maximum."""
    for k, v in stats.items():
        v = np.asarray(v, np.float64)
        if k not in total:
            total[k] = v
        else:
            total[k] = np.maximum(total[k], v) if k.endswith("max_abs") else total[k] + v
    return total


def outlier_stats(hidden: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """From hidden states (layers + 1, batch, seq, dim): kurtosis and max |activation| per layer, over the
    tokens `mask` (batch, seq) keeps (all when None; train passes segment ids > 0, so padding does not count)."""
    if mask is None:
        mask = jnp.ones(hidden.shape[1:3], jnp.float32)
    mask = mask.astype(jnp.float32)
    sums = outlier_sums(*token_outliers(hidden), mask)
    per_layer = sums["kurtosis_sum"] / jnp.maximum(mask.sum(), 1.0)
    return {"kurtosis_per_layer": per_layer, "kurtosis": per_layer.mean(),
            "max_abs_per_layer": sums["max_abs"], "max_abs": sums["max_abs"].max()}


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None where it is not known (CPU): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, tflops in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return tflops * 1e12
    return None


def compiled_cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled program ("flops", "bytes accessed", ...) as one dict, on jax
    versions that return a dict and on older ones that return one dict per program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return {k: float(v) for k, v in cost.items()}


class Throughput:
    """Tokens/s, MFU and ETA from wall-clock time between log points."""

    def __init__(self, flops_per_token: float, total_steps: int, tokens_per_step: int,
                 peak_flops_per_device: float | None, device_count: int):
        self.flops_per_token = flops_per_token
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.peak = None if peak_flops_per_device is None else peak_flops_per_device * device_count
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        self._last_time, self._last_step = time.perf_counter(), step

    def measure(self, step: int) -> dict[str, Any]:
        now = time.perf_counter()
        steps = step - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        mfu = None if self.peak is None else tokens_per_sec * self.flops_per_token / self.peak
        eta = (self.total_steps - step) * elapsed / max(steps, 1)
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu, "step_time": elapsed / max(steps, 1),
                "eta_seconds": eta}


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, m: dict) -> str:
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    # None right after a start: the first step's time is mostly compilation, not throughput
    speed = "n/a tok/s" if m.get("tokens_per_sec") is None else f"{m['tokens_per_sec']:,.0f} tok/s"
    eta = "n/a" if m.get("eta_seconds") is None else format_duration(m["eta_seconds"])
    parts += [f"lr {m['learning_rate']:.2e}", speed, f"MFU {mfu}", f"ETA {eta}"]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


def _jsonable(value):
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def set_aside_rows_after(path: str, step: int) -> int:
    """Moves the rows of metrics.jsonl at `path` whose step is past `step`, and any line that is not a
    JSON record with an integer `step` (cut off by a crash, say), to metrics.abandoned.jsonl beside it,
    appended, never dropped; returns how many moved. The kept rows are rewritten atomically."""
    path = epath.Path(path)
    if not storage.is_file(path):
        return 0
    keep, moved = [], []
    for line in io.StringIO(path.read_text(encoding="utf-8")):  # lines end at "\n" only, as a file's do
        if not line.strip():
            continue
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else moved).append(line if line.endswith("\n") else line + "\n")
    if moved:
        storage.append_text(path.parent / "metrics.abandoned.jsonl", "".join(moved))
        cli.write_text_atomic(path, "".join(keep))
    return len(moved)


def scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of a logged record, for the sinks that chart them: a per-layer list becomes `key/0`,
    `key/1`, ...; None (a figure not measured at this step) is left out; NaN and infinity stay numbers."""
    out = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, str):
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            continue
        if array.ndim == 0:
            out[key] = array.item()
        else:
            out.update({f"{key}/{i}": v for i, v in enumerate(array.ravel().tolist())})
    return out


class _TensorBoard:
    """TensorBoard event files under WORKDIR/tensorboard (tensorboardX)."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self._writer.close()


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors its numbers (`scalars`) to the
    sinks asked for: TensorBoard (the default), Weights & Biases (`wandb_project`, osp_jax.wandb_sink).

    Only process 0 writes; other processes get a writer that does nothing. A context manager: leaving it
    closes every sink, telling W&B whether the run failed.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool | None = None,
                 start_step: int | None = None, wandb_project: str | None = None,
                 run_config: dict | None = None):
        """`start_step`: the step training (re)starts from. Rows logged past it by an earlier attempt
        (steps after the checkpoint it resumes from, which are trained again) move to
        metrics.abandoned.jsonl, so metrics.jsonl reads as the one history that led to the model.
        `run_config`: the resolved config, which W&B shows with the run."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._sinks = []
        if not self.enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        path = epath.Path(workdir) / "metrics.jsonl"
        if start_step is not None:
            set_aside_rows_after(path, start_step)
        self._jsonl = storage.Appender(path)
        if tensorboard:
            try:
                self._sinks.append(_TensorBoard(workdir))
            except ImportError:  # TensorBoard is a nicety; the JSON lines are the record
                print("tensorboardX not installed: writing metrics.jsonl only", file=sys.stderr)
        if wandb_project:
            from osp_jax.wandb_sink import WandbSink
            self._sinks.append(WandbSink(workdir, wandb_project, run_config))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        values = scalars(metrics)
        for sink in self._sinks:
            sink.write(int(step), values)

    def close(self, failed: bool = False) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        while self._sinks:
            self._sinks.pop().close(failed=failed)

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
