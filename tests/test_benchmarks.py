"""The benchmark scripts' CPU smoke modes run and print their JSON figures (nothing about speed)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# Speed is not under test: skip LLVM's optimisations so that the smoke compiles take seconds.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _run(*args, devices: int = 1, timeout: int = 300) -> list[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout.strip().splitlines()


STEP_KEYS = ("step_time_s", "tokens_per_s", "compile_s", "mfu", "peak_memory_bytes", "memory_source",
             "flops_per_token", "device_kind", "jax_version", "git_commit", "date", "batch", "seq_len",
             "grad_accum", "tokens_per_step", "remat", "scan_layers", "loss_chunk", "env")


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_step_time_smoke_compare(tmp_path):
    """--smoke --compare: the AdamW baseline and the OSP recipe, each a plain --smoke run in a child."""
    out = tmp_path / "step_time.jsonl"
    lines = _run("benchmarks/step_time.py", "--smoke", "--compare", f"--output={out}", "--steps=2", "--warmup=0",
                 "--seq-len=64", "--set=model.layers=2", "--set=model.vocab_size=512", "--docs-per-window=3")
    record = json.loads(lines[-1])
    assert record["benchmark"] == "step_time_compare"
    for name, optimizer, norm in (("adamw", "adamw", "channel"), ("osp", "muon", "single")):
        run = record[name]
        for key in STEP_KEYS:
            assert key in run, (name, key)
        assert run["optimizer"] == optimizer and run["norm_scale"] == norm
        assert run["embed_proj"] == (name == "osp")
        assert run["steps"] == 2 and run["layers"] == 2 and run["step_time_s"] > 0 and run["tokens_per_s"] > 0
        assert run["tokens_per_step"] == run["batch"] * run["seq_len"] and run["docs_per_window"] == 3
        assert run["peak_memory_bytes"] > 0 and run["mfu"] is None  # CPU: peak FLOP/s unknown
        assert FAST_COMPILE in run["env"]["XLA_FLAGS"]  # the flags the step compiled under are recorded
        assert run["input_copies"] == {"count": 0, "bytes": 0, "names": []}  # the state is updated in place
    assert record["step_time_ratio"] > 0 and record["peak_memory_ratio"] > 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["benchmark"] for r in written] == ["step_time", "step_time", "step_time_compare"]


def test_step_time_plot_redraws_the_committed_gpu_results(tmp_path):
    """--plot draws the H100 records in benchmarks/results; settings that change the compiled step
    (unrolled layers, the loss in chunks, XLA flags) get bars of their own, not the latest record's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import _series

    results = ROOT / "benchmarks" / "results" / "h100_2026-11-23_session7.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    batch16 = {_series(r): round(r["tokens_per_s"]) for r in records if r.get("batch") == 16}
    assert batch16 == {"AdamW baseline, remat dots_attn": 54661,
                       "AdamW baseline, remat dots_attn, loss chunk 1024": 53201,
                       "AdamW baseline, remat dots_attn, layers unrolled": 57349,
                       "AdamW baseline, remat dots, layers unrolled": 55730,
                       "AdamW baseline, remat dots_attn, layers unrolled, "
                       "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false": 57540}
    png = tmp_path / "step_time.png"
    lines = _run("benchmarks/step_time.py", f"--plot={png}", f"--results={results}", "--goal=60000")
    assert lines[-1] == f"wrote {png}" and png.stat().st_size > 10_000


def test_muon_smoke():
    lines = _run("benchmarks/muon.py", "--smoke")
    records = [json.loads(line) for line in lines if line.startswith("{")]
    updates = [r for r in records if "optimizer" in r]
    assert {r["optimizer"] for r in updates} == {"osp_jax.muon", "optax.contrib.muon", "optax.adamw"}
    assert all(r["ms"] > 0 and r["device"] for r in updates)
    # Newton–Schulz alone, one row per same-shape group of the smoke tree (2 layers, dim 64, SwiGLU 176):
    # q, k, v, o of both layers and the two EmbProj matrices are 64 x 64; gate, up, down are 64 x 176.
    (ns,) = [r["newton_schulz_only"] for r in records if "newton_schulz_only" in r]
    assert [row["shape"] for row in ns] == [[10, 64, 64], [6, 64, 176]]
    assert all(row["ms"] > 0 and row["tflops"] >= 0 for row in ns)


