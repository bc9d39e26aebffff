"""The experiment scripts with a gs:// --out on the GCS emulator (tests/gcs_emulator.py): runs trained and reported
into the bucket, a report made from runs found on the bucket, and a missing bucket refused in one line."""
import importlib
import json
import sys

import pytest

from tests.helpers import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    """experiments/NAME.py as a module (the scripts import their siblings from experiments/)."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))
    return importlib.import_module(name)


def _read(url: str) -> bytes:
    from osp_jax import storage

    with storage.open_read(url) as f:
        return f.read()


@pytest.mark.slow
def test_ablation_sweep_stage_trains_and_reports_into_the_bucket(gcs_emulator, gcs_bucket, capsys, monkeypatch):
    """One rate, so no sweep: the two arms the sweep stage adds are trained (one step, one layer) into gs://, then
    sweep.json, the report and its two plots are written beside them; run again, it reuses the runs it finds."""
    abl = _load("ablation")
    monkeypatch.setattr(abl, "REPORT_ONLY", False)  # main sets the module's flag: restored for the other tests
    out = f"{gcs_bucket}/ablation"
    argv = ["--preset=cpu_tiny", f"--out={out}", "--stage=sweep", "--lrs=1e-2", "--steps=2", "--no-eval-sweep",
            "--set=model.layers=1", "--set=train.eval_batches=1", "--set=train.outlier_every=1",
            "--date=2000-01-01", "--commit=test", "--device=test device"]
    assert abl.main(argv) == 0
    assert capsys.readouterr().out.count("step 1/1 |") == 2  # both arms trained
    names = gcs_emulator.objects(gcs_bucket, "ablation/")
    for arm in ("muon_ssnorm", "osp"):  # the swept arms (adam, muon) have no sweep with one rate
        run = f"ablation/sweep/{arm}_lr0.01"
        assert {f"{run}/done.json", f"{run}/config.json", f"{run}/metrics.jsonl"} <= set(names), names
        done = json.loads(_read(f"{gcs_bucket}/{run}/done.json"))
        assert done["steps"] == 1 and done["finite"]
    sweep = json.loads(_read(f"{out}/sweep.json"))
    assert sweep["chosen"] == {"adam": 0.01, "muon": 0.01, "muon_ssnorm": 0.01, "osp": 0.01}
    assert sorted(r["arm"] for r in sweep["sweep"]) == ["muon_ssnorm", "osp"]
    for key in ("kurtosis", "max_abs"):
        assert _read(f"{out}/ablation_sweep_{key}.png").startswith(PNG)
    doc = _read(f"{out}/ablation.md").decode()
    assert "<!-- ablation:cpu_tiny:sweep:begin -->" in doc and "test device" in doc
    assert "](ablation_sweep_kurtosis.png)" in doc  # linked relative to the report, in the same bucket
    assert not [n for n in names if ".tmp" in n or "osp_jax-probe" in n]  # nothing half-written, no probe left

    assert abl.main(argv) == 0  # again: the finished runs on the bucket are found and reused, nothing trained
    printed = capsys.readouterr().out
    assert "step 1/1 |" not in printed and "## `cpu_tiny`, sweep stage" in printed
    assert json.loads(_read(f"{gcs_bucket}/ablation/sweep/osp_lr0.01/done.json")) == done


def test_ablation_report_only_reads_runs_from_the_bucket_and_writes_only_the_report(gcs_emulator, gcs_bucket,
                                                                                     monkeypatch):
    """Results on a bucket without their checkpoints: --report-only finds the data's metadata and every run under
    a gs:// --out, reports them into a gs:// --doc (plots beside it) and writes nothing under --out."""
    from etils import epath

    from osp_jax import cli

    abl = _load("ablation")
    monkeypatch.setattr(abl, "REPORT_ONLY", False)  # main sets the module's flag: restored for the other tests
    out = epath.Path(gcs_bucket) / "runs"
    cli.write_json(out / "sweep/osp_lr0.01/data_metadata.json", {"splits": {"train": {"tokens": 40960}}})
    val_loss = {("adam", 0.01): 5.5, ("adam", 0.03): 5.0, ("muon", 0.01): 5.5, ("muon", 0.03): 6.0,
                ("muon_ssnorm", 0.01): 5.4, ("osp", 0.01): 5.3}
    for (arm, lr), loss in val_loss.items():
        run = out / f"sweep/{arm}_lr{lr:g}"
        cli.write_json(run / "done.json", {"steps": 4, "val_loss": loss, "finite": True, "tokens_per_sec": 1000.0})
        rows = [{"step": 2, "tokens": 4096, "kurtosis": 1.5, "max_abs": 9.0}, {"step": 4, "tokens": 8192}]
        cli.write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        for key, ppl in (("w16a16kv16", 100.0), ("w4a4kv4", 125.0)):
            cli.write_json(run / f"eval_{key}.json", {"quant_ppl": ppl, "kurtosis": 0.5, "max_abs": 9.0,
                                                    "kurtosis_per_layer": [0.5], "max_abs_per_layer": [9.0]})
    before = gcs_emulator.objects(gcs_bucket, "runs/")
    doc = f"{gcs_bucket}/report/ablation.md"
    rc = abl.main(["--preset=cpu_tiny", f"--out={out}", f"--data={gcs_bucket}/not-here", "--stage=sweep",
                   "--lrs=1e-2,3e-2", "--steps=10", "--report-only", f"--doc={doc}", "--date=2000-01-01",
                   "--commit=test", "--device=test device"])
    assert rc == 0
    assert gcs_emulator.objects(gcs_bucket, "runs/") == before  # nothing trained, evaluated or written
    assert gcs_emulator.objects(gcs_bucket, "report/") == [
        "report/ablation.md", "report/ablation_sweep_kurtosis.png", "report/ablation_sweep_max_abs.png"]
    text = _read(doc).decode()
    for row in ("| Adam | 0.01 | 5.5000 |", "| Adam | 0.03 **(best)** | 5.0000 |",
                "| Muon | 0.01 **(best)** | 5.5000 |",
                "| Muon | 0.03 | 6.0000 |", "| Muon + SSNorm | 0.01 **(best)** | 5.4000 |",
                "| Muon + SSNorm + EmbProj (OSP) | 0.01 **(best)** | 5.3000 |"):
        assert row in text, row  # the sweep's choice made from the runs on the bucket
    assert "125.00 (1.250x) | not run |" in text  # 4-4-4 evaluated, 4-4-4 + FFN Hadamard not
    assert "of 0.04 M training tokens" in text  # the data's metadata as kept in a run's workdir on the bucket
    assert "](ablation_sweep_kurtosis.png)" in text  # linked relative to the report, in the same bucket
    assert _read(f"{gcs_bucket}/report/ablation_sweep_max_abs.png").startswith(PNG)


