"""The lm-evaluation-harness backend (osp_jax.lm_eval_backend), offline, on a tiny trained run.

Local tasks built from the built-in corpus (lm-eval YAMLs with `dataset_path: json`): the true next
sentence among four (loglikelihood), held-out passages (loglikelihood_rolling), and continuations cut at
a stop string (generate_until). The run is exported with `osp_jax.export` and the same tasks scored by
lm-eval's own `hf` backend: per-item log-likelihoods, accuracies and greedy text must agree at 16 bits.
At 4 bits the backend must match a direct, unpadded, one-device reference of the quantised model.
"""
import os

# Before datasets / huggingface_hub are imported: no test may reach the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import lzma  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.conftest import require  # noqa: E402

lm_eval = require("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from osp_jax import benchmark_tasks as bt  # noqa: E402
from osp_jax import cli, ptq  # noqa: E402
from osp_jax import evaluate as ev  # noqa: E402
from osp_jax import export as ex  # noqa: E402
from osp_jax import lm_eval as lm_eval_cli  # noqa: E402
from osp_jax import lm_eval_backend as backend  # noqa: E402
from osp_jax.config import defaults, validate  # noqa: E402
from osp_jax.data import pipeline  # noqa: E402
from osp_jax.model import Transformer  # noqa: E402
from osp_jax.quant import Bits  # noqa: E402
from tests.helpers import train_and_save_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64
STEPS = 250
GEN_TOKS = 12
TASKS = ("osp_next_sentence", "osp_passages", "osp_continue")


def _corpus(n: int) -> list[str]:
    texts = []
    with lzma.open(pipeline.builtin_files()[0], "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]


def _write_tasks(root, docs: list[str], held_out: list[str]) -> str:
    """Three lm-eval tasks over local JSON lines, in `root`/tasks."""
    rng = np.random.default_rng(0)
    folder = root / "tasks"
    folder.mkdir()
    short = lambda s: len(s) < 150  # a choice must fit max_length, as in lm-eval's hf backend
    pool = [s for d in docs for s in _sentences(d) if short(s)]
    items = []
    for d in docs:
        sents = _sentences(d)
        for i in [i for i in range(2, len(sents)) if short(sents[i])][:6]:
            # Contexts of 1 to 6 sentences: the longest pass max_length and are cut from the left.
            context = " ".join(sents[max(0, i - 1 - len(items) % 6):i])
            wrong = [str(s) for s in rng.choice([s for s in pool if s != sents[i]], 3, replace=False)]
            label = int(rng.integers(4))
            items.append({"context": context, "choices": wrong[:label] + [sents[i]] + wrong[label:], "label": label})
    _jsonl(folder / "next_sentence.jsonl", items[:24])
    _jsonl(folder / "passages.jsonl", [{"text": t[:1200]} for t in held_out])
    # Cut mid-sentence, so that the text goes on before a stop; the longest are cut from the left.
    prompts = [" ".join(d.split()[:n]) for d, n in zip(docs + held_out, (7, 20, 45, 11, 30, 60))]
    _jsonl(folder / "continue.jsonl", [{"prompt": p, "target": "x"} for p in prompts])
    yaml = {
        "next_sentence": ("multiple_choice", "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                          "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "passages": ("loglikelihood_rolling", "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                     "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
        "continue": ("generate_until", "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                     f"generation_kwargs:\n  until: ['.']\n  do_sample: false\n  max_gen_toks: {GEN_TOKS}\n"
                     "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (kind, rest) in yaml.items():
        (folder / f"{name}.yaml").write_text(
            f"task: osp_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"test_split: test\noutput_type: {kind}\n{rest}", encoding="utf-8")
    return str(folder)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _docs():
    """Five training documents and three held out."""
    texts = _corpus(8)
    return [t[:1500] for t in texts[:5]], texts[5:8]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    """The folder of the three local tasks."""
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), *_docs())


@pytest.fixture(scope="module")
def run(tmp_path_factory, tasks):
    """A tiny OSP model (SSNorm, EmbProj, GQA, scanned layers) trained with Adam on five documents of the
    built-in corpus, saved as train saves it (checkpoint, config.json, tokenizer.json), exported to Hugging
    Face in float32; and the local tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    docs, _ = _docs()
    _, tok_path = pipeline.builtin_files()
    c = defaults()
    c.model.update(vocab_size=4096, dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=48, dtype="float32", remat="none")
    c.train.update(steps=STEPS, global_batch_size=8, seq_len=SEQ)
    validate(c)

    workdir = root / "run"
    assert train_and_save_run(c, docs, tok_path, workdir, steps=STEPS, seq=SEQ) < 3.0
    cli.write_json(workdir / "config.json", c.to_dict())
    hf = root / "hf"
    assert ex.main([f"--workdir={workdir}", f"--output={hf}", "--dtype=float32"]) == 0
    return {"root": root, "workdir": str(workdir), "hf": str(hf), "tasks": tasks}


@pytest.fixture(scope="module")
def local_tasks(run):
    """lm-eval's TaskManager over the local tasks only (indexing lm-eval's own takes seconds)."""
    return TaskManager(include_path=run["tasks"], include_defaults=False)


def _simple(run, local_tasks, model: str, model_args: dict, tasks=TASKS):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=local_tasks,
                                   batch_size=4, device="cpu", bootstrap_iters=0, log_samples=True)


def _resps(results, task: str) -> list:
    """The filtered responses of each document, in document order."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def both(run, local_tasks):
    """The three tasks through lm-eval: osp_jax at 16 bits, and lm-eval's hf backend on the export."""
    osp = _simple(run, local_tasks, "osp_jax", {"workdir": run["workdir"]})
    hf = _simple(run, local_tasks, "hf", {"pretrained": run["hf"], "dtype": "float32"})
    return osp, hf


# ----------------------------------------------------------------------------------------------------
# Against lm-eval's own hf backend and transformers


@pytest.mark.slow
def test_loglikelihoods_and_accuracy_agree_with_the_hf_backend(both):
    osp, hf = both
    a, b = _resps(osp, "osp_next_sentence"), _resps(hf, "osp_next_sentence")
    assert len(a) == len(b) >= 20
    ll_a = np.array([[ll for ll, _ in doc] for doc in a])
    ll_b = np.array([[ll for ll, _ in doc] for doc in b])
    np.testing.assert_allclose(ll_a, ll_b, rtol=1e-3)
    assert [[g for _, g in doc] for doc in a] == [[g for _, g in doc] for doc in b]
    for metric in ("acc,none", "acc_norm,none"):
        assert osp["results"]["osp_next_sentence"][metric] == hf["results"]["osp_next_sentence"][metric]
    assert osp["results"]["osp_next_sentence"]["acc,none"] > 0.4  # chance is 0.25: the model learnt the text
    rolling_a = np.array([float(np.ravel(r)[0]) for r in _resps(osp, "osp_passages")])
    rolling_b = np.array([float(np.ravel(r)[0]) for r in _resps(hf, "osp_passages")])
    assert len(rolling_a) == 3 and np.all(rolling_a < 0)
    np.testing.assert_allclose(rolling_a, rolling_b, rtol=1e-3)


@pytest.mark.slow
def test_generation_is_transformers_greedy_text(run, both):
    import torch
    import transformers

    osp, hf = both
    texts = [r if isinstance(r, str) else r[0] for r in _resps(osp, "osp_continue")]
    assert texts == [r if isinstance(r, str) else r[0] for r in _resps(hf, "osp_continue")]
    tok = transformers.AutoTokenizer.from_pretrained(run["hf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(run["tasks"], "continue.jsonl"))]
    for prompt, text in zip(prompts, texts):
        ids = tok(prompt, return_tensors="pt").input_ids[:, -(SEQ - GEN_TOKS):]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=GEN_TOKS, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0]
        assert text == expected, (prompt, text, expected)
    assert sum(len(t) > 10 for t in texts) >= 4  # real continuations, not an immediate stop


# ----------------------------------------------------------------------------------------------------
# Quantised, sharded, padded == a direct reference


def _instances(kind: str, args: list[tuple]) -> list:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _reference_logp(q, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[:i + 1]) for every i, and the argmax there: the quantised model on the
    unpadded sequence, on one device, float64 on the host."""
    model = Transformer(q.model_config, quant=q.spec)
    with jax.default_matmul_precision("float32"):
        logits = jax.jit(model.apply)({"params": jax.device_put(q.params, jax.devices()[0])}, np.asarray([ids]))
    return np.asarray(jax.nn.log_softmax(logits[0]), np.float64)


@pytest.mark.slow
def test_quantised_requests_match_a_direct_reference_on_8_and_1_devices(run):
    texts = _corpus(8)[5:]
    pairs = [(texts[0][:300], texts[0][300:330]), (texts[1][:40], " the"), ("", texts[2][:50]),
             (texts[1][:900], texts[1][900:960])]  # the last passes max_length: cut from the left
    shared = backend.RunCheckpoint(run["workdir"])
    lms = {n: backend.OspJaxLM(checkpoint=shared, bits="4-4-4", hadamard="ffn", batch_size=3, devices=n)
           for n in (None, 1)}
    got = {n: lm.loglikelihood(_instances("loglikelihood", pairs)) for n, lm in lms.items()}
    assert len(jax.devices()) == 8 and lms[None]._run().mesh.devices.size == 8
    assert lms[1]._run().mesh.devices.size == 1
    _, params, config = shared.restore()
    q = ptq.quantize_model(params, backend.eval_model_config(config.model), Bits(4, 4, 4), hadamard_ffn=True)
    tok = lms[1].run_tokenizer
    for (context, cont), (ll8, g8), (ll1, g1) in zip(pairs, got[None], got[1]):
        ctx_ids, cont_ids = lms[1]._encode_pair(context, cont) if context else ([tok.eos_id], tok.encode(cont))
        ids = (ctx_ids + cont_ids)[-(SEQ + 1):]
        logp = _reference_logp(q, ids[:-1])
        span = range(len(ids) - len(cont_ids), len(ids))
        assert ll8 == pytest.approx(sum(logp[i - 1, ids[i]] for i in span), rel=1e-5)
        assert ll1 == pytest.approx(ll8, rel=1e-5)
        assert g8 == g1 == all(np.argmax(logp[i - 1]) == ids[i] for i in span)
    fp = backend.OspJaxLM(checkpoint=shared, batch_size=3).loglikelihood(_instances("loglikelihood", pairs))
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(fp, got[1]))  # 4 bits change every score

    rolling = {n: lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t[:500],) for t in texts]))
               for n, lm in lms.items()}
    np.testing.assert_allclose(rolling[None], rolling[1], rtol=1e-5)

    # Generation: every token the greedy one of the quantised model given all before it (checked in
    # one unpadded pass a prompt), and a row that stops early stops at EOS.
    prompts = [texts[0][:200], texts[1][:50], texts[2][:900]]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    gen = {n: lm.generate_until(_instances("generate_until", [(p, kwargs) for p in prompts]))
           for n, lm in lms.items()}
    assert gen[None] == gen[1]
    made = lms[1].greedy_ids([tok.encode(p) for p in prompts], 8, ["\n\n"])
    assert [tok.decode(ids).split("\n\n")[0] for ids in made] == gen[1]
    for prompt, new in zip(prompts, made):
        ids = tok.encode(prompt)[-(SEQ - 8):] + new
        logp = _reference_logp(q, ids)
        start = len(ids) - len(new)
        assert [int(np.argmax(logp[i - 1])) for i in range(start, len(ids))] == new
        if len(new) < 8 and "\n\n" not in tok.decode(new):
            assert int(np.argmax(logp[-1])) == tok.eos_id


# ----------------------------------------------------------------------------------------------------
# The evaluate CLI's --tasks table and JSON, and the paper's suite


def _main(capsys, *args):
    code = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _no_restore(monkeypatch):
    """Reading the checkpoint fails the test: bad input must be found before it."""
    def fail(self):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(backend.RunCheckpoint, "restore", fail)


@pytest.mark.slow
def test_tasks_table_and_json(run, capsys, tmp_path):
    out_json = tmp_path / "tasks.json"
    code, out, err = _main(capsys, f"--workdir={run['workdir']}", "--tasks=osp_next_sentence,osp_passages",
                           f"--include-path={run['tasks']}", "--bits=4,4,4", "--hadamard=ffn", "--batch-size=4",
                           f"--output={out_json}")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert [s["name"] for s in r["settings"]] == ["16-16-16", "4-4-4 +FFN Had"] and r["step"] == STEPS
    assert [c["name"] for c in r["columns"]] == ["osp_next_sentence", "osp_passages"]
    assert [c["metric"] for c in r["columns"]] == ["acc_norm,none", "word_perplexity,none"]
    full, quant = r["settings"]
    assert full["bits"] == {"w": 16, "a": 16, "kv": 16} and quant["bits"] == {"w": 4, "a": 4, "kv": 4}
    assert quant["hadamard"] == "ffn" and quant["method"] == "rtn"
    # The average is over the accuracies only; the drop is 16 bits minus the setting.
    assert full["average"] == full["scores"]["osp_next_sentence"]
    drop = r["drop"]["4-4-4 +FFN Had"]
    assert drop["average"] == pytest.approx(full["average"] - quant["average"])
    assert drop["osp_passages"] == pytest.approx(full["scores"]["osp_passages"] - quant["scores"]["osp_passages"])
    assert quant["scores"]["osp_passages"] > full["scores"]["osp_passages"] > 1  # 4 bits cost perplexity
    lm_eval_16 = r["lm_eval"]["16-16-16"]["results"]
    assert lm_eval_16["osp_next_sentence"]["acc_norm,none"] == full["scores"]["osp_next_sentence"]
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("|")]
    assert table[0] == ["setting", "osp_next_sentence", "osp_passages", "Avg."]
    assert table[2][:2] == ["16-16-16", f"{100 * full['scores']['osp_next_sentence']:.1f}"]
    assert [row[0] for row in table[3:]] == ["4-4-4 +FFN Had", "drop 4-4-4 +FFN Had"]

    # The same numbers through `python -m osp_jax.lm_eval` (lm-eval's own CLI, osp_jax registered).
    out_dir = tmp_path / "lm_eval_out"
    proc = subprocess.run([sys.executable, "-m", "osp_jax.lm_eval", "--model", "osp_jax", "--model_args",
                           f"workdir={run['workdir']},bits=4-4-4,hadamard=ffn", "--batch_size", "4", "--tasks",
                           "osp_next_sentence", "--include_path", run["tasks"], "--output_path", str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(next(out_dir.rglob("results_*.json")).read_text())
    assert saved["results"]["osp_next_sentence"]["acc_norm,none"] == quant["scores"]["osp_next_sentence"]


def test_paper_suite_tasks_and_shots():
    assert len(bt.PAPER_SUITE) == 10
    assert [b.column for b in bt.PAPER_SUITE] == ["ARC", "CSQA", "GSM8K", "HS", "MMLU", "OBQA", "PIQA", "SIQA",
                                                  "TQA", "WG"]
    shots = {t: b.shots for b in bt.PAPER_SUITE for t in b.tasks}
    assert shots == {"arc_easy": 0, "arc_challenge": 0, "commonsense_qa": 0, "gsm8k": 8, "hellaswag": 0, "mmlu": 0,
                     "openbookqa": 0, "piqa": 0, "social_iqa": 0, "triviaqa": 5, "winogrande": 0}
    assert [bt.backend.setting_name(s.bits, s.hadamard_ffn) for s in bt.PAPER_SETTINGS] == \
        ["16-16-16", "4-4-4", "4-4-4 +FFN Had"]
    # Every task is one of lm-eval's (its YAML, not its data: that needs the hub).
    index = TaskManager().task_index
    assert all(t in index for t in shots)


def test_table_in_the_papers_shape():
    """record() and format_table() on lm-eval-shaped results of the paper's suite."""
    def results(offset):
        res = {}
        for i, b in enumerate(bt.PAPER_SUITE):
            for j, t in enumerate(b.tasks):
                res[t] = {b.metric: 0.2 + 0.05 * i + 0.1 * j - offset, f"{b.metric.split(',')[0]}_stderr,none": 0.01}
        return {"results": {k: v for k, v in res.items() if k != "mmlu"}, "groups": {"mmlu": res["mmlu"]},
                "n-shot": {}, "versions": {}}

    class Fake:
        def __init__(self, bits, had):
            self.bits, self.hadamard_ffn, self.method = bits, had, "rtn"

    runs = [(bt.backend.setting_name(s.bits, s.hadamard_ffn), Fake(s.bits, s.hadamard_ffn), results(k * 0.1))
            for k, s in enumerate(bt.PAPER_SETTINGS)]
    rec = bt.record("runs/x", 7, ["arc_easy"], bt.PAPER_SUITE, runs, None)
    full = rec["settings"][0]
    assert full["scores"]["ARC"] == pytest.approx(0.25)  # the mean of ARC-Easy and ARC-Challenge
    assert full["scores"]["MMLU"] == pytest.approx(0.2 + 0.05 * 4)  # a group's score
    assert full["average"] == pytest.approx(np.mean(list(full["scores"].values())))
    assert rec["drop"]["4-4-4 +FFN Had"]["average"] == pytest.approx(0.2)
    lines = bt.format_table(rec).splitlines()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|")]
    assert table[0] == ["setting", "ARC", "CSQA", "GSM8K", "HS", "MMLU", "OBQA", "PIQA", "SIQA", "TQA", "WG", "Avg."]
    assert [row[0] for row in table[2:]] == ["16-16-16", "4-4-4", "4-4-4 +FFN Had", "drop 4-4-4", "drop 4-4-4 +FFN Had"]
    assert table[2][1] == "25.0" and table[4][-1] == f"{100 * (full['average'] - 0.2):.1f}" and table[6][1] == "20.0"


@pytest.mark.slow
def test_suite_plumbing_with_local_tasks_standing_in(run, capsys, tmp_path, monkeypatch):
    """--suite=paper with the local tasks in place of the hub's: its three settings, its shots, its table."""
    local = (bt.Benchmark("NEXT", ("osp_next_sentence",), 2, "acc,none"),
             bt.Benchmark("CONT", ("osp_continue",), 0, "exact_match,none"))
    monkeypatch.setitem(bt.SUITES, "paper", (local, bt.PAPER_SETTINGS))
    out_json = tmp_path / "suite.json"
    code, out, err = _main(capsys, f"--workdir={run['workdir']}", "--suite=paper", f"--include-path={run['tasks']}",
                           "--limit=6", "--batch-size=8", f"--output={out_json}")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert [s["name"] for s in r["settings"]] == ["16-16-16", "4-4-4", "4-4-4 +FFN Had"]
    assert r["lm_eval"]["16-16-16"]["n-shot"] == {"osp_next_sentence": 2, "osp_continue": 0}
    assert [c["name"] for c in r["columns"]] == ["NEXT", "CONT"] and r["limit"] == 6
    assert "| setting" in out and "4-4-4 +FFN Had" in out and "a quick look, not a result" in out


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the checkpoint is read


@pytest.mark.slow  # indexes lm-eval's own tasks (about 15 s here)
def test_unknown_task(capsys, tmp_path, monkeypatch):
    _no_restore(monkeypatch)
    code, out, err = _main(capsys, f"--workdir={_bare_run(tmp_path / 'run')}", "--tasks=arc_eazy")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown task 'arc_eazy'" in err and "arc_easy" in err
    assert lm_eval_cli.main(["--model", "osp_jax", "--tasks", "piqa,hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'hellaswagg'" in err


@pytest.mark.slow
def test_task_without_its_data(tasks, capsys, tmp_path, monkeypatch):
    _no_restore(monkeypatch)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "gone.yaml").write_text(
        (open(os.path.join(tasks, "next_sentence.yaml")).read()
         .replace("task: osp_next_sentence", "task: osp_gone")
         .replace(os.path.join(tasks, "next_sentence.jsonl"), str(tmp_path / "missing.jsonl"))), encoding="utf-8")
    code, out, err = _main(capsys, f"--workdir={_bare_run(tmp_path / 'run')}", "--tasks=osp_gone",
                           f"--include-path={folder}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "task 'osp_gone' needs data that is not here" in err


@pytest.mark.slow
def test_hub_data_offline_and_not_cached(tmp_path):
    """The paper's suite here: offline, with an empty Hugging Face cache, its first task stops it."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "-m", "osp_jax.evaluate", f"--workdir={_bare_run(tmp_path / 'run')}",
                           "--suite=paper"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("osp_jax.evaluate: error: task 'arc_easy' needs data that is not here")
    assert "Traceback" not in proc.stderr and "offline" in last


@pytest.mark.slow
def test_generation_without_room_for_a_prompt(tasks, capsys, tmp_path, monkeypatch):
    _no_restore(monkeypatch)
    folder = tmp_path / "tasks"
    shutil.copytree(tasks, folder)
    yaml = (folder / "continue.yaml").read_text().replace(f"max_gen_toks: {GEN_TOKS}", f"max_gen_toks: {SEQ}")
    (folder / "continue.yaml").write_text(yaml.replace("task: osp_continue", "task: osp_long"))
    for other in ("next_sentence", "passages"):
        (folder / f"{other}.yaml").unlink()
    code, out, err = _main(capsys, f"--workdir={_bare_run(tmp_path / 'run')}", "--tasks=osp_long",
                           f"--include-path={folder}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"task 'osp_long' generates up to {SEQ} tokens" in err and f"at most {SEQ}" in err


def _bare_run(path, **model) -> str:
    """A run directory with config.json and tokenizer.json and no checkpoint: whatever is found here is
    found before a checkpoint is read."""
    c = defaults()
    c.model.update(dtype="float32", **model)
    c.train.seq_len = SEQ
    path.mkdir()
    cli.write_json(path / "config.json", validate(c).to_dict())
    shutil.copyfile(pipeline.builtin_files()[1], path / "tokenizer.json")
    return str(path)


def test_bits_the_kv_quantiser_cannot_take(tmp_path):
    """head_dim 160: keys and values are quantised in groups of 128 along it."""
    workdir = _bare_run(tmp_path / "run", heads=1, kv_heads=1, head_dim=160)
    with pytest.raises(backend.BackendError, match="head_dim 160 is not a multiple of 128"):
        backend.OspJaxLM(workdir=str(workdir), bits="4-4-4")
    backend.OspJaxLM(workdir=str(workdir), bits="4-4-16")  # KV at 16 bits: nothing to group


@pytest.mark.parametrize("args, message", [
    ({"bits": "4,4"}, "bits='4,4': expected W-A-KV"),
    ({"hadamard": "all"}, "hadamard='all'"),
    ({"method": "awq"}, "--method='awq'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"colour": "red"}, "unknown colour"),
    ({"workdir": None}, "workdir=RUN_DIR"),
])
def test_bad_model_args(tmp_path, args, message):
    with pytest.raises(backend.BackendError, match=re.escape(message)):
        backend.OspJaxLM(**{"workdir": _bare_run(tmp_path / "run"), **args})


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("osp_jax") is backend.OspJaxLM
    assert get_model("hf").__name__ == "HFLM"


def test_generation_settings():
    """Greedy only; a request's stop strings and length, lm-eval's aliases and defaults understood."""
    assert backend.gen_settings({"until": ["\n"], "max_new_tokens": 5}, 256, "x") == (["\n"], 5)
    assert backend.gen_settings({"until": "Q:", "do_sample": False, "temperature": 0.0}, 256, "x") == (["Q:"], 256)
    with pytest.raises(backend.BackendError, match="task 'x' asks for sampling"):
        backend.gen_settings({"do_sample": True, "temperature": 0.7}, 256, "task 'x'")
    with pytest.raises(backend.BackendError, match="no room is left for its prompt"):
        backend.check_generation("task 'x'", 128, 128)
    assert backend.padded_length(1, 64) == 16 and backend.padded_length(17, 64) == 32
    assert backend.padded_length(33, 48) == 48  # a max_length that is not a power of two caps it


def test_calibration_reaches_ptq(tmp_path, monkeypatch):
    """calibration= goes to ptq.quantize_model with the method (GPTQ's batches, from issue 23 part 2), and
    a function of the run's config is called once the model is built."""
    seen = {}

    def fake_quantize(params, model_config, bits, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ptq, "quantize_model", fake_quantize)
    workdir = _bare_run(tmp_path / "run")
    checkpoint = backend.RunCheckpoint(workdir)
    config = checkpoint.config()
    monkeypatch.setattr(checkpoint, "restore", lambda: (0, {}, config))
    lm = backend.OspJaxLM(checkpoint=checkpoint, bits="4-4-4", calibration=lambda c: [{"seq_len": c.train.seq_len}])
    with pytest.raises(RuntimeError, match="stop here"):
        lm.loglikelihood(_instances("loglikelihood", [("a", " b")]))
    assert seen["calibration"] == [{"seq_len": SEQ}] and seen["method"] == "rtn"


def test_tasks_bad_method_before_anything(tmp_path, monkeypatch):
    _no_restore(monkeypatch)
    monkeypatch.setattr(bt, "task_manager", lambda *a: pytest.fail("tasks were indexed"))
    with pytest.raises(bt.TaskError, match="--method='awq'"):
        bt.evaluate_tasks(_bare_run(tmp_path / "run"), tasks="piqa", bits="16,16,16", method="awq")


def test_a_model_the_devices_cannot_split(tmp_path):
    """dim 36 over fsdp=8 (the 8 simulated devices): found from config.json; one device takes it."""
    workdir = _bare_run(tmp_path / "run", dim=36, heads=2, kv_heads=2)
    with pytest.raises(backend.BackendError, match=r"does not split over the 8 device\(s\).*model.dim=36"):
        backend.OspJaxLM(workdir=workdir)
    assert backend.OspJaxLM(workdir=workdir, devices=1)._mesh.devices.size == 1