@pytest.mark.slow  # over 15 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_muon_cost_and_accuracy_modes():
    cost = [json.loads(line) for line in _run("benchmarks/muon.py", "--smoke", "--cost") if line.startswith("{")]
    assert {r["optimizer"] for r in cost} == {"osp_jax.muon", "optax.contrib.muon", "optax.adamw"}
    flops = {r["optimizer"]: r["gflops"] for r in cost}
    assert flops["osp_jax.muon"] > 10 * flops["optax.adamw"]  # the Newton–Schulz matmuls are counted
    rows = [json.loads(line)["newton_schulz_rel_error_vs_float64"] for line in _run("benchmarks/muon.py", "--accuracy")]
    assert len(rows) == 4 and all(0 < r["rel_error"] < 0.05 for r in rows)  # bf16, not a different iteration


@pytest.mark.slow  # over 15 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_step_time_profile_writes_a_trace(tmp_path):
    lines = _run("benchmarks/step_time.py", "--smoke", "--steps=1", "--warmup=0", "--seq-len=64",
                 "--set=model.layers=2", "--set=model.vocab_size=512", "--set=model.remat=dots",
                 f"--profile={tmp_path / 'trace'}")
    assert json.loads(lines[-1])["benchmark"] == "step_time"
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # what benchmarks/trace_summary.py reads
    assert "op_name=" in (tmp_path / "trace" / "step.hlo.txt").read_text()
    # The summary printed after the trace attributes the ops to parts of the model and passes:
    # under remat=dots the SwiGLU is computed again in the backward pass, the matmuls are not.
    rows = {}
    for line in lines:
        cells = line.strip().rsplit(None, 7)
        if len(cells) == 8 and cells[-1].endswith("%"):
            rows[cells[0]] = [float(c) for c in cells[1:7]]
    forward, recompute, backward, outside, unknown, total = rows["MLP element-wise (SwiGLU)"]
    assert forward > 0 and recompute > 0 and backward > 0 and outside == 0
    assert rows["MLP matmuls gate/up/down"][1] == 0  # dots keeps the matmul outputs
    assert rows["optimizer, gradient norms, step metrics"][3] > 0


def test_trace_summary_model_parts():
    from benchmarks.trace_summary import hlo_op_names, model_part

    scope = "jit(train_step)/transpose(jvp(Transformer))/while/body/closed_call/checkpoint/"
    assert model_part(scope + "layers/attn/q/bsd,dhk->bshk/dot_general") == ("backward", "attention projections q/k/v/o")
    assert model_part(scope + "rematted_computation/layers/mlp/jit(silu)/logistic") == ("recompute", "MLP element-wise (SwiGLU)")
    assert model_part("jit(train_step)/jvp(Transformer)/while/body/closed_call/layers/attn_norm/mul") == ("forward", "norms")
    assert model_part("jit(train_step)/jvp(Transformer)/bsd,dv->bsv/dot_general") == ("forward", "LM head and loss")
    assert model_part("jit(train_step)/jit(_where)/select_n")[0] == "optimizer / step"
    assert model_part(None) == ("unattributed", "no op_name metadata")
    hlo = ('  %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(f)/mul" stack_frame_id=1}\n'
           '  ROOT %dot.1 = f32[8,8]{1,0} dot(%a, %b), metadata={op_name="jit(f)/dot_general"}\n'
           '  %param = f32[8]{0} parameter(0)\n')
    assert hlo_op_names(hlo) == {"fusion.3": "jit(f)/mul", "dot.1": "jit(f)/dot_general"}


