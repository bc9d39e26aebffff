"""Benchmark tasks through lm-evaluation-harness: `python -m osp_jax.evaluate --tasks=... | --suite=paper`.

    python -m osp_jax.evaluate --workdir=runs/x --tasks=arc_easy,piqa --bits=4,4,4 [--hadamard=ffn] \
        [--include-path=DIR] [--limit=N] [--batch-size=B] [--seq-len=S] [--output=scores.json]
    python -m osp_jax.evaluate --workdir=runs/x --suite=paper [--output=paper.json]

`--tasks` scores the run at 16-16-16 and at --bits (--hadamard, --method): one table, a column a task,
the average, and the drop from 16 bits. `--suite=paper` scores the paper's ten benchmarks (PAPER_SUITE)
at its three settings, 16-16-16, 4-4-4 and 4-4-4 +FFN Had (PAPER_SETTINGS), in the paper's shape: a row a
setting, a column a benchmark, and the average. The model is osp_jax.lm_eval_backend's; every setting
shares one read of the checkpoint and sees the same few-shot examples.

Before the checkpoint is read: the task names are checked (lm-eval's registry and --include-path), their
data loaded (offline, from the Hugging Face cache), and the settings checked against the run's config
(the KV quantiser's groups, room to generate), each problem one line and exit 2.

A task's score is its headline metric: acc_norm where the task reports it, else acc, else exact_match (of
its first filter), else its first metric. Averages are over accuracy metrics (acc, acc_norm, exact_match);
the table shows them in percent. The JSON keeps lm-eval's own numbers (fractions) and results.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Mapping, Sequence

from etils import epath

from osp_jax import cli, ptq
from osp_jax import lm_eval_backend as backend
from osp_jax.quant import Bits, parse_bits

FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed (lm_eval.defaults.DEFAULT_OTHER_SEED)
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")
HEADLINE_ORDER = ("acc_norm,none", "acc,none")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A column of the table: the mean of `metric` ("name,filter", lm-eval's key) over `tasks`, each
    scored with `shots` examples in its prompt."""

    column: str
    tasks: tuple[str, ...]
    shots: int
    metric: str


# The paper's ten benchmarks, as lm-eval 0.4 names them: zero-shot but GSM8K (8-shot) and TriviaQA
# (5-shot). ARC is the mean of its Easy and Challenge sets. The paper ran lighteval's prompts (SmolLM's
# suite); these are lm-eval's, so compare settings here with each other, not with the paper's numbers.
PAPER_SUITE = (
    Benchmark("ARC", ("arc_easy", "arc_challenge"), 0, "acc_norm,none"),
    Benchmark("CSQA", ("commonsense_qa",), 0, "acc,none"),
    Benchmark("GSM8K", ("gsm8k",), 8, "exact_match,flexible-extract"),
    Benchmark("HS", ("hellaswag",), 0, "acc_norm,none"),
    Benchmark("MMLU", ("mmlu",), 0, "acc,none"),
    Benchmark("OBQA", ("openbookqa",), 0, "acc_norm,none"),
    Benchmark("PIQA", ("piqa",), 0, "acc_norm,none"),
    Benchmark("SIQA", ("social_iqa",), 0, "acc,none"),
    Benchmark("TQA", ("triviaqa",), 5, "exact_match,remove_whitespace"),
    Benchmark("WG", ("winogrande",), 0, "acc,none"),
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One quantisation setting: W-A-KV bits and the FFN Hadamard rotation."""

    bits: Bits
    hadamard_ffn: bool = False


FULL_PRECISION = Setting(Bits(16, 16, 16))
PAPER_SETTINGS = (FULL_PRECISION, Setting(Bits(4, 4, 4)), Setting(Bits(4, 4, 4), hadamard_ffn=True))
SUITES = {"paper": (PAPER_SUITE, PAPER_SETTINGS)}


class TaskError(cli.UserError, ValueError):
    """An unknown task, or one whose data is not here: one line, exit 2."""


# ----------------------------------------------------------------------------------------------------
# Tasks: names checked, data loaded


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager over its own tasks and `include_path`'s YAMLs (indexing takes seconds: kept)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not epath.Path(include_path).is_dir():
        raise TaskError(f"--include-path={include_path}: no such directory")
    return TaskManager(include_path=include_path)


def resolve(names: Sequence[str], manager) -> list[str]:
    """Task, group and tag names (lm-eval's globs expanded) in order; TaskError naming an unknown one."""
    found: list[str] = []
    for name in names:
        matches = manager.match_tasks([name])
        if not matches:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = " or in --include-path" if manager.include_path else ""
            raise TaskError(f"--tasks: unknown task {name!r}: not among lm-eval's {len(manager.all_tasks)} tasks"
                            f"{where} (`lm_eval ls tasks` lists them){hint}")
        found += [m for m in matches if m not in found]
    return found


def _missing_data(name: str, e: BaseException) -> str:
    import datasets

    offline = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, and no copy in the Hugging Face cache " \
              f"{datasets.config.HF_DATASETS_CACHE}; fetch it once where the hub is reachable)" \
        if datasets.config.HF_HUB_OFFLINE else ""
    return f"task {name!r} needs data that is not here: {cli.one_line(e)}{offline}"


def load(names: Sequence[str], manager, shots: Mapping[str, int] | None = None) -> dict:
    """lm-eval's TaskDict ({"tasks", "groups", "group_map"}) of `names`, their data loaded, each task with
    `shots[name]` few-shot examples (else its own default, else none); TaskError naming a task whose data
    cannot be had."""
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        try:
            part = manager.load([name])
        except OSError as e:  # datasets: ConnectionError when offline or unreachable, FileNotFoundError
            raise TaskError(_missing_data(name, e)) from None
        for task in part["tasks"].values():
            n = (shots or {}).get(name)
            if n is not None:
                task.set_config(key="num_fewshot", value=n)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)  # as lm-eval's simple_evaluate does
        for key in loaded:
            loaded[key].update(part.get(key) or {})
    return loaded


