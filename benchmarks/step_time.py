"""Training-step time, tokens/s, MFU and peak memory for a recipe, the way osp_jax.train runs it.

Builds the mesh, model, optimizer and sharded train state exactly as `osp_jax.train` does (same
`state_shardings`, `init_state`, `train_step`, donated state), feeds one synthetic batch that is
already on the devices (no input pipeline in the timing), and times `--steps` steps after
`--warmup` steps, blocking on the loss after each.

    python benchmarks/step_time.py --config=configs/osp_1b4.py --batch=16 --seq-len=2048 --steps=20
    python benchmarks/step_time.py --config=configs/osp_1b4.py --set model.remat=dots --optimizer=adamw
    python benchmarks/step_time.py --config=configs/osp_1b4.py --batch=256 --grad-accum=16 --compare
    python benchmarks/step_time.py --smoke            # tiny config on CPU, 3 steps, seconds

MFU = tokens/s x `osp_jax.model.flops_per_token` / (peak FLOP/s per device x devices), where
flops_per_token = 6 x matmul parameters + 12 x layers x heads x head_dim x seq (attention not halved
for causality) and the peak comes from `osp_jax.metrics.PEAK_TFLOPS` or `--peak-tflops`.

`--compare` runs the AdamW baseline (AdamW, per-channel RMSNorm, no EmbProj: configs/adam_1b4.py's
changes) and the OSP recipe (Muon, Single-Scale RMSNorm, EmbProj) for the same config, each in its
own process so that each gets its own peak-memory counter, and prints the ratios.

Prints a summary, then one JSON object as the last line; `--output FILE` appends it as a JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from osp_jax import compilation_cache  # noqa: E402
from osp_jax import config as config_lib  # noqa: E402
from osp_jax import metrics as metrics_lib  # noqa: E402
from osp_jax import sharding  # noqa: E402
from osp_jax.attention import pick_backend  # noqa: E402
from osp_jax.model import Transformer, count_params, flops_per_token, matmul_params  # noqa: E402
from osp_jax.optim import make_optimizer  # noqa: E402
from osp_jax.step import init_state  # noqa: E402
from osp_jax.train import jit_train_step, lower_train_step, state_shardings  # noqa: E402

SMOKE_CONFIG = "configs/tiny.py"
# The paper's ablation axes: what --compare changes on top of the given config.
BASELINE = {"optimizer.name": "adamw", "model.norm_scale": "channel", "model.embed_proj": False}
OSP = {"optimizer.name": "muon", "model.norm_scale": "single", "model.embed_proj": True}


# ---------------------------------------------------------------- config
def load_config(spec: str):
    """`path/to/recipe.py` or `path/to/recipe.py:ARG` -> the recipe's get_config() (ARG passed if given)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file() and (ROOT / path).is_file():
        file = ROOT / path
    if not file.is_file():
        raise SystemExit(f"step_time: --config={spec}: no such recipe file")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, old):
    if text.lower() in ("none", "null") and (old is None or not isinstance(old, str)):
        return None
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    for kind in (int, float):  # a None placeholder: the most specific number, else the text
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def apply_overrides(config, overrides) -> None:
    """`KEY=VALUE` strings (or a dict) onto `config`, each value parsed as the key's current type."""
    items = overrides.items() if isinstance(overrides, dict) else (o.split("=", 1) for o in overrides)
    for key, value in items:
        *sections, leaf = key.split(".")
        node = config
        for name in sections:
            if name not in node:
                raise SystemExit(f"step_time: --set {key}: config has no section {name!r}")
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"step_time: --set {key}: not a known config key")
        try:
            node[leaf] = value if not isinstance(value, str) else _parse_value(value, node[leaf])
        except (ValueError, TypeError) as e:
            raise SystemExit(f"step_time: --set {key}={value}: {e}") from None


# ---------------------------------------------------------------- provenance
def git_commit() -> tuple[str | None, bool | None]:
    """Short commit of the checkout and whether the working tree has changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _memory(compiled) -> tuple[int | None, str, dict]:
    """Peak device memory: the allocator's peak where the backend keeps one, else the compiled estimate."""
    analysis = {}
    try:
        m = compiled.memory_analysis()
        analysis = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                     "temp_size_in_bytes", "alias_size_in_bytes",
                                                     "generated_code_size_in_bytes") if hasattr(m, k)}
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "memory_stats.peak_bytes_in_use (device 0, whole process)", analysis
    if analysis:
        # Donated outputs reuse the argument buffers (alias), so they are counted once.
        estimate = (analysis["argument_size_in_bytes"] + analysis["output_size_in_bytes"]
                    + analysis["temp_size_in_bytes"] - analysis.get("alias_size_in_bytes", 0))
        return estimate, "compiled.memory_analysis: argument+output+temp-alias (per device, estimate)", analysis
    return None, "unavailable", analysis


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
              "f64": 8, "s64": 8, "u64": 8}