def test_trace_summary_finds_the_instruction_of_a_gpu_kernel():
    """A traced op is tied to its HLO instruction by an `hlo_op` stat, by an `hlo_op=` field of a
    kernel annotation, or by the kernel's name, which XLA:GPU derives from the instruction's with `.`
    and `-` made `_` (an H100 trace of the third lease named its fusions so, and ran them from CUDA
    graphs, whose kernels all had `hlo_op` = the graph; the by-part table then found none of them)."""
    from types import SimpleNamespace

    from benchmarks.trace_summary import _hlo_instruction, sanitized_names

    op_names = {"loop_add_fusion.27": "jit(f)/add", "gemm_fusion_dot.557": "jit(f)/dot_general",
                "custom-call.4": "jit(f)/cudnn", "while.2": "jit(f)/while", "copy_1": "jit(f)/copy"}
    sanitized = sanitized_names(op_names)
    assert sanitized == {"loop_add_fusion_27": "loop_add_fusion.27", "gemm_fusion_dot_557": "gemm_fusion_dot.557",
                         "custom_call_4": "custom-call.4", "while_2": "while.2"}
    event = lambda name, **stats: SimpleNamespace(name=name, stats=list(stats.items()))
    assert _hlo_instruction(event("loop_add_fusion_27"), op_names, sanitized) == "loop_add_fusion.27"
    assert _hlo_instruction(event("gemm_fusion_dot_557"), op_names, sanitized) == "gemm_fusion_dot.557"
    assert _hlo_instruction(event("nvjet_sm90_tst_256x128", hlo_op="custom-call.4"), op_names, sanitized) == "custom-call.4"
    annotation = "custom-call.4:#hlo_op=custom-call.4,hlo_module=jit_train_step,program_id=7#"
    assert _hlo_instruction(event("nvjet_sm90_tst_256x128", kernel_annotation=annotation), op_names, sanitized) == "custom-call.4"
    assert _hlo_instruction(event("%fusion.3 = f32[8] fusion(%p)")) == "fusion.3"
    assert _hlo_instruction(event("nvjet_sm90_tst_256x128"), op_names, sanitized) == "nvjet_sm90_tst_256x128"  # no tie
    # A kernel replayed from a CUDA graph: `hlo_op` names the graph's instruction, which has no
    # metadata; the kernel's own name still ties a fusion, and nothing else ties a cuBLAS call.
    graph = {"hlo_op": "command_buffer_1", "hlo_module": "jit_train_step"}
    assert _hlo_instruction(event("loop_add_fusion_27", **graph), op_names, sanitized) == "loop_add_fusion.27"
    assert _hlo_instruction(event("nvjet_sm90_tst_256x128", **graph), op_names, sanitized) == "command_buffer_1"


def test_trace_summary_splits_a_committed_h100_trace_by_model_part(tmp_path):
    """The third lease's H100 trace (AdamW 1.4B, batch 8, dots_attn, its kernels replayed from CUDA
    graphs) with its compiled HLO: the fusions are tied to model parts, the cuBLAS and cuDNN calls
    inside the graphs are a row of their own."""
    import tarfile

    from benchmarks.trace_summary import summarize

    with tarfile.open(ROOT / "benchmarks" / "results" / "traces" / "h100_2026-11-23_adamw_dots_attn_batch8.tgz") as t:
        t.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    rows = {}
    for line in summarize(str(tmp_path), steps=3, top=0).splitlines():
        cells = line.strip().rsplit(None, 7)
        if len(cells) == 8 and cells[-1].endswith("%"):
            rows[cells[0]] = [float(c) for c in cells[1:7]]
    forward, recompute, backward, outside, unknown, total = rows["MLP element-wise (SwiGLU)"]
    assert (forward, recompute, backward) == (4.24, 0.0, 8.59)  # dots_attn recomputes no SwiGLU
    assert rows["norms"][1] > 0 and rows["optimizer, gradient norms, step metrics"][3] > 15
    assert rows["CUDA-graph kernels not tied to an op"][4] > 150
    assert "no op_name metadata" not in rows


def test_ablation_report_regenerates_from_the_committed_gpu_results(tmp_path):
    """--stage=sweep --report-only rebuilds the GPU sweep's table from experiments/results/gpu_124m
    (configs, metrics and evaluations copied back from the H100; no checkpoints, no data)."""
    doc = tmp_path / "ablation.md"
    lines = _run("experiments/ablation.py", "--preset=gpu_124m", "--out=experiments/results/gpu_124m",
                 "--data=absent", "--tokens=25e6", "--lrs=1e-3,2e-3,4e-3", "--sweep-fraction=0.25",
                 "--stage=sweep", "--report-only", f"--doc={doc}", f"--plots={tmp_path / 'p'}")
    text = doc.read_text()
    assert "<!-- ablation:gpu_124m:sweep:begin -->" in text
    assert "381 steps x 16 x 1024 tokens = 6.24 M tokens" in text
    osp = next(line for line in text.splitlines() if line.startswith("| Muon + SSNorm + EmbProj (OSP) | 0.004"))
    assert "| 0.077 |" in osp and "76.71 (1.036x)" in osp
    assert (tmp_path / "p_sweep_kurtosis.png").exists() and (tmp_path / "p_sweep_max_abs.png").exists()


def test_data_smoke():
    lines = _run("benchmarks/data.py", "--smoke")
    record = json.loads(lines[-1])
    assert record["benchmark"] == "data_pipeline"
    assert record["tokens_per_s"] > 0 and record["batches"] > 0


