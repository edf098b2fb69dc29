"""The model report and the registry a person reads, from a real validate run on real audio and a real
MLflow store: the report holds the gates, the tables and its pictures inside one HTML file, is logged to
the version's run, `aivoice report VERSION` rebuilds it from that run alone, and every registered version
carries a one-line description and short, machine-readable tags."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.apps.cli import main as aivoice
from pipeline.config import load_params, params_hash
from pipeline.core.model import new_model, save_checkpoint
from pipeline.io import registry, tracking
from pipeline.io.store import ClipInfo, from_corpus, ingest
from pipeline.stages import augment as augment_stage
from pipeline.stages import finetune as finetune_stage
from pipeline.stages import validate as validate_stage

pytestmark = pytest.mark.integration


def _params():
    return load_params("/nonexistent", overrides={
        "model.base_width": 8, "finetune.epochs": 3, "finetune.replay_per_class": 16, "augment.copies": 3,
        "validate.gates.min_calibration_humans": 1})   # enough evidence by rule: the gates themselves decide


@pytest.fixture
def validated(tmp_path, monkeypatch, small_corpus, mlflow_store):
    """A project in tmp_path where a base (v1, champion) was registered and the finetune and validate
    stages ran on two clips of a new generator: validate registered v2 and wrote its report."""
    monkeypatch.chdir(tmp_path)
    params = _params()
    store, quarantine = Path(params.ingest.store), Path(params.ingest.quarantine)
    ingest(from_corpus(small_corpus.root), store, quarantine, params.audio, params.ingest)
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new], store, quarantine, params.audio, params.ingest)
    augment_stage.run(params)
    torch.manual_seed(0)
    base = new_model(["en"], params.audio, params.features, 8, 0.0)
    save_checkpoint(base, params.finetune.base_model, threshold=0.5, data_hash="base-data", params_hash=params_hash(params))
    assert registry.register(params.finetune.base_model, base=True, description="the base") == 1
    finetune_stage.run(params)
    result = validate_stage.run(params)
    return params, result


def test_validate_writes_and_logs_a_self_contained_report_that_aivoice_report_rebuilds(validated, tmp_path, capsys):
    params, result = validated
    verdict = json.loads(Path(params.validation.verdict).read_text())
    assert result["model_version"] == verdict["model_version"] == 2, f"the candidate is v2: {result}"
    # the page holds the verdict, every gate, both tables, the before/after rows and the lineage ...
    page = Path(params.validation.report).read_text()
    assert verdict["status"].upper() in page, "the verdict is the page's headline"
    for gate in verdict["gates"]:
        assert f"<td>{gate}</td>" in page, f"gate {gate} is in the gates table"
    tables = json.loads(Path(params.validation.tables).read_text())
    for generator in tables["candidate"]["per_generator"]:
        assert f"<td>{generator}</td>" in page, f"per-generator row {generator}"
    for source in tables["candidate"]["per_source"]:
        assert f"<td>{source}</td>" in page, f"per-source row {source}"
    assert re.search(r"\(\d+/\d+\) \[0\.\d\d, [01]\.\d\d\]", page), "rates carry their count and 95 % interval"
    for row in verdict["before_after"]:
        assert f"<td>{row['file']}</td>" in page, "each new file's before/after row"
    run_id = verdict["mlflow_run_id"]
    assert run_id in page and "base-data"[:8] in page and params_hash(params) in page, "lineage: run, base data, params"
    # ... with its two pictures embedded and nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(len(b) > 5000 for b in images), "DET and per-source histograms embedded"
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page, \
        "no external asset"
    plots = Path(params.validation.plots)
    assert (plots / "report_det.png").stat().st_size > 5000 and (plots / "report_scores_by_source.png").exists(), \
        "the PNGs beside the other validate plots, for dvc plots"
    # and the same report is logged to the version's run under report/
    client = tracking.configure()
    logged = {a.path for a in client.list_artifacts(run_id, "report")} | \
        {a.path for a in client.list_artifacts(run_id, "report/plots")}
    assert {"report/report.html", "report/plots/report_det.png", "report/plots/report_scores_by_source.png"} <= logged, logged
    assert verdict["report"]["artifact_uri"].endswith("report/report.html"), verdict["report"]

    # when the local reports are gone and `aivoice report 2` runs against the MLflow store alone
    shutil.rmtree("reports")
    out = tmp_path / "rebuilt"
    assert aivoice(["report", "2", "--out", str(out)]) == 0
    # then it rebuilds the same page from the run's artifacts
    assert "report.html" in capsys.readouterr().out
    logged_page = Path(client.download_artifacts(run_id, "report/report.html", str(tmp_path / "dl"))).read_text()
    assert (out / "report.html").read_text() == logged_page == page, "the rebuilt report is the one validate logged"
    assert (out / "plots" / "report_det.png").is_file(), "with its PNGs"


def test_every_version_reads_as_one_line_with_short_tags(validated, capsys, caplog):
    params, _ = validated
    verdict = json.loads(Path(params.validation.verdict).read_text())
    v2 = registry.model_version(2)
    # the description says what made it, on which data, against what, the verdict and its figures
    line = v2.description
    assert "\n" not in line and len(line) < 400, f"one line: {line!r}"
    assert line.startswith("validate stage: ") and "piper-joe" in line and "judged against v1" in line, line
    assert verdict["status"].upper() in line, f"the verdict: {line}"
    failed = [n for n, g in verdict["gates"].items() if not g["passed"]]
    if verdict["status"] == "insufficient evidence":   # what is missing, with the count it needs
        assert all(m.split(" (")[0] in line for m in verdict["missing_evidence"]) and "need >= " in line, line
    elif failed:
        assert len(re.findall(r"rule [<>]=", line)) == min(3, len(failed)), f"the failed gates' figures: {line}"
    else:
        assert "new-generator recall" in line and "human FPR" in line, f"the deciding figures: {line}"
    # the tags are short and machine-readable: no JSON blob, no sentence
    tags = v2.tags
    assert "gates" not in tags, "the gates as JSON live in the run's verdict.json, not in a tag"
    assert all(len(v) <= 64 and "{" not in v for v in tags.values()), \
        f"long tags: { {k: v for k, v in tags.items() if len(v) > 64 or '{' in v} }"
    assert tags["failed_gates"] == (",".join(failed) or "none") and "missing_evidence" not in tags, tags
    # and what reads the tags still works: models lists it, promote names the failed gates, list_versions describes
    info = {v["version"]: v for v in registry.list_versions()}
    assert info[2]["description"] == line and info[1]["description"] == "the base", "descriptions are listed"
    assert info[2]["metrics"]["eer"] == float(tags["eer"]) and info[2]["validation_status"] == tags["validation_status"]
    assert aivoice(["models"]) == 0 and capsys.readouterr().out.count("\n") >= 3
    if failed:
        assert aivoice(["promote", "2", "--reason", "try"]) == 2
        assert failed[0] in caplog.text, "a refused promotion names the failed gates from the short tag"
    # and a base version has no validation to report: one line says so
    assert aivoice(["report", "1"]) == 2
    assert "v1" in caplog.text and "verdict.json" in caplog.text
