"""Judging the bootstrap recipe on sources it never heard (`aivoice evaluate --leave-sources-out`,
`aivoice bootstrap --lso`) and the shortcut audit, on real speech."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.apps.cli import main as aivoice
from pipeline.core.data import Clip, CorpusError, read_corpus, source_groups
from pipeline.core.model import load_checkpoint
from pipeline.io import registry, tracking
from pipeline.training.audit import audit_corpus
from pipeline.training.lso import leave_sources_out, matched_pair_sources, source_folds, summarise_seed

from conftest import make_speech_like


def _clip(i, label, source):
    return Clip(Path(f"/c/{source}__x/{i}.wav"), label, "g" if label else "human", f"s{i}", "en", source)


def test_source_folds_keep_sources_and_links_whole_and_cover_everything():
    clips = [_clip(i, i % 2, f"src{i % 9}") for i in range(90)]
    linked = {"src1": "src1", "src7": "src1"}
    folds = source_folds(clips, 4, seed=0, linked=linked)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == sorted({c.source for c in clips}), "every source in exactly one fold"
    assert any({"src1", "src7"} <= set(f) for f in folds), "linked sources share a fold"
    assert len(folds) == 4 and source_folds(clips, 4, 0, linked) == folds, "seeded"


def test_one_source_is_refused():
    with pytest.raises(CorpusError, match="at least 2 sources"):
        source_folds([_clip(i, i % 2, "only") for i in range(10)], 4, 0, {})


def test_matched_pair_eer_uses_only_sources_holding_both_labels():
    # a source whose AI clips all outscore its humans (EER 0), one at chance, and a human-only source
    clips = [_clip(i, lab, "a") for i, lab in enumerate([0, 0, 1, 1])] + \
            [_clip(10 + i, lab, "b") for i, lab in enumerate([0, 1, 0, 1])] + [_clip(20 + i, 0, "c") for i in range(3)]
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.5])
    s = summarise_seed(clips, scores, np.zeros(len(clips), int), np.full(len(clips), 0.5), seed=0)
    assert matched_pair_sources(clips) == ["a", "b"], "only sources with both labels are matched pairs"
    assert s["matched_pair_eer"] == pytest.approx(0.25), "mean of 0.0 (a) and 0.5 (b)"
    assert s["pooled_eer_ci"][0] <= s["pooled_eer"] <= s["pooled_eer_ci"][1], "the estimate lies in its interval"
    assert {r["source"] for r in s["per_source"]} == {"a", "b", "c"}, "every source has a row"


@pytest.mark.integration
def test_evaluate_trains_a_model_per_fold_and_tracks_them(small_corpus, tiny_params, tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    auto = tiny_params.model_copy(update={"features": tiny_params.features.model_copy(update={"kind": "auto"})})
    params_file.write_text(json.dumps(auto.model_dump(mode="json", by_alias=True)))
    # when: the recipe is evaluated with 2 folds of whole sources
    code = aivoice(["--params", str(params_file), "evaluate", "--leave-sources-out", "2", "--corpus", str(small_corpus.root)])
    assert code == 0, "evaluate exits 0"
    report = json.loads((tmp_path / "reports" / "lso.json").read_text())
    # then: folds partition the sources, and the report has the figures the issue names
    held = [set(f) for f in report["folds"]]
    assert len(held) == 2 and not held[0] & held[1], "two disjoint folds of sources"
    seed = report["per_seed"][0]
    for key in ("pooled_eer", "pooled_eer_ci", "mean_fold_eer", "matched_pair_eer", "per_source", "per_generator"):
        assert key in seed, f"the report has {key}"
    assert len(seed["scores"]) == report["n_clips"], "every real clip was scored by the model that never heard its source"
    assert (tmp_path / "reports" / "lso" / "det.png").exists(), "plots are written"
    # and: one MLflow parent run holds a child run per fold
    client = tracking.configure()
    runs = client.search_runs([tracking.experiment_id(client, tiny_params.registry.experiment)])
    parents = [r for r in runs if r.data.tags.get("evaluation") == "leave-sources-out"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2, "a parent run and one child run per fold"
    assert "lso_pooled_eer" in parents[0].data.metrics, "the parent logs the summary"
    # and: each fold model's front end, chosen from its own training audio (features.kind auto), is recorded
    kinds = {(r["seed"], r["fold"]): r["front_end"] for r in report["fold_runs"]}
    assert set(kinds.values()) <= {"mel", "linear_bands"}, kinds
    assert sorted(r.data.tags["front_end"] for r in children) == sorted(kinds.values()), "each child run is tagged"


@pytest.mark.integration
def test_training_seeds_run_apart_share_the_folds_of_fold_seed(small_corpus, tiny_params):
    # given: a training seed other than the one the folds are drawn with (seeds run as separate jobs)
    clips = read_corpus(small_corpus.root)
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"seed": 7})})
    linked = source_groups(params.train.linked_sources)
    expected = source_folds(clips, 2, 0, linked)
    assert source_folds(clips, 2, 7, linked) != expected, "precondition: seed 7 draws other folds"
    # when: evaluated with the folds of seed 0
    result = leave_sources_out(small_corpus.root, params, 2, fold_seed=0)
    # then: the held-out sources are seed 0's folds, not seed 7's
    assert result["folds"] == expected, "folds drawn with fold_seed"


@pytest.mark.integration
def test_bootstrap_with_lso_tags_the_version(small_corpus, tiny_params, tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    auto = tiny_params.model_copy(update={"features": tiny_params.features.model_copy(update={"kind": "auto"})})
    params_file.write_text(json.dumps(auto.model_dump(mode="json", by_alias=True)))
    code = aivoice(["--params", str(params_file), "bootstrap", "--corpus", str(small_corpus.root), "--out",
                    str(tmp_path / "base.pt"), "--lso", "2"])
    assert code == 0
    version = registry.list_versions(tiny_params.registry.model_name)[0]
    tags = tracking.configure().get_model_version(tiny_params.registry.model_name, str(version["version"])).tags
    assert {"lso_pooled_eer", "lso_matched_pair_eer", "lso_folds", "lso_run_id"} <= set(tags), tags
    assert tags["front_end"] == load_checkpoint(tmp_path / "base.pt").meta.feature_config().kind, \
        "the version is tagged with the front end its checkpoint scores with"
    chosen = json.loads((tmp_path / tiny_params.train.report).read_text())["front_end"]
    assert chosen["chosen_by"] == "features.kind auto" and chosen["kind"] == tags["front_end"], chosen
    line = registry.model_version(version["version"], tiny_params.registry.model_name).description
    assert line.startswith("Base model trained by bootstrap on") and "EER" in line and "leave-sources-out" in line \
        and "\n" not in line, f"the bootstrap version reads as one line: {line!r}"
    assert version["threshold"] is not None and 0 < version["threshold"] < 1, "bootstrap registers a calibrated threshold"


def test_audit_names_the_chain_feature_that_gives_the_labels_away(tmp_path):
    # given: humans at 8 kHz and AI at 24 kHz, many sources each, same speech-like content
    for i in range(24):
        for label, sr in (("human", 8000), ("ai", 24000)):
            path = tmp_path / label / f"{label}{i % 6}__x" / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, make_speech_like(1.5, sr, seed=i), sr)
    # when: audited
    result = audit_corpus(tmp_path, k=3)
    # then: the chain alone separates the labels, and the warning says by what
    assert result["eer"] < 0.1 and result["warning"], f"a sample-rate confound must be flagged: {result}"
    assert any(t["feature"] in ("sample_rate_khz", "band95_khz", "band99_khz") for t in result["top_features"][:3]), \
        result["top_features"]


def test_audit_of_a_matched_corpus_raises_no_warning(small_corpus):
    # the demo corpus puts every clip through one telephone channel: the chain tells nothing
    result = audit_corpus(small_corpus.root, k=3)
    assert result["eer"] > 0.35 and result["warning"] is None, result
    assert result["n_clips"] == len(read_corpus(small_corpus.root)), "every clip was described"