def _array_bytes(dtype: str, dims: str) -> int:
    """Bytes of an HLO array type, e.g. ("bf16", "8,2048") for bf16[8,2048]."""
    return _HLO_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)


def input_copies(hlo_text: str) -> dict:
    """Which of the compiled step's inputs (train state and batch) the executable copies before using
    them, from its optimised HLO: {"count", "bytes" (per device), "names"}. A donated state should be
    updated where it lies; a copy there costs a read and a write of it every step."""
    entry = hlo_text[hlo_text.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(\d+\)", entry))
    count, total, names = 0, 0, []
    for dtype, dims, operand in re.findall(r"= (\w+)\[([\d,]*)\]\S* copy\(%([\w.\-]+)\)", entry):
        if operand in params:
            count += 1
            total += _array_bytes(dtype, dims)
            names.append(operand)
    return {"count": count, "bytes": total, "names": names}


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo_text: str) -> dict:
    """The collectives of a compiled (partitioned) step, from its optimised HLO: {kind: {"ops", "bytes"}},
    bytes per device of each op's result, and their sum under "total". A static count: an op inside a
    loop (the layer scan, the micro-batches) counts once, however many times it runs."""
    out = {kind: {"ops": 0, "bytes": 0} for kind in COLLECTIVES}
    pattern = r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\("
    for shapes, kind in re.findall(pattern, hlo_text, flags=re.MULTILINE):
        out[kind]["ops"] += 1
        out[kind]["bytes"] += sum(_array_bytes(*t) for t in re.findall(r"(\w+)\[([\d,]*)\]", shapes))
    out["total"] = {"ops": sum(v["ops"] for v in out.values()), "bytes": sum(v["bytes"] for v in out.values())}
    return out


# ---------------------------------------------------------------- the benchmark
def synthetic_segments(batch_size: int, seq_len: int, docs_per_window: int):
    """Segment ids and positions of windows packed with `docs_per_window` documents of equal length (the
    last takes the remainder): ids 1, 2, ... and positions restarting at each document, as the data
    pipeline packs them."""
    if not 1 <= docs_per_window <= seq_len:
        raise ValueError(f"docs_per_window={docs_per_window}: between 1 and seq_len={seq_len}")
    length = seq_len // docs_per_window
    t = jnp.arange(seq_len, dtype=jnp.int32)
    doc = jnp.minimum(t // length, docs_per_window - 1)
    ids = jnp.broadcast_to(doc + 1, (batch_size, seq_len))
    positions = jnp.broadcast_to(t - doc * length, (batch_size, seq_len))
    return ids, positions


def measure(config, *, steps: int, warmup: int, peak_tflops: float | None = None, seed: int = 0,
            profile_dir: str | None = None, profile_steps: int = 3, docs_per_window: int = 1) -> dict:
    """Compiles and times the train step of a validated `config`; returns the record.

    The synthetic batch packs `docs_per_window` documents into each row (default 1), which decides how
    much the attention's document mask has to do.

    With `profile_dir`, `profile_steps` more steps run under `jax.profiler.trace` after the timed ones,
    and the compiled step's HLO text goes beside the trace as `step.hlo.txt`
    (`benchmarks/trace_summary.py` reads both)."""
    config_lib.validate(config)
    t, m = config.train, config.model
    batch_size, seq_len = t.global_batch_size, t.seq_len
    mesh = sharding.make_mesh(config.mesh)
    model = Transformer(m)
    tx, _ = make_optimizer(config, mesh)
    shardings = state_shardings(config, model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        init = jax.jit(functools.partial(init_state, config, model, tx), out_shardings=shardings)
        state = init(jax.random.key(seed))

        @functools.partial(jax.jit, out_shardings=batch_sharding)
        def synthetic_batch(key):
            tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, m.vocab_size, jnp.int32)
            segment_ids, positions = synthetic_segments(batch_size, seq_len, docs_per_window)
            return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
                    "segment_ids": segment_ids}

        batch = jax.block_until_ready(synthetic_batch(jax.random.key(seed + 1)))
        step_fn = jit_train_step(config, model, tx, shardings, mesh)
        start = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        hlo = compiled.as_text()

        for _ in range(warmup):
            state, out = compiled(state, batch)
            out["loss"].block_until_ready()
        times = []
        run_start = time.perf_counter()
        for _ in range(steps):
            step_start = time.perf_counter()
            state, out = compiled(state, batch)
            out["loss"].block_until_ready()
            times.append(time.perf_counter() - step_start)
        jax.block_until_ready(state)
        run_s = time.perf_counter() - run_start
        if profile_dir:
            with jax.profiler.trace(profile_dir):
                for _ in range(profile_steps):
                    state, out = compiled(state, batch)
                    out["loss"].block_until_ready()
            # The compiled step's HLO: its op_name metadata lets trace_summary.py say which part of
            # the model each traced op belongs to.
            pathlib.Path(profile_dir, "step.hlo.txt").write_text(hlo)
        loss = float(out["loss"])

    n_params = count_params(state.params)
    del state
    peak_bytes, memory_source, analysis = _memory(compiled)
    step_s = statistics.median(times)
    tokens_per_step = batch_size * seq_len
    tokens_per_s = tokens_per_step / step_s
    fpt = flops_per_token(m, seq_len)
    peak = metrics_lib.peak_flops_per_device(peak_tflops)
    devices = jax.device_count()
    commit, dirty = git_commit()
    device = jax.devices()[0]
    return {
        "benchmark": "step_time",
        "optimizer": config.optimizer.name,
        "norm_scale": m.norm_scale,
        "embed_proj": m.embed_proj,
        "params": n_params,
        "matmul_params": matmul_params(m),
        "layers": m.layers, "dim": m.dim, "heads": m.heads, "kv_heads": m.kv_heads, "ffn_dim": m.ffn_dim,
        "vocab_size": m.vocab_size,
        "dtype": m.dtype, "remat": m.remat, "scan_layers": m.scan_layers, "loss_chunk": m.loss_chunk,
        "loss_fused": m.loss_fused, "precast_weights": m.precast_weights,
        "attention": pick_backend(m.attention, dtype=m.dtype),
        "max_segments": m.max_segments, "pack_mask": config.data.pack_mask, "docs_per_window": docs_per_window,
        "mesh": dict(mesh.shape),
        "batch": batch_size, "seq_len": seq_len, "grad_accum": config.optimizer.grad_accum_steps,
        "tokens_per_step": tokens_per_step,
        "steps": steps, "warmup": warmup,
        "lower_s": round(lowered_at - start, 3),
        "compile_s": round(compiled_at - lowered_at, 3),
        "step_time_s": step_s,
        "step_time_min_s": min(times), "step_time_max_s": max(times),
        "step_time_mean_s": run_s / steps,  # wall time of all timed steps / steps, state blocked on at the end
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / devices,
        "flops_per_token": fpt,
        "peak_tflops_per_device": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else tokens_per_s * fpt / (peak * devices),
        "peak_memory_bytes": peak_bytes,
        "memory_source": memory_source,
        "compiled_memory": analysis,
        "input_copies": input_copies(hlo),
        "final_loss": loss,
        "device_kind": device.device_kind, "platform": device.platform, "device_count": devices,
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "env": runtime_env(),
        "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# The environment variables that change what a step costs: XLA's flags and the allocator's share of
# device memory (jax preallocates 75% by default; a batch that needs more must ask for it).
RUNTIME_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
               "XLA_PYTHON_CLIENT_ALLOCATOR", "LIBTPU_INIT_ARGS")


def runtime_env() -> dict:
    return {k: os.environ[k] for k in RUNTIME_ENV if k in os.environ}


def compile_memory(config) -> dict:
    """Compiles the train step from shapes alone (nothing allocated) and returns the compiler's
    per-device memory figures: how a config too big for this machine would fit on one that has it."""
    config_lib.validate(config)
    t = config.train
    mesh = sharding.make_mesh(config.mesh)
    start = time.perf_counter()
    lowered, state = lower_train_step(config, mesh)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    analysis = {k: int(getattr(m, k)) for k in fields}
    commit, dirty = git_commit()
    device = jax.devices()[0]
    return {
        "benchmark": "step_memory", "optimizer": config.optimizer.name, "norm_scale": config.model.norm_scale,
        "embed_proj": config.model.embed_proj, "params": count_params(state.params),
        "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
        "mesh": dict(mesh.shape), "batch": t.global_batch_size, "seq_len": t.seq_len,
        "grad_accum": config.optimizer.grad_accum_steps, "remat": config.model.remat,
        "compile_s": round(compile_s, 3), "compiled_memory": analysis,
        "input_copies": input_copies(hlo), "collectives": collectives(hlo),
        # XLA's own count, per device; a loop body counts once, and not every backend counts every op
        # (the GPU one leaves out its cuBLAS calls), so compare it only within one backend.
        "compiled_flops": metrics_lib.compiled_cost(compiled).get("flops"),
        # Donated outputs reuse the argument buffers (alias), so they are counted once.
        "peak_memory_bytes": analysis["argument_size_in_bytes"] + analysis["output_size_in_bytes"]
        + analysis["temp_size_in_bytes"] - analysis["alias_size_in_bytes"],
        "memory_source": "compiled.memory_analysis: argument+output+temp-alias (per device, estimate)",
        "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary(r: dict) -> str:
    if r["benchmark"] == "step_memory":
        m = r["compiled_memory"]
        return (f"{r['optimizer']} | {r['params'] / 1e6:,.1f}M params | mesh {r['mesh']} | batch {r['batch']} x seq "
                f"{r['seq_len']} (accum {r['grad_accum']}) | compiled in {r['compile_s']:.1f} s\n"
                f"  per device: state {r['state_bytes'] / 2**30:.2f} GiB, temporaries "
                f"{m['temp_size_in_bytes'] / 2**30:.2f} GiB, peak estimate {r['peak_memory_bytes'] / 2**30:.2f} GiB; "
                f"inputs copied {r['input_copies']['count']} ({r['input_copies']['bytes'] / 2**30:.2f} GiB); "
                f"collectives {r['collectives']['total']['ops']} ops, "
                f"{r['collectives']['total']['bytes'] / 2**20:,.1f} MiB (static count); "
                f"compiled FLOPs {(r['compiled_flops'] or 0) / 1e9:,.1f} G")
    mfu = "n/a (peak unknown)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
    return (f"{r['optimizer']} | {r['params'] / 1e6:,.1f}M params | {r['device_count']} x {r['device_kind']} | "
            f"mesh {r['mesh']} | batch {r['batch']} x seq {r['seq_len']} (accum {r['grad_accum']})\n"
            f"  compile {r['lower_s'] + r['compile_s']:.1f} s | step {1e3 * r['step_time_s']:.1f} ms "
            f"(median of {r['steps']}) | {r['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | "
            f"peak memory {mem} [{r['memory_source']}]")


def _append(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def compare(args) -> dict:
    """Runs the baseline and the OSP recipe in two child processes; returns the comparison record."""
    common = [f"--config={args.config}", *(f"--set={s}" for s in args.set), f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--seed={args.seed}", f"--docs-per-window={args.docs_per_window}",
              *(["--compile-only"] if args.compile_only else []),
              f"--compilation-cache-dir={args.compilation_cache_dir}"]
    for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len), ("--grad-accum", args.grad_accum),
                        ("--peak-tflops", args.peak_tflops)):
        if value is not None:
            common.append(f"{flag}={value}")
    runs = {}
    for name, recipe in (("adamw", BASELINE), ("osp", OSP)):
        sets = [f"--set={k}={v}" for k, v in recipe.items()]
        cmd = [sys.executable, os.path.abspath(__file__), *common, *sets]
        if args.output:
            cmd.append(f"--output={args.output}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
        if proc.returncode:
            raise SystemExit(f"step_time --compare: the {name} run failed (exit {proc.returncode})")
        print(proc.stdout.rstrip("\n").rsplit("\n", 1)[0], flush=True)  # its summary
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, o = runs["adamw"], runs["osp"]

    def ratio(key):
        return None if not a.get(key) or o.get(key) is None else o[key] / a[key]

    return {"benchmark": "step_time_compare", "config": args.config, "batch": o["batch"], "seq_len": o["seq_len"],
            "grad_accum": o["grad_accum"], "device_kind": o["device_kind"], "device_count": o["device_count"],
            "step_time_ratio": ratio("step_time_s"), "tokens_per_s_ratio": ratio("tokens_per_s"),
            "peak_memory_ratio": ratio("peak_memory_bytes"), "memory_source": o["memory_source"],
            "adamw": a, "osp": o, "git_commit": o["git_commit"], "git_dirty": o["git_dirty"], "date": o["date"]}


def _series(r: dict) -> str:
    """Recipe, then the remat policy and (when off) the document mask: one bar per combination."""
    if r["optimizer"] == "adamw" and r["norm_scale"] == "channel" and not r["embed_proj"]:
        name = "AdamW baseline"
    elif r["optimizer"] == "muon" and r["norm_scale"] == "single" and r["embed_proj"]:
        name = "OSP"
    else:
        name = f"{r['optimizer']}, {r['norm_scale']} norm{', EmbProj' if r['embed_proj'] else ''}"
    name += f", remat {r['remat']}"
    if r.get("pack_mask") is False or any(o.replace(" ", "").lower() == "data.pack_mask=false"
                                          for o in r.get("overrides", [])):
        name += ", causal only"
    elif r.get("attention") == "cudnn" and r.get("max_segments") == 0:
        name += ", dense document mask"  # records before model.max_segments existed carry no such field
    if r.get("docs_per_window", 1) > 1:
        name += f", {r['docs_per_window']} documents a row"
    if r.get("scan_layers") is False:
        name += ", layers unrolled"
    if r.get("loss_fused"):
        name += f", fused loss{' chunk ' + str(r['loss_chunk']) if r.get('loss_chunk') else ''}"
    elif r.get("loss_chunk"):
        name += f", loss chunk {r['loss_chunk']}"
    if r.get("precast_weights"):
        name += ", weights precast"
    if r.get("env", {}).get("XLA_FLAGS"):
        name += f", XLA_FLAGS={r['env']['XLA_FLAGS'].strip()}"
    return name


def plot(results: str, png: str, title: str | None = None, goal: float | None = None) -> None:
    """Horizontal bars of tokens/s, one per (shape, recipe and settings), grouped by shape, coloured by
    recipe; the latest record of each bar wins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    latest: dict = {}
    for r in records:
        if r.get("benchmark") != "step_time":
            continue
        group = (f"{r['layers']} layers, dim {r['dim']}, batch {r['batch']} x {r['seq_len']}"
                 + (f" ({r['grad_accum']} micro-batches)" if r.get("grad_accum", 1) > 1 else ""))
        latest[(group, _series(r))] = r
    if not latest:
        raise SystemExit(f"step_time: no step_time records in {results}")
    devices = sorted({f"{r['device_count']} x {r['device_kind']}" for r in latest.values()})
    groups = list(dict.fromkeys(g for g, _ in latest))
    rows = []  # (label, tokens/s, recipe); None rows are the groups' headings
    for g in groups:
        bars = sorted(((s, r) for (gg, s), r in latest.items() if gg == g), key=lambda x: -x[1]["tokens_per_s"])
        rows += [(g, None, None)] + [(s, r["tokens_per_s"], s.split(",")[0]) for s, r in bars]
    recipes = list(dict.fromkeys(rec for *_, rec in rows if rec))
    colours = {rec: plt.cm.tab10(i) for i, rec in enumerate(recipes)}
    fig, ax = plt.subplots(figsize=(13, 1.0 + 0.3 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    top = max([v for _, v, _ in rows if v] + [goal or 0])
    for y, (label, v, rec) in zip(ys, rows):
        if v is None:  # a heading: the shape of the step
            ax.text(0, y, label, fontsize=9, fontweight="bold", va="center")
            continue
        ax.barh(y, v, color=colours[rec], height=0.75)
        ax.text(v + 0.01 * top, y, f"{v:,.0f}", fontsize=8, va="center")
    ax.set_yticks([y for y, (_, v, _) in zip(ys, rows) if v is not None],
                  [label for label, v, _ in rows if v is not None], fontsize=8)
    ax.set_xlabel("tokens / s (median step)")
    ax.set_title(title or f"Training step throughput on {', '.join(devices)}", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[rec]) for rec in recipes]
    if goal:
        handles.append(ax.axvline(goal, ls="--", color="grey"))
        recipes = recipes + [f"goal: {goal:,.0f} tokens/s"]
    ax.legend(handles=handles, labels=recipes, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlim(0, 1.12 * top)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=None, help="recipe file (or FILE:ARG); default configs/osp_1b4.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. model.remat=dots or mesh.op=8; repeatable")
    p.add_argument("--optimizer", choices=("adamw", "muon", "muon_all"), default=None,
                   help="optimizer.name (default: the recipe's)")
    p.add_argument("--batch", type=int, default=None, help="sequences per optimizer step (default: the recipe's)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's train.seq_len")
    p.add_argument("--grad-accum", type=int, default=None, help="optimizer.grad_accum_steps (micro-batches)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling (default 3; 1 with --smoke)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="append the JSON record to this file")
    p.add_argument("--docs-per-window", type=int, default=1,
                   help="documents packed into each synthetic row (equal lengths), for the attention's mask")
    p.add_argument("--compare", action="store_true", help="AdamW baseline vs OSP recipe, same config")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace 3 more steps into DIR and print benchmarks/trace_summary.py's table")
    p.add_argument("--compile-only", action="store_true",
                   help="compile from shapes only and report the compiler's per-device memory (no run)")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_CONFIG} on CPU, batch 8, 3 steps")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="only draw tokens/s by config and optimizer from the --results JSON lines")
    p.add_argument("--results", default=None, metavar="JSONL", help="records written by --output, for --plot")
    p.add_argument("--title", default=None, help="plot title (default: names the devices of the records)")
    p.add_argument("--goal", type=float, default=None, help="tokens/s drawn as a dashed line on the --plot")
    p.add_argument("--compilation-cache-dir", default=compilation_cache.default_dir(),
                   help="JAX's persistent compilation cache ('' = off); a hit makes compile_s a load time")
    args = p.parse_args(argv)
    compilation_cache.enable(args.compilation_cache_dir)
    if args.plot:
        if not args.results:
            raise SystemExit("step_time: --plot needs --results=FILE (JSON lines written by --output)")
        plot(args.results, args.plot, args.title, args.goal)
        return
    if args.smoke:
        args.config = args.config or SMOKE_CONFIG
        args.batch = args.batch or 8
        args.steps = args.steps or 3
        args.warmup = 1 if args.warmup is None else args.warmup
    args.config = args.config or "configs/osp_1b4.py"
    args.steps = args.steps or 20
    args.warmup = 3 if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("step_time: --steps must be >= 1 and --warmup >= 0")
    if args.steps < 10 and not args.smoke:
        print(f"step_time: warning: a median of {args.steps} steps; the performance issue's figures are medians of "
              ">= 10 timed steps after warm-up", file=sys.stderr)

    if args.compare:
        record = compare(args)
        ratios = [(name, record[key]) for name, key in (("step time", "step_time_ratio"),
                  ("tokens/s", "tokens_per_s_ratio"), ("peak memory", "peak_memory_ratio")) if record[key] is not None]
        print("OSP / AdamW: " + ", ".join(f"{name} x{value:.3f}" for name, value in ratios), flush=True)
    else:
        config = load_config(args.config)
        apply_overrides(config, args.set)
        if args.optimizer:
            config.optimizer.name = args.optimizer
        if args.batch:
            config.train.global_batch_size = args.batch
        if args.seq_len:
            config.train.seq_len = args.seq_len
        if args.grad_accum:
            config.optimizer.grad_accum_steps = args.grad_accum
        try:
            config_lib.validate(config)
            dp, op, fsdp, _ = sharding.mesh_shape(config.mesh, jax.device_count())
            if config.train.global_batch_size % (dp * op * fsdp * config.optimizer.grad_accum_steps):
                raise config_lib.ConfigError(
                    f"--batch={config.train.global_batch_size} must be a multiple of grad_accum "
                    f"({config.optimizer.grad_accum_steps}) x the data-parallel devices dp*op*fsdp ({dp * op * fsdp})")
        except (config_lib.ConfigError, sharding.MeshError) as e:
            raise SystemExit(f"step_time: {e}") from None
        if args.compile_only:
            record = compile_memory(config)
        else:
            record = measure(config, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops,
                             seed=args.seed, profile_dir=args.profile, docs_per_window=args.docs_per_window)
            if args.profile:
                from trace_summary import summarize  # benchmarks/ is on sys.path as the script's folder

                print(summarize(args.profile, steps=3), flush=True)
        record["config"] = args.config
        record["overrides"] = list(args.set)
        print(summary(record), flush=True)
    record["compilation_cache_dir"] = args.compilation_cache_dir or None  # compile_s: compiled, or loaded
    _append(args.output, record)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
