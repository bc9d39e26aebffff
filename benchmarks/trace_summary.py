"""Where a traced step spends its device time: per-op totals from a `jax.profiler` trace.

    python benchmarks/trace_summary.py TRACE_DIR [--steps=N] [--top=40] [--hlo=FILE]

Reads the newest `*.xplane.pb` under TRACE_DIR (written by `benchmarks/step_time.py --profile=DIR`),
and for every device plane sums the duration of each op on its "XLA Ops" line (or, without one, on
its stream lines), divided by the number of traced steps. Without a device plane (the CPU backend),
the host threads' XLA op events are summed instead; they run in parallel, so their sum is busy time
over all threads, not wall time. Ops are grouped two ways:

- by kind (matmul, attention, element-wise fusion, copy, collective), from the op's name;
- by model part, when the compiled step's HLO text is at hand (`step.hlo.txt` beside the trace, which
  `step_time.py --profile` writes, or `--hlo`): every op's `op_name` metadata says which module of
  the model it came from (`layers/mlp/gate`, `layers/attn_norm`, ...) and in which pass (forward;
  backward; recomputed in the backward by remat; or outside the model: optimizer and step metrics).
  A fusion carries the metadata of one of the operations it fused, so this attribution is close but
  not exact.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re

HLO_FILE = "step.hlo.txt"

CATEGORIES = (  # first match wins; names are XLA's (fusion.12, cublas-gemm.3, ...) or the kernels'
    ("attention (cuDNN)", re.compile(r"cudnn|custom-call.*fmha|flash|fmha", re.I)),
    ("matmul", re.compile(r"gemm|dot|cublas|nvjet|matmul|convolution|triton_gemm", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|nccl", re.I)),
    ("copy / transpose", re.compile(r"^copy|transpose|memcpy|memset|dynamic-update-slice|concatenate", re.I)),
    ("reduce / fusion (elementwise)", re.compile(r"fusion|reduce|loop|input", re.I)),
)

# Model parts by the module path in an op's `op_name` (first match wins).
PARTS = (
    ("attention projections q/k/v/o", re.compile(r"layers/attn/[qkvo]/")),
    ("attention core (RoPE, kernel/softmax)", re.compile(r"layers/attn(/|$)")),
    ("MLP matmuls gate/up/down", re.compile(r"layers/mlp/(gate|up|down)/")),
    ("MLP element-wise (SwiGLU)", re.compile(r"layers/mlp(/|$)")),
    ("norms", re.compile(r"(attn_norm|mlp_norm|final_norm)(/|$)")),
    ("EmbProj", re.compile(r"(embed_proj|head_proj)(/|$)")),
    ("residual adds between sublayers", re.compile(r"layers(/[^/]*)?$")),
    ("layer scan (slicing, stacking, loop)", re.compile(r"/while(/body(/jit\(dynamic[^/]*\))?|/cond)?(/[^/]*)?$")),
    ("embedding lookup", re.compile(r"jit\(_take\)")),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its `op_name` metadata, over every computation of an HLO module's text."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=[^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        names[m.group(1)] = m.group(2)
    return names


def model_part(op_name: str | None) -> tuple[str, str]:
    """(pass, part) of an op from its `op_name`: pass is forward, backward, recompute (remat) or
    optimizer/step (outside the model); part is a row of PARTS."""
    if not op_name:
        return "unattributed", "no op_name metadata"
    if "Transformer)" not in op_name:
        return "optimizer / step", "optimizer, gradient norms, step metrics"
    if "rematted_computation" in op_name:
        phase = "recompute"
    elif "transpose(jvp(" in op_name:
        phase = "backward"
    else:
        phase = "forward"
    for label, pattern in PARTS:
        if pattern.search(op_name):
            return phase, label
    if "/while/" in op_name:
        return phase, "other layer ops"
    return phase, "LM head and loss"  # the rest of the model outside the layers: head matmuls, the loss


# Ops whose events span the ops of their bodies (the CPU backend traces a while loop as one event
# around its body's): counting them would count that time twice.
CONTAINERS = re.compile(r"^(while|conditional|call)(\.\d+)?$")


_HLO_OP_STAT = re.compile(r"hlo_op=([\w.\-]+)")


def _hlo_instruction(event, op_names: dict[str, str] | None = None, sanitized: dict[str, str] | None = None) -> str:
    """The HLO instruction an event ran. Candidates, in order: its `hlo_op` stat (CPU thunks, GPU
    kernels), an `hlo_op=` field inside any string stat (an XLA kernel annotation,
    `fusion.3:#hlo_op=fusion.3,hlo_module=...#`), and the first word of its name (an "XLA Ops" event may
    be named by the whole instruction, `%fusion.3 = ...`). The first candidate that `op_names` knows
    wins, else the first. A GPU kernel is named after its instruction with `.` and `-` made `_`
    (`loop_add_fusion_27` for `loop_add_fusion.27`; `sanitized`, from `sanitized_names`, maps such a
    name back), and a kernel replayed from a CUDA graph has `hlo_op` = the graph's instruction
    (`command_buffer_1`), which carries no metadata: then its name is what ties it."""
    stats = dict(event.stats)
    candidates = [stats.get("hlo_op")]
    candidates += [m.group(1) for v in stats.values() if isinstance(v, str) for m in [_HLO_OP_STAT.search(v)] if m]
    candidates.append(event.name)
    names = [str(c).lstrip("%").split(" ")[0] for c in candidates if c]
    if sanitized:
        names = [sanitized.get(n, n) for n in names]
    if op_names:
        for n in names:
            if n in op_names:
                return n
    return names[0]


def sanitized_names(op_names: dict[str, str]) -> dict[str, str]:
    """Kernel name (`.` and `-` made `_`) -> HLO instruction name, for names that differ."""
    out = {}
    for name in op_names:
        kernel = re.sub(r"[.\-]", "_", name)
        if kernel != name and kernel not in op_names:
            out[kernel] = name
    return out


def _op_lines(plane):
    lines = list(plane.lines)
    return [l for l in lines if l.name == "XLA Ops"] or [l for l in lines if l.name.startswith("Stream")]


def _host_op_events(plane):
    """The CPU backend's XLA op events: host-thread events that carry an `hlo_op` stat."""
    for line in plane.lines:
        for e in line.events:
            if "hlo_op" in dict(e.stats):
                yield e


