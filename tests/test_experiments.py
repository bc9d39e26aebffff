"""The experiment scripts: epochs.py's training subset (whole documents, the held-out side untouched) and
ablation.py's reuse of finished runs."""
import importlib.util
import json
import os
import sys

import pytest

from tests.helpers import ROOT


def _epochs_module():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("epochs", ROOT / "experiments" / "epochs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_subset_takes_whole_training_documents_and_every_held_out_one(tmp_path):
    epochs = _epochs_module()
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"text": f"train document {i} " * 10, "split": "train"} for i in range(100)]
    docs += [{"text": f"held out {i}", "split": "validation"} for i in range(5)]
    docs.append({"text": "", "split": "train"})  # empty: skipped
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_chars = sum(len(d["text"]) for d in docs if d["split"] == "train")

    counts = epochs.make_subset([str(corpus)], str(tmp_path), train_chars / 4, probe_docs=5)
    subset = _read(tmp_path / "subset.jsonl")
    train = [d for d in subset if d["split"] == "train"]
    originals = {d["text"] for d in docs}
    assert all(d["text"] in originals for d in subset)  # never cut inside a document
    assert counts["stride"] == 4 and len(train) == counts["train_docs"] == 25
    assert [d["text"] for d in subset if d["split"] == "validation"] == [f"held out {i}" for i in range(5)]
    probe = _read(tmp_path / epochs.TRAIN_PROBE)
    assert 1 <= len(probe) <= 5 and all(d in train for d in probe)  # trained-on documents only

    counts = epochs.make_subset([str(corpus)], str(tmp_path), float("inf"))
    assert counts["train_docs"] == 100  # the whole training split


def test_subset_without_a_split_field_holds_out_every_50th_document(tmp_path):
    epochs = _epochs_module()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    counts = epochs.make_subset([str(corpus)], str(tmp_path), float("inf"))
    held = [d["text"] for d in _read(tmp_path / "subset.jsonl") if d["split"] == "validation"]
    assert held == ["doc 25", "doc 75", "doc 125", "doc 175"] and counts["train_docs"] == 196


def test_subset_needs_both_sides(tmp_path):
    epochs = _epochs_module()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "only training", "split": "train"}) + "\n")
    with pytest.raises(SystemExit, match="validation"):
        epochs.make_subset([str(corpus)], str(tmp_path), 100.0)


def test_a_prepared_subset_is_not_reused_for_another_size(tmp_path):
    import argparse

    from osp_jax.data import pipeline

    epochs = _epochs_module()
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"text": f"document number {i}. " * 20, "split": "train"} for i in range(40)]
    docs += [{"text": f"held out number {i}. " * 20, "split": "validation"} for i in range(4)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    args = argparse.Namespace(out=str(tmp_path / "out"), corpus=str(corpus), tokenizer=pipeline.builtin_files()[1],
                              train_tokens=1000.0, chars_per_token=4.0, workers=1)
    (tmp_path / "out").mkdir()
    data = epochs.prepare(args, epochs.abl.PRESETS["cpu_tiny"])
    assert pipeline.load_metadata(data)["splits"]["validation"]["documents"] == 4
    assert epochs.prepare(args, epochs.abl.PRESETS["cpu_tiny"]) == data  # the same size: reused
    args.train_tokens = 2000.0
    with pytest.raises(SystemExit, match="another --out"):
        epochs.prepare(args, epochs.abl.PRESETS["cpu_tiny"])


def test_a_finished_run_is_reused_only_for_the_same_rate_steps_and_seed(tmp_path, monkeypatch):
    from osp_jax import train as train_lib
    from tests.helpers import small_config

    abl = _epochs_module().abl
    trained = []

    def fake_train(config, workdir):  # writes what a finished osp_jax.train run leaves behind
        trained.append(config.train.seed)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": config.train.steps, "loss": 1.0}) + "\n")
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        return {"loss": 1.0}

    monkeypatch.setattr(train_lib, "train", fake_train)
    config = small_config()
    abl.run(config, str(tmp_path / "run"))
    abl.run(config, str(tmp_path / "run"))  # done: reused
    assert trained == [config.train.seed]
    other = small_config()
    other.train.seed = config.train.seed + 1
    abl.run(other, str(tmp_path / "run"))
    assert trained == [config.train.seed, other.train.seed]
    assert (tmp_path / f"run.lr{config.optimizer.learning_rate:g}_s{config.train.steps}_seed{config.train.seed}").is_dir()


def test_epochs_report_only_reports_what_is_on_disk_and_trains_nothing(tmp_path):
    """Results brought back without checkpoints: --report-only makes the table from them, marks what was
    not evaluated "not run", leaves out a run that never finished, and writes nothing into --out."""
    epochs = _epochs_module()
    out = tmp_path / "runs"
    run = out / "adam_ep1"
    run.mkdir(parents=True)
    (run / "done.json").write_text(json.dumps({"steps": 10, "val_loss": 5.0, "finite": True}))
    (run / "data_metadata.json").write_text(json.dumps({"splits": {"train": {"tokens": 40960}}}))
    (out / "subset.json").write_text(json.dumps({"train_docs": 7, "asked_train_tokens": 4e4}))

    def ev(ppl):
        return json.dumps({"quant_ppl": ppl, "ppl": 100.0, "kurtosis": 0.5, "max_abs": 9.0, "tokens": 4096})

    for key, ppl in (("w16a16kv16", 100.0), ("w4a16kv16", 101.0), ("w16a4kv16", 102.0), ("w4a4kv4", 104.0)):
        (run / f"eval_{key}.json").write_text(ev(ppl))
    (run / "train_w16a16kv16.json").write_text(ev(50.0))  # its 4-4-4 on training documents: not run
    before = sorted(p.name for p in out.rglob("*"))
    doc = tmp_path / "doc.md"
    rc = epochs.main(["--preset=cpu_tiny", f"--out={out}", "--epochs=1,2", "--arms=adam", "--report-only",
                      f"--doc={doc}", f"--plot={tmp_path / 'plot.png'}", "--device=test device"])
    assert rc == 0
    text = doc.read_text()
    assert "| Adam | 1 |" in text and "| Adam | 2 |" not in text  # the 2-epoch run never finished
    assert "50.00 (4-4-4 not run)" in text and "104.00 (1.040x)" in text and "test device" in text
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing trained, evaluated or written


def test_reports_go_under_out_unless_doc_names_the_record(tmp_path, capsys):
    """A trial run must not rewrite docs/ablation.md's measured sections (the default did): without
    --doc the report is OUT/ablation.md, its plots beside it; --report-only, which writes nothing
    under --out, must name its --doc."""
    import argparse

    abl = _epochs_module().abl
    parser = argparse.ArgumentParser(prog="ablation.py")
    out = str(tmp_path / "out")
    doc = abl.resolve_doc(parser, argparse.Namespace(doc=None, out=out, report_only=False), "ablation.md")
    assert doc == os.path.join(out, "ablation.md")
    assert abl._beside_doc(doc, "docs/ablation_gpu_124m") == os.path.join(out, "ablation_gpu_124m")
    record = abl.resolve_doc(parser, argparse.Namespace(doc=str(ROOT / "docs/ablation.md"), out=out, report_only=True),
                             "x")
    assert record == str(ROOT / "docs/ablation.md")
    assert "does not exist yet" not in capsys.readouterr().err
    abl.resolve_doc(parser, argparse.Namespace(doc=str(tmp_path / "new.md"), out=out, report_only=False), "x")
    assert "does not exist yet: a new report starts there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        abl.resolve_doc(parser, argparse.Namespace(doc=None, out=out, report_only=True), "ablation.md")