def check_generation(loaded: dict, max_length: int, default_max_gen_toks: int = backend.DEFAULT_MAX_GEN_TOKS) -> None:
    """BackendError for a generation task the model cannot run: sampling, or no room left for a prompt."""
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") == "generate_until":
            _, max_gen = backend.gen_settings(task.get_config("generation_kwargs") or {}, default_max_gen_toks,
                                              f"task {name!r}")
            backend.check_generation(f"task {name!r}", max_gen, max_length)


def run(lm, loaded: dict, *, limit: int | None = None, bootstrap_iters: int = 100_000) -> dict:
    """lm-eval's results of `lm` on the loaded tasks; the few-shot examples drawn afresh from one seed, so
    every setting sees the same prompts."""
    from lm_eval.evaluator import evaluate

    for task in loaded["tasks"].values():
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)


# ----------------------------------------------------------------------------------------------------
# Scores


def entry(results: dict, name: str) -> dict:
    """The metrics lm-eval reports for a task or a group."""
    return results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}


def headline_metric(metrics: Mapping) -> str | None:
    """acc_norm, else acc, else exact_match (first filter by name), else the first metric."""
    keys = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    for key in HEADLINE_ORDER:
        if key in keys:
            return key
    exact = sorted(k for k in keys if k.startswith("exact_match,"))
    return exact[0] if exact else (keys[0] if keys else None)


def is_accuracy(metric: str | None) -> bool:
    return metric is not None and metric.split(",")[0] in ACCURACY_METRICS


def scores(results: dict, benchmarks: Sequence[Benchmark]) -> dict[str, float | None]:
    """Each benchmark's score: the mean of its metric over its tasks (None where a task lacks it)."""
    out: dict[str, float | None] = {}
    for b in benchmarks:
        values = [entry(results, t).get(b.metric) for t in b.tasks]
        out[b.column] = None if any(v is None for v in values) else float(sum(values) / len(values))
    return out


def average(values: Mapping[str, float | None], benchmarks: Sequence[Benchmark]) -> float | None:
    """The mean over the benchmarks scored by an accuracy (None when one of them has no score)."""
    picked = [values[b.column] for b in benchmarks if is_accuracy(b.metric)]
    if not picked or any(v is None for v in picked):
        return None
    return float(sum(picked) / len(picked))


def benchmarks_of(names: Sequence[str], results: dict) -> tuple[Benchmark, ...]:
    """A column a task (shots as loaded), scored by its headline metric in `results`."""
    shots = results.get("n-shot", {})
    return tuple(Benchmark(n, (n,), int(shots.get(n, 0) or 0), headline_metric(entry(results, n)) or "")
                 for n in names)


def record(workdir: str, step: int, names: Sequence[str], benchmarks: Sequence[Benchmark], runs: Sequence[tuple],
           limit: int | None) -> dict:
    """The JSON `--output` writes: a row a setting (scores, average), the drops from the first (16-bit)
    row, and lm-eval's own results of each setting. `runs`: (setting name, OspJaxLM, lm-eval results)."""
    import json

    import lm_eval
    from lm_eval.utils import handle_non_serializable

    rows = []
    for name, lm, results in runs:
        values = scores(results, benchmarks)
        rows.append({"name": name, "bits": dict(zip("w a kv".split(), lm.bits)),
                     "hadamard": "ffn" if lm.hadamard_ffn else None, "method": lm.method,
                     "scores": values, "average": average(values, benchmarks)})
    base = rows[0]
    minus = lambda a, b: None if a is None or b is None else a - b
    drops = {r["name"]: {**{c: minus(base["scores"][c], r["scores"][c]) for c in base["scores"]},
                         "average": minus(base["average"], r["average"])} for r in rows[1:]}
    return {
        "workdir": os.path.abspath(workdir), "step": int(step), "tasks": list(names), "limit": limit,
        "lm_eval_version": lm_eval.__version__,
        "columns": [{"name": b.column, "tasks": list(b.tasks), "shots": b.shots, "metric": b.metric}
                    for b in benchmarks],
        "settings": rows, "drop": drops,
        # lm-eval's own numbers, made JSON as its CLI makes them (NumPy scalars and the like)
        "lm_eval": json.loads(json.dumps({name: {k: results.get(k) for k in ("results", "groups", "n-shot", "versions")}
                                          for name, _, results in runs}, default=handle_non_serializable)),
    }