def _load_hlo(trace_dir: str, hlo: str | None) -> dict[str, str] | None:
    path = hlo or os.path.join(trace_dir, HLO_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return hlo_op_names(f.read())


def summarize(trace_dir: str, steps: int = 1, top: int = 40, hlo: str | None = None) -> str:
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"trace_summary: no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    op_names = _load_hlo(trace_dir, hlo)
    sanitized = sanitized_names(op_names) if op_names else None
    planes = [(p.name, [e for l in _op_lines(p) for e in l.events], p) for p in data.planes
              if p.name.startswith("/device:")]
    if not planes:  # CPU: the ops run on host threads
        planes = [(f"{p.name} (XLA ops on host threads, summed over threads)", list(_host_op_events(p)), p)
                  for p in data.planes if p.name.startswith("/host:CPU")]
    out = []
    for title, events, plane in planes:
        totals: collections.Counter = collections.Counter()  # by event name (the kind comes from it)
        counts: collections.Counter = collections.Counter()
        # Event name -> time by (pass, part). Per event, not per name: one cuBLAS kernel name serves
        # the GEMMs of many instructions, in many parts of the model.
        parts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for e in events:
            instruction = _hlo_instruction(e, op_names, sanitized)
            if CONTAINERS.match(instruction):
                continue
            totals[e.name] += e.duration_ns
            counts[e.name] += 1
            if op_names is not None:
                part = model_part(op_names.get(instruction))
                if instruction not in op_names and instruction.startswith("command_buffer"):
                    part = ("unattributed", "CUDA-graph kernels not tied to an op")
                parts[e.name][part] += e.duration_ns
        busy = sum(totals.values())
        modules = [l for l in plane.lines if l.name == "XLA Modules"]
        span = sum(e.duration_ns for l in modules for e in l.events)
        names = [l.name for l in plane.lines]
        out.append(f"{title}: {len(names)} lines ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
        out.append(f"  op time per step {busy / steps / 1e6:.2f} ms"
                   + (f"; module time per step {span / steps / 1e6:.2f} ms" if span else ""))
        by_cat: collections.Counter = collections.Counter()
        for name, ns in totals.items():
            by_cat[category(name)] += ns
        for cat, ns in by_cat.most_common():
            out.append(f"  {cat:<32} {ns / steps / 1e6:9.2f} ms  {100 * ns / max(busy, 1):5.1f}%")
        if op_names is not None:
            out.extend(_by_part(parts, len(op_names), steps, busy))
        out.append(f"  top {top} ops (ms per step, calls per step, category):")
        for name, ns in totals.most_common(top):
            where = ""
            if op_names is not None:
                (main, _), *others = parts[name].most_common()
                where = " | " + "; ".join(main) + (f" (and {len(others)} more parts)" if others else "")
            out.append(f"    {ns / steps / 1e6:9.3f}  {counts[name] / steps:6.1f}  {category(name):<20} "
                       f"{name[:60]}{where}")
    return "\n".join(out)


def _by_part(parts, instructions: int, steps: int, busy: int) -> list[str]:
    """The "by model part" table: one row a part, one column a pass."""
    phases = ("forward", "recompute", "backward", "optimizer / step", "unattributed")
    heads = ("forward", "recompute", "backward", "opt./step", "unknown")
    grid: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for by_part in parts.values():
        for (phase, part), ns in by_part.items():
            grid[part][phase] += ns
    ms = lambda ns: f"{ns / steps / 1e6:9.2f}"
    rows = [f"  by model part (ms per step; from the HLO op_name metadata of {instructions} instructions):",
            f"    {'part':<40}" + "".join(f"{h:>11}" for h in heads) + f"{'total':>11}{'share':>8}"]
    for part, cells in sorted(grid.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(cells.values())
        rows.append(f"    {part:<40}" + "".join(f"{ms(cells[p]):>11}" for p in phases)
                    + f"{ms(total):>11}{100 * total / max(busy, 1):7.1f}%")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (totals are divided by it)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--hlo", default=None, help=f"the step's compiled HLO text (default: TRACE_DIR/{HLO_FILE})")
    args = p.parse_args(argv)
    print(summarize(args.trace_dir, args.steps, args.top, args.hlo))


if __name__ == "__main__":
    main()