def test_synthetic_segments_pack_documents_like_the_pipeline():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import synthetic_segments

    ids, positions = synthetic_segments(2, 10, 3)  # lengths 3, 3 and the remaining 4
    assert ids.tolist() == [[1, 1, 1, 2, 2, 2, 3, 3, 3, 3]] * 2
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]] * 2
    ids, positions = synthetic_segments(1, 4, 1)
    assert ids.tolist() == [[1, 1, 1, 1]] and positions.tolist() == [[0, 1, 2, 3]]


def test_epochs_report_regenerates_from_the_committed_gpu_results(tmp_path):
    """--report-only rebuilds the H100 epochs table from experiments/results/gpu_124m_epochs."""
    doc = tmp_path / "ablation.md"
    _run("experiments/epochs.py", "--preset=gpu_124m", "--out=experiments/results/gpu_124m_epochs",
         "--train-tokens=8e6", "--epochs=1,2,4", "--arms=adam,osp", "--lrs=adam:1e-3,osp:4e-3",
         "--eval-tokens=524288", "--report-only", f"--doc={doc}", f"--plot={tmp_path / 'epochs.png'}")
    text = doc.read_text()
    assert "<!-- ablation:gpu_124m:epochs:begin -->" in text and "9.233 M training tokens" in text
    osp4 = next(line for line in text.splitlines() if line.startswith("| Muon + SSNorm + EmbProj (OSP) | 4 |"))
    assert "14.40 (4-4-4 not run)" in osp4 and "30.01 (1.111x)" in osp4
    adam4 = next(line for line in text.splitlines() if line.startswith("| Adam | 4 |"))
    assert "74.16 (1.060x)" in adam4
    assert (tmp_path / "epochs.png").exists()


def test_gpu_suite_lists_every_stage_it_runs(tmp_path):
    """The header of benchmarks/gpu_suite.sh documents exactly the stages its dispatcher knows, and
    an unknown stage is refused before anything runs."""
    import re

    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    documented = set(re.findall(r"^#   (?!bash )(\w+) ", text, flags=re.M))  # not the usage line
    dispatched = set(re.findall(r"^    (\w+)\) ", text, flags=re.M))
    assert documented == dispatched, (documented ^ dispatched)
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path), "no_such_stage"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stage no_such_stage" in proc.stderr


PREPARED_STAGES = ("compare_docs", "no_graphs", "fused_loss", "remat_norms", "precast", "compare_levers")