@pytest.mark.parametrize("script", ["ablation", "epochs", "ns_methods"])
def test_a_missing_bucket_is_refused_in_one_line_before_any_work(gcs_emulator, script, capsys):
    module = _load(script)
    preset = [] if script == "ns_methods" else ["--preset=cpu_tiny"]
    with pytest.raises(SystemExit) as e:
        module.main(["--out=gs://no-such-bucket-for-osp-jax/x", *preset])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == (f"{script}.py: error: --out=gs://no-such-bucket-for-osp-jax/x: cannot write there: "
                   "the bucket does not exist")



def test_epochs_report_only_on_the_bucket(gcs_emulator, gcs_bucket, monkeypatch):
    """epochs.py --report-only with a gs:// --out and --doc: the table made from the runs on the bucket, the plots
    written beside the report, nothing written under --out."""
    from etils import epath

    from osp_jax import cli

    epochs = _load("epochs")
    monkeypatch.setattr(epochs.abl, "REPORT_ONLY", False)
    out = epath.Path(gcs_bucket) / "runs"
    run = out / "adam_ep1"
    cli.write_json(run / "done.json", {"steps": 10, "val_loss": 5.0, "finite": True})
    cli.write_json(run / "data_metadata.json", {"splits": {"train": {"tokens": 40960}}})
    cli.write_json(out / "subset.json", {"train_docs": 7, "asked_train_tokens": 4e4})
    cli.write_text_atomic(run / "metrics.jsonl", json.dumps({"step": 10, "tokens": 40960, "kurtosis": 2.0,
                                                             "max_abs": 7.0}) + "\n")
    for prefix, key, ppl in (("eval", "w16a16kv16", 100.0), ("eval", "w4a16kv16", 101.0), ("eval", "w16a4kv16", 102.0),
                             ("eval", "w4a4kv4", 104.0), ("train", "w16a16kv16", 50.0)):
        cli.write_json(run / f"{prefix}_{key}.json",
                       {"quant_ppl": ppl, "ppl": 100.0, "kurtosis": 0.5, "max_abs": 9.0, "tokens": 4096})
    before = gcs_emulator.objects(gcs_bucket, "runs/")
    doc = f"{gcs_bucket}/report/doc.md"
    assert epochs.main(["--preset=cpu_tiny", f"--out={out}", "--epochs=1,2", "--arms=adam", "--report-only",
                        f"--doc={doc}", "--device=test device"]) == 0
    assert gcs_emulator.objects(gcs_bucket, "runs/") == before
    assert gcs_emulator.objects(gcs_bucket, "report/") == [
        "report/ablation_cpu_tiny_epochs.png", "report/ablation_cpu_tiny_epochs_curves_kurtosis.png",
        "report/ablation_cpu_tiny_epochs_curves_max_abs.png", "report/doc.md"]
    text = _read(doc).decode()
    assert "| Adam | 1 |" in text and "| Adam | 2 |" not in text  # the 2-epoch run never finished
    assert "50.00 (4-4-4 not run)" in text and "104.00 (1.040x)" in text and "test device" in text
    assert "](ablation_cpu_tiny_epochs.png)" in text and "](ablation_cpu_tiny_epochs_curves_kurtosis.png)" in text