def format_table(rec: dict) -> str:
    """A Markdown table in the paper's shape: a row a setting, a column a benchmark, then the average;
    accuracies in percent; below, the drop of each quantised setting from the first (16-bit) row."""
    columns = rec["columns"]
    pct = lambda metric, v: "-" if v is None else (f"{100 * v:.1f}" if is_accuracy(metric) else f"{v:.4g}")
    header = ["setting", *(c["name"] for c in columns), "Avg."]
    body = [[r["name"], *(pct(c["metric"], r["scores"][c["name"]]) for c in columns), pct("acc", r["average"])]
            for r in rec["settings"]]
    body += [[f"drop {name}", *(pct(c["metric"], d[c["name"]]) for c in columns), pct("acc", d["average"])]
             for name, d in rec["drop"].items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    title = (f"step {rec['step']} of {rec['workdir']} | lm-eval {rec['lm_eval_version']}"
             + (f" | at most {rec['limit']} documents a task: a quick look, not a result" if rec["limit"] else ""))
    return "\n".join([title, "", line(header), rule, *map(line, body)])


# ----------------------------------------------------------------------------------------------------


def evaluate_tasks(workdir: str, *, tasks: str | None = None, suite: str | None = None, bits="4,4,4",
                   hadamard: str | None = None, method: str = "rtn", clip_search: bool = False,
                   step: int | None = None, include_path: str | None = None,
                   batch_size: int = backend.DEFAULT_BATCH_SIZE,
                   max_length: int | None = None, limit: int | None = None, calibration=None) -> dict:
    """Scores the run at each setting (--suite's, or 16-16-16 and `bits`), everything checked first.
    `calibration`: what OspJaxLM passes to osp_jax.ptq for the methods that calibrate (GPTQ)."""
    if (tasks is None) == (suite is None):
        raise TaskError("pass one of --tasks=NAME[,NAME...] or --suite=paper")
    if suite is not None:
        if suite not in SUITES:
            raise TaskError(f"--suite={suite!r}: expected one of {', '.join(SUITES)}")
        fixed, settings = SUITES[suite]
        names = [t for b in fixed for t in b.tasks]
        shots = {t: b.shots for b in fixed for t in b.tasks}
    else:
        fixed, names, shots = None, [t.strip() for t in tasks.split(",") if t.strip()], None
        if not names:
            raise TaskError(f"--tasks={tasks!r}: expected comma-separated task names")
        try:
            asked = Setting(bits if isinstance(bits, Bits) else parse_bits(bits), backend.parse_hadamard(hadamard))
        except ValueError as e:
            raise TaskError(str(e)) from None
        settings = (FULL_PRECISION,) if asked == FULL_PRECISION else (FULL_PRECISION, asked)
    try:
        ptq.check_method(method)  # checked even when only the 16-bit row is asked for
    except ValueError as e:
        raise TaskError(str(e)) from None
    checkpoint = backend.RunCheckpoint(workdir, step)
    manager = task_manager(include_path)
    names = resolve(names, manager)
    loaded = load(names, manager, shots)
    # The 16-bit row is the model as trained (no method: the drops are from it); each checks its bits
    # against the run's config.
    lms = [backend.OspJaxLM(checkpoint=checkpoint, bits=s.bits, hadamard="ffn" if s.hadamard_ffn else None,
                            batch_size=batch_size, max_length=max_length,
                            **({} if s == FULL_PRECISION else {"method": method, "clip_search": clip_search,
                                                               "calibration": calibration}))
           for s in settings]
    check_generation(loaded, lms[0].max_length)
    runs = []
    for lm in lms:
        cli.say("osp_jax.evaluate", f"scoring {len(loaded['tasks'])} task(s) at {lm.setting}")
        runs.append((lm.setting, lm, run(lm, loaded, limit=limit)))
        lm.release()
    benchmarks = fixed or benchmarks_of(names, runs[0][2])
    return record(workdir, checkpoint.restore()[0], names, benchmarks, runs, limit)