def test_gpu_suite_prepared_stages_run_their_commands(tmp_path):
    """The stages prepared for the next lease, run with a stand-in python that records each command
    line and the memory fraction it got: every stage runs to its end, every command is a step_time.py
    run with valid settings, and the batch-16 runs ask for 95% of the device (a helper that called
    itself instead once crashed every such stage)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "RUN ${XLA_PYTHON_CLIENT_MEM_FRACTION:-default} $*" >> "$LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "commands.txt"
    env = {**os.environ, "PYTHON": str(fake), "LOG": str(log)}
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "out"), *PREPARED_STAGES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout, proc.stdout
    runs = [line.split() for line in log.read_text().splitlines()]
    assert len(runs) == 11, runs
    from benchmarks.step_time import load_config, apply_overrides
    from osp_jax.config import validate
    for _, fraction, script, *args in runs:
        assert script == "benchmarks/step_time.py"
        batch = next(int(a.split("=")[1]) for a in args if a.startswith("--batch="))
        assert fraction == ("0.95" if batch >= 16 else "default"), args
        config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), "configs/osp_1b4.py")
        cfg = load_config(config)
        apply_overrides(cfg, [args[i + 1] for i, a in enumerate(args) if a == "--set"])
        validate(cfg)

@pytest.mark.slow  # over 15 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_step_time_compile_only_reports_memory_copies_and_collectives():
    """--compile-only: the compiler's per-device figures for a mesh, nothing run. On 4 devices split
    by fsdp the step gathers parameters and reduces gradients; on one it has no collective at all."""
    lines = _run("benchmarks/step_time.py", "--smoke", "--compile-only", "--seq-len=64", "--set=model.layers=2",
                 "--set=model.vocab_size=512", "--set=mesh.fsdp=4", devices=4)
    record = json.loads(lines[-1])
    assert record["benchmark"] == "step_memory" and record["mesh"]["fsdp"] == 4
    assert record["peak_memory_bytes"] > record["state_bytes"] > 0
    assert record["input_copies"]["count"] == 0
    kinds = record["collectives"]
    assert kinds["all-gather"]["ops"] > 0 and kinds["all-gather"]["bytes"] > 0
    assert kinds["total"]["bytes"] == sum(v["bytes"] for k, v in kinds.items() if k != "total")
    single = json.loads(_run("benchmarks/step_time.py", "--smoke", "--compile-only", "--seq-len=64",
                             "--set=model.layers=2", "--set=model.vocab_size=512", "--set=mesh.fsdp=1")[-1])
    assert single["collectives"]["total"] == {"ops": 0, "bytes": 0}


@pytest.mark.slow  # over 20 s on 2 cores: in the full suite (.ci/run), not in -m "not slow"
def test_collectives_reports_each_recipe_the_minimum_and_the_ratio(tmp_path):
    """benchmarks/collectives.py on one small mesh: the three compiles' collectives in native dtypes
    (Muon's moves are bfloat16 there, float32 in the compiled CPU program) and the minimum they are
    held to; the Muon update moves exactly the minimum in whole matrices."""
    out = tmp_path / "collectives.jsonl"
    lines = _run("benchmarks/collectives.py", "--config=configs/tiny.py", "--mesh=op=2,fsdp=2", "--batch=8",
                 "--seq-len=64", "--set=model.layers=2", "--set=model.vocab_size=512", f"--output={out}",
                 devices=4, timeout=600)
    record = json.loads(lines[-1])
    assert record["benchmark"] == "collectives" and record["mesh"] == {"dp": 1, "op": 2, "fsdp": 2, "tp": 1}
    assert set(record["runs"]) == {"adamw", "model", "osp"}
    osp = record["runs"]["osp"]
    assert all(run["remat_warnings"] == 0 for run in record["runs"].values())
    # Muon's all-to-alls are bfloat16 in the program, float32 once the CPU backend has compiled it.
    muon_a2a = osp["native"]["all-to-all"]["bytes"] - record["runs"]["model"]["native"]["all-to-all"]["bytes"]
    assert muon_a2a > 0 and osp["compiled"]["all-to-all"]["bytes"] - record["runs"]["model"]["compiled"][
        "all-to-all"]["bytes"] == 2 * muon_a2a
    least = osp["minimum"]
    assert least["ns_axes"] == ["op", "fsdp"] and least["total"] <= least["whole_matrices"] == record["minimum"]
    assert abs(record["muon_ratio"] - 1.0) < 0.01 and record["ratio"] == record["extra"] / record["minimum"]
    assert "minimum (the Muon move) in whole matrices" in "\n".join(lines)
    assert json.loads(out.read_text()) == record


def test_muon_cost_per_newton_schulz_method():
    """--ns-methods adds osp_jax's Muon with each method; Polar Express costs what the quintic costs,
    Gram Newton–Schulz less (the smoke tree's MLP matrices are wide: 64 x 176)."""
    cost = [json.loads(line) for line in _run("benchmarks/muon.py", "--smoke", "--cost",
                                               "--ns-methods=quintic,polar_express,gram") if line.startswith("{")]
    flops = {r["optimizer"]: r["gflops"] for r in cost}
    assert set(flops) == {"osp_jax.muon", "osp_jax.muon (polar_express)", "osp_jax.muon (gram)", "optax.contrib.muon",
                          "optax.adamw"}
    assert flops["osp_jax.muon (polar_express)"] == flops["osp_jax.muon"] > flops["osp_jax.muon (gram)"]


def test_ns_methods_report_regenerates_from_the_committed_results():
    """experiments/ns_methods.py's report from experiments/results/ns_methods_cpu.json: every method,
    shape, input and step count has a row entry; the FLOPs and losses docs/benchmarks.md quotes."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import ns_methods

    results = json.loads((ROOT / "experiments" / "results" / "ns_methods_cpu.json").read_text())
    assert len(results["accuracy"]) == len(ns_methods.SHAPES) * len(ns_methods.KINDS) * 3 * len(ns_methods.STEPS)
    text = ns_methods.report(results)
    for method in ("quintic", "polar_express", "gram"):
        assert text.count(f"| {method} |") == len(ns_methods.SHAPES) * len(ns_methods.KINDS) + 1
    assert "| osp_jax.muon (gram) | 55,933.0 | 0.864 |" in text
    assert "| 5.3099 ± 0.0283 | 5.3286, 5.2773, 5.3239 |" in text
