"""Registry, promotion log and model resolution against a real MLflow store (sqlite, and a real server)."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from guard_stack import stop_process
from pipeline.apps import process_group
from pipeline.io import registry, tracking
from pipeline.config import load_params, params_hash
from pipeline.core.model import load_checkpoint
from pipeline.io.registry import CHALLENGER, CHAMPION, PREVIOUS, PromotionError, RegistryError
from pipeline.core.scoring import Scorer

PARAMS = load_params("/nonexistent")


def window_scores(ckpt: Path, windows: np.ndarray) -> dict[str, torch.Tensor]:
    """All three heads' probabilities for fixed windows, as tensors."""
    scores = Scorer(load_checkpoint(ckpt, PARAMS.audio), PARAMS.audio, "cpu")(windows)
    return {"ai": torch.from_numpy(scores.ai), "language": torch.from_numpy(scores.language),
            "speakers": torch.from_numpy(scores.speakers)}


def same_scores(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_first_registered_base_becomes_champion_with_lineage_tags(mlflow_store, tiny_checkpoint):
    # given an empty registry
    ckpt = tiny_checkpoint(seed=1, threshold=0.42)
    # when the first checkpoint is registered as a base model (bootstrap, import), gates not run
    v1 = registry.register(ckpt, tags={"eer": 0.12, "owner": "ci"}, gates_passed=None, base=True)
    # then it is champion, promoted as the first model, and carries lineage and validation tags
    assert registry.aliases() == {CHAMPION: v1}, f"first version should be champion only: {registry.aliases()}"
    tags = tracking.configure().get_model_version(registry.DEFAULT_NAME, str(v1)).tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit, f"MLflow's own commit tag on the version: {tags}"
    assert "git_commit" not in tags, f"no home-made copy of the commit tag: {tags}"
    assert tags["git_dirty"] in ("true", "false", "unknown"), f"git_dirty tag: {tags.get('git_dirty')!r}"
    assert tags["data_hash"] == "data-1", f"data_hash should come from the checkpoint: {tags}"
    assert tags["params_hash"] == params_hash(PARAMS), f"params_hash should come from the checkpoint: {tags}"
    assert tags["validation_status"] == "none" and tags["threshold"] == "0.42", f"validation tags: {tags}"
    assert tags["owner"] == "ci" and tags["promotion_reason"] == "first model", f"given/promotion tags: {tags}"
    run = mlflow.get_run(tracking.configure().get_model_version(registry.DEFAULT_NAME, str(v1)).run_id)
    assert run.data.tags["mlflow.source.git.commit"] == commit, f"and on its run: {run.data.tags}"
    [info] = registry.list_versions()
    assert info["metrics"] == {"eer": 0.12} and info["threshold"] == 0.42, f"list_versions: {info}"
    assert info["lineage"]["git_commit"] == commit, f"list_versions reads the commit: {info['lineage']}"
    assert info["promotion"]["reason"] == "first model" and info["promotion"]["by"], f"promotion info: {info}"
    assert [e["action"] for e in registry.history()] == ["promote"], f"history: {registry.history()}"


def test_passing_version_becomes_challenger_and_promotion_moves_previous_champion(mlflow_store, tiny_checkpoint):
    # given a champion and a second version that passed the gates
    v1 = registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    v2 = registry.register(tiny_checkpoint(seed=2), tags={"human_fpr": 0.01}, gates_passed=True)
    assert registry.aliases() == {CHAMPION: v1, CHALLENGER: v2}, f"v2 should be challenger: {registry.aliases()}"
    # when the challenger is promoted (no version named)
    event = registry.promote(reason="better on the new generator", user="alice")
    # then v2 is champion, v1 previous-champion, the challenger alias is used up, and who/why are recorded
    assert registry.aliases() == {CHAMPION: v2, PREVIOUS: v1}, f"aliases after promote: {registry.aliases()}"
    assert event["version"] == v2 and event["previous"] == v1 and not event["forced"], f"event: {event}"
    info = {v["version"]: v for v in registry.list_versions()}
    assert info[v2]["promotion"]["by"] == "alice", f"promoted_by: {info[v2]}"
    assert info[v2]["promotion"]["reason"] == "better on the new generator", f"reason: {info[v2]}"
    assert info[v2]["aliases"] == [CHAMPION] and info[v1]["aliases"] == [PREVIOUS], f"aliases per version: {info}"
    with pytest.raises(PromotionError, match="no challenger"):
        registry.promote(reason="again")


def test_promotion_of_a_failing_version_is_refused_and_names_it(mlflow_store, tiny_checkpoint):
    # given a champion and a version that failed the gates
    v1 = registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    v2 = registry.register(tiny_checkpoint(seed=2), tags={"failed_gates": "human_fpr: 0.07 fails <= 0.05"},
                           gates_passed=False)
    # when it is promoted without force
    with pytest.raises(PromotionError) as refused:
        registry.promote(v2, reason="looks fine to me")
    # then the one-line message names the version and the failed gate, and nothing moved
    message = str(refused.value)
    assert f"v{v2}" in message and "human_fpr" in message and "\n" not in message, f"message: {message}"
    assert registry.aliases() == {CHAMPION: v1}, f"aliases must not move: {registry.aliases()}"


def test_forced_promotion_needs_a_reason_and_is_recorded(mlflow_store, tiny_checkpoint):
    # given a champion and a failing version
    registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=False)
    # when forced without a reason, then refused
    with pytest.raises(PromotionError, match="without a reason"):
        registry.promote(v2, reason="  ", force=True)
    # when forced with a reason, then promoted and marked forced on the version and in the history
    registry.promote(v2, reason="hotfix for incident 42", force=True, user="bob")
    assert registry.aliases()[CHAMPION] == v2, f"forced promotion should move champion: {registry.aliases()}"
    tags = tracking.configure().get_model_version(registry.DEFAULT_NAME, str(v2)).tags
    assert tags["forced"] == "true" and tags["promotion_reason"] == "hotfix for incident 42", f"tags: {tags}"
    last = registry.history()[-1]
    assert last["forced"] and last["user"] == "bob" and last["version"] == v2, f"history entry: {last}"
    client = tracking.configure()
    [event] = client.search_runs([client.get_experiment_by_name(f"{registry.DEFAULT_NAME}-registry-events").experiment_id],
                                 filter_string="tags.forced = 'True'")
    assert event.data.tags["mlflow.user"] == "bob" and "user" not in event.data.tags, (
        f"the event run's user is MLflow's own tag (the UI's user column): {event.data.tags}")


def test_history_reads_events_logged_with_the_old_user_tag(mlflow_store, tiny_checkpoint):
    # given an event run from before MLflow's user tag was used (its user in a home-made `user` tag)
    registry.register(tiny_checkpoint(seed=1), base=True)
    client = tracking.configure()
    exp = client.get_experiment_by_name(f"{registry.DEFAULT_NAME}-registry-events").experiment_id
    [run] = client.search_runs([exp])
    client.delete_tag(run.info.run_id, "mlflow.user")
    client.set_tag(run.info.run_id, "user", "carol")
    # then history still names its user
    assert registry.history()[0]["user"] == "carol", f"old event runs keep their user: {registry.history()}"


def test_rollback_restores_the_previous_version_and_its_exact_predictions(mlflow_store, tiny_checkpoint, tmp_path):
    # given v1 champion, then v2 promoted over it; fixed random windows scored by the served champion
    ckpt1, ckpt2 = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    windows = np.random.default_rng(0).standard_normal((2, PARAMS.audio.segment_samples)).astype(np.float32) * 0.1
    v1 = registry.register(ckpt1, gates_passed=True)
    before = window_scores(registry.resolve(CHAMPION).checkpoint_path, windows)
    v2 = registry.register(ckpt2, gates_passed=True)
    registry.promote(v2, reason="candidate")
    served_v2 = window_scores(registry.resolve(CHAMPION).checkpoint_path, windows)
    assert not same_scores(before, served_v2), "v1 and v2 should score differently, else the test proves nothing"
    # when rolling back, with the download cache emptied so the weights come from the store again
    event = registry.rollback(reason="v2 misfires on call-centre audio", user="carol")
    shutil.rmtree(tmp_path / "cache")
    resolved = registry.resolve(CHAMPION)
    # then v1 is champion again, v2 previous-champion, and v1's predictions come back bit for bit
    assert resolved.version == v1 and registry.aliases()[PREVIOUS] == v2, f"aliases: {registry.aliases()}"
    assert event["action"] == "rollback" and event["previous"] == v2, f"event: {event}"
    after = window_scores(resolved.checkpoint_path, windows)
    assert same_scores(before, after), "rolled-back champion must reproduce v1's scores exactly"
    assert same_scores(window_scores(ckpt1, windows), after), "served v1 must equal the original checkpoint"


def test_rollback_with_nothing_to_roll_back_to_is_refused(mlflow_store, tiny_checkpoint):
    # given an empty registry, then a registry with a single champion
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(reason="empty")
    v1 = registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        registry.rollback(reason="only one version")
    # and rolling back to a version that never served is refused too
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    with pytest.raises(PromotionError, match=f"v{v2} was never champion"):
        registry.rollback(to=v2, reason="not a rollback")
    assert registry.aliases()[CHAMPION] == v1, f"champion must not move: {registry.aliases()}"


def test_history_lists_promotions_and_rollbacks_in_order(mlflow_store, tiny_checkpoint):
    # given three versions promoted in turn, then a rollback
    v1 = registry.register(tiny_checkpoint(seed=1), gates_passed=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    registry.promote(reason="v2 better")
    v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True)
    registry.promote(reason="v3 better")
    registry.rollback(reason="v3 regression")
    # when the history is read back
    steps = [(e["action"], e["version"], e["previous"], e["reason"]) for e in registry.history()]
    # then every change is there, oldest first
    assert steps == [("promote", v1, None, "first model"), ("promote", v2, v1, "v2 better"),
                     ("promote", v3, v2, "v3 better"), ("rollback", v2, v3, "v3 regression")], f"history: {steps}"


def test_resolve_alias_version_uris_and_file(mlflow_store, tiny_checkpoint):
    # given two versions, v2 champion
    ckpt1, ckpt2 = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    v1 = registry.register(ckpt1, gates_passed=True)
    v2 = registry.register(ckpt2, gates_passed=True)
    registry.promote(v2, reason="test")
    name = registry.DEFAULT_NAME
    run_id = tracking.configure().get_model_version(name, str(v1)).run_id
    expected = {None: (v2, CHAMPION, ckpt2), "champion": (v2, CHAMPION, ckpt2), PREVIOUS: (v1, PREVIOUS, ckpt1),
                str(v1): (v1, None, ckpt1), f"models:/{name}@{CHAMPION}": (v2, CHAMPION, ckpt2),
                f"models:/{name}/{v1}": (v1, None, ckpt1), f"runs:/{run_id}/model": (None, None, ckpt1),
                str(ckpt1): (None, None, ckpt1)}
    for ref, (version, alias, source) in expected.items():
        # when each reference is resolved, then it names the right version and yields that checkpoint's bytes
        got = registry.resolve(ref)
        assert (got.version, got.alias) == (version, alias), f"resolve({ref!r}) -> {got}"
        assert got.checkpoint_path.read_bytes() == source.read_bytes(), f"resolve({ref!r}) gave other weights"
    # and a second resolve reuses the cached download
    assert registry.resolve(v1).checkpoint_path == registry.resolve(f"models:/{name}/{v1}").checkpoint_path, \
        "resolving the same version twice should hit the cache"
    for bad in ("no-such-alias", "models:/other@champion", "missing/file.pt", 99):
        with pytest.raises(RegistryError):
            registry.resolve(bad)
    model, resolved = registry.load_model(CHAMPION, PARAMS)
    assert resolved.version == v2 and model.meta.data_hash == "data-2", f"load_model: {resolved}, {model.meta}"


def test_logged_pyfunc_scores_arrays_and_files(mlflow_store, tiny_checkpoint, speech_like, tmp_path):
    # given a registered checkpoint
    import soundfile as sf

    v1 = registry.register(tiny_checkpoint(seed=1, threshold=0.0), gates_passed=True)
    wav = tmp_path / "clip.wav"
    sf.write(wav, speech_like(2.0, PARAMS.audio.sample_rate), PARAMS.audio.sample_rate)
    # when it is loaded through MLflow's pyfunc and asked for a file and a raw array
    model = mlflow.pyfunc.load_model(f"models:/{registry.DEFAULT_NAME}/{v1}")
    by_path = model.predict(pd.DataFrame({"audio_path": [str(wav)]}))
    by_array = model.predict(pd.DataFrame({"audio": [speech_like(2.0, PARAMS.audio.sample_rate).astype(float).tolist()]}))
    # then both give a score and, at threshold 0, the AI label
    for out in (by_path, by_array):
        assert list(out.columns) == ["ai_score", "label", "error"], f"pyfunc output columns: {out.columns}"
        assert 0 <= out.loc[0, "ai_score"] <= 1 and out.loc[0, "label"] == "AI_GENERATED", f"pyfunc output: {out}"


def test_pyfunc_is_logged_as_code_and_loads_without_unpickling(mlflow_store, tiny_checkpoint, shared_corpus,
                                                               monkeypatch, caplog):
    # given a checkpoint registered in a real sqlite store, and MLflow told to refuse pickled models
    with caplog.at_level("WARNING", logger="mlflow"):
        v1 = registry.register(tiny_checkpoint(seed=3, threshold=0.0), gates_passed=True)
    assert not [r for r in caplog.records if "CloudPickle" in r.getMessage()], "logging pickles no Python object"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    uri = f"models:/{registry.DEFAULT_NAME}/{v1}"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path", "").endswith("pyfunc_model.py") and "python_model" not in flavor, flavor
    assert not list(local.rglob("*.pkl")), f"no pickle in the logged model: {sorted(local.rglob('*.pkl'))}"
    clip = next(shared_corpus / r["path"] for r in _manifest(shared_corpus)
                if r["label"] == "human" and r["format"].startswith("WAV"))
    # when it is loaded through MLflow's pyfunc and asked to score a real clip
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"audio_path": [str(clip)]}))
    # then the clip is scored (at threshold 0, AI)
    assert out.loc[0, "error"] is None and 0 <= out.loc[0, "ai_score"] <= 1, f"pyfunc output on {clip}: {out}"
    assert out.loc[0, "label"] == "AI_GENERATED", f"threshold 0 calls every clip AI: {out}"


def _manifest(root: Path) -> list[dict[str, str]]:
    import csv

    with open(root / "MANIFEST.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_flatten_params_names_sections_and_truncates():
    # given the default params, and one with an over-long value
    flat = tracking.flatten_params(PARAMS)
    long = PARAMS.model_copy(update={"detect": PARAMS.detect.model_copy(update={"model": "x" * 10_000})})
    # then keys are "section.key", values strings, within MLflow's limit
    assert flat["audio.sample_rate"] == str(PARAMS.audio.sample_rate), f"flattened: {list(flat)[:5]}"
    assert all(isinstance(v, str) for v in flat.values()), "every value should be a string"
    assert len(tracking.flatten_params(long)["detect.model"]) == 6000, "values longer than 6000 chars are truncated"


# --- guards: first champion, baseline-bound promotion, crash-safe and locked alias moves ---------------

def _client():
    return tracking.configure()


def test_a_failing_candidate_never_becomes_the_first_champion(mlflow_store, tiny_checkpoint):
    # given an empty registry
    # when fine-tuned candidates that failed, or had too little evidence, are registered
    failed = registry.register(tiny_checkpoint(seed=1), gates_passed=False, tags={"source": "finetune"})
    thin = registry.register(tiny_checkpoint(seed=2), gates_passed=False, status="insufficient evidence")
    # then neither is served: no alias at all
    assert registry.aliases() == {}, f"a candidate whose gates did not pass must not become champion: {registry.aliases()}"
    assert registry.history() == [], f"no promotion recorded: {registry.history()}"
    # and a base model (what bootstrap and import-checkpoint register) is the legitimate first champion
    base = registry.register(tiny_checkpoint(seed=3), base=True)
    assert registry.aliases() == {CHAMPION: base}, f"the base is champion: {registry.aliases()}"
    assert {failed, thin} == {1, 2}, "both candidates were still registered"


def test_a_failing_candidate_does_not_become_champion_after_the_alias_was_deleted(mlflow_store, tiny_checkpoint):
    # given a base champion whose alias was then deleted (e.g. in the MLflow UI)
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    _client().delete_registered_model_alias(registry.DEFAULT_NAME, CHAMPION)
    # when a failing candidate is registered
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=False)
    # then it stays unaliased; a passing one becomes champion, judged against no champion
    assert registry.aliases() == {}, f"failed v{v2} must not fill the empty champion alias: {registry.aliases()}"
    v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True)
    assert registry.aliases() == {CHAMPION: v3}, f"passing v{v3} may: {registry.aliases()}"
    assert registry.history()[-1]["reason"] == "passed its gates; there was no champion", registry.history()[-1]
    assert v1 == 1


def test_bootstrap_stage_registers_its_model_as_the_base_champion(mlflow_store, tiny_checkpoint, monkeypatch):
    # given the bootstrap stage with its training replaced by a tiny checkpoint (the registration is under test)
    from pipeline.stages import bootstrap as stage

    ckpt = tiny_checkpoint(seed=4)
    overall = {"eer": 0.2, "auc": 0.8, "fpr": 0.01}
    fake = {"checkpoint": str(ckpt), "data_hash": "data-4", "history": [{"epoch": 1, "loss": 0.5}],
            "calibration": {"threshold": 0.5, "n_humans": 60, "target_fpr": 0.01},
            "validation": {"overall": overall, "threshold": 0.5}, "n_train": 300, "n_twins": 100, "n_val": 2,
            "val_sources": ["a", "b"], "split_by": "source", "front_end": {"kind": "linear_bands"},
            "val_scores": [{"ai_score": 0.1, "label": "human"}, {"ai_score": 0.9, "label": "ai"}]}
    monkeypatch.setattr(stage, "bootstrap", lambda *a, **k: fake)
    monkeypatch.setattr(stage, "write_plots", lambda *a, **k: None)
    # when it runs on an empty registry
    result = stage.run(PARAMS, "unused-corpus")
    # then its version is champion
    assert registry.aliases() == {CHAMPION: result["model_version"]}, f"bootstrap makes champion: {registry.aliases()}"
    # and it reads as one line in the registry: how it was made, on which data, what it measured
    line = registry.model_version(result["model_version"]).description
    assert line == ("Base model trained by bootstrap on unused-corpus (300 clips, 100 of them twins; front end "
                    "linear_bands), data data-4, "
                    "not judged by gates: EER 0.200 on 2 clips of 2 held-out sources; threshold 0.500 at 1% FPR on "
                    "60 humans"), line
    assert registry.model_version(result["model_version"]).tags["front_end"] == "linear_bands", "tagged too"


def test_promotion_is_refused_when_the_champion_moved_since_validation(mlflow_store, tiny_checkpoint):
    # given v2 and v3 both validated against champion v1, then v3 promoted
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True, base_version=v1)
    tags = _client().get_model_version(registry.DEFAULT_NAME, str(v2)).tags
    assert tags["base_version"] == str(v1), f"the candidate records the champion it was judged against: {tags}"
    registry.promote(v3, reason="v3 better")
    # when v2, judged against v1, is promoted over v3
    with pytest.raises(PromotionError) as refused:
        registry.promote(v2, reason="v2 also passed")
    # then it is refused in one line naming both versions, and nothing moved
    message = str(refused.value)
    assert f"v{v2}" in message and f"v{v1}" in message and f"now v{v3}" in message and "\n" not in message, message
    assert registry.aliases() == {CHAMPION: v3, PREVIOUS: v1}, f"aliases must not move: {registry.aliases()}"
    # and force needs a reason, then is recorded as forced
    with pytest.raises(PromotionError, match="without a reason"):
        registry.promote(v2, reason=" ", force=True)
    event = registry.promote(v2, reason="approved: v3's baseline difference is irrelevant", force=True)
    assert event["forced"] and registry.aliases()[CHAMPION] == v2, f"forced: {event}, {registry.aliases()}"


def test_promotion_of_a_version_without_base_version_is_not_baseline_checked(mlflow_store, tiny_checkpoint):
    # given a passing version without the tag (registered before the tag existed, or imported), champion moved
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    v3 = registry.register(tiny_checkpoint(seed=3), gates_passed=True)
    registry.promote(v3, reason="v3")
    _client().delete_model_version_tag(registry.DEFAULT_NAME, str(v2), "base_version")
    # when it is promoted, then the baseline check is skipped
    assert registry.promote(v2, reason="v2")["version"] == v2 and registry.aliases()[CHAMPION] == v2
    assert v1 == 1


# every registry write a promotion or rollback makes (a crash is injected at the k-th of them)
_WRITES = ("set_registered_model_alias", "delete_registered_model_alias", "set_model_version_tag", "create_run",
           "set_terminated", "set_registered_model_tag", "delete_registered_model_tag")


class _Crash(BaseException):
    """A crash in the middle of a registry operation (BaseException: nothing may catch it)."""


def _crash_at(monkeypatch, k: int) -> dict:
    """Make the k-th registry write (counted from now) raise _Crash; returns the counter ({'n', 'armed'})."""
    from mlflow.tracking import MlflowClient

    state = {"n": 0, "armed": True}
    for method in _WRITES:
        original = getattr(MlflowClient, method)

        def wrapper(self, *args, _original=original, **kwargs):
            if state["armed"]:
                state["n"] += 1
                if state["n"] == k:
                    state["armed"] = False
                    raise _Crash(f"killed at write {k}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, method, wrapper)
    return state


def _assert_consistent_after(name: str, champion: int, previous: int, action: str) -> None:
    assert registry.aliases(name) == {CHAMPION: champion, PREVIOUS: previous}, f"aliases: {registry.aliases(name)}"
    events = [(e["action"], e["version"], e["previous"]) for e in registry.history(name)]
    assert events.count((action, champion, previous)) == 1, f"the event is logged exactly once: {events}"
    model = _client().get_registered_model(name)
    assert registry.PENDING_TAG not in (model.tags or {}), f"the journal is cleared: {model.tags}"
    tags = _client().get_model_version(name, str(champion)).tags
    assert tags["promotion_action"] == action and tags["promoted_by"], f"version tags: {tags}"


@pytest.mark.parametrize("k", range(1, 12))
def test_an_interrupted_promotion_is_completed_by_re_running_it(mlflow_store, tiny_checkpoint, monkeypatch, k):
    # given champion v1 and challenger v2
    name = registry.DEFAULT_NAME
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    # when the promotion of v2 is killed at its k-th registry write
    state = _crash_at(monkeypatch, k)
    with pytest.raises(_Crash):
        registry.promote(v2, reason="release")
    state["armed"] = False
    # then the champion is one of the two validated versions all along
    assert registry.aliases(name)[CHAMPION] in (v1, v2), f"after a crash at write {k}: {registry.aliases(name)}"
    # and re-running the same promotion completes it: aliases, one event, version tags, no journal left
    event = registry.promote(v2, reason="release (retry)")
    assert event["version"] == v2 and event["previous"] == v1, f"crash at write {k}: {event}"
    _assert_consistent_after(name, champion=v2, previous=v1, action="promote")


@pytest.mark.parametrize("k", range(1, 11))
def test_an_interrupted_rollback_is_completed_by_re_running_it(mlflow_store, tiny_checkpoint, monkeypatch, k):
    # given v2 promoted over v1
    name = registry.DEFAULT_NAME
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    registry.promote(v2, reason="release")
    # when the rollback is killed at its k-th registry write, then re-run
    state = _crash_at(monkeypatch, k)
    with pytest.raises(_Crash):
        registry.rollback(reason="bad release")
    state["armed"] = False
    registry.rollback(reason="bad release (retry)")
    # then it is rolled back once (not back and forth), consistently
    _assert_consistent_after(name, champion=v1, previous=v2, action="rollback")


def test_an_interrupted_promotion_is_completed_by_the_next_registry_operation(mlflow_store, tiny_checkpoint,
                                                                              monkeypatch):
    # given a promotion of v2 over v1 killed after its event was logged, before the aliases moved
    name = registry.DEFAULT_NAME
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    state = _crash_at(monkeypatch, 8)   # journal, 4 version tags, create_run, set_terminated, then the 1st alias
    with pytest.raises(_Crash):
        registry.promote(v2, reason="release")
    state["armed"] = False
    assert registry.aliases(name)[CHAMPION] == v1, "killed before champion moved"
    # when someone rolls back (the next alias move), then the promotion is first completed, then rolled back
    event = registry.rollback(reason="undo the release")
    assert event["version"] == v1 and event["previous"] == v2, f"rollback from the completed promotion: {event}"
    steps = [(e["action"], e["version"], e["previous"]) for e in registry.history(name)]
    assert steps == [("promote", v1, None), ("promote", v2, v1), ("rollback", v1, v2)], f"history: {steps}"
    assert registry.complete_pending(name) is None, "nothing left pending"


def test_alias_moves_hold_a_file_lock_beside_the_sqlite_store(mlflow_store, tiny_checkpoint, tmp_path, monkeypatch):
    import fcntl
    import threading

    # given champion v1, challenger v2, and another process holding the registry lock beside the store
    v1 = registry.register(tiny_checkpoint(seed=1), base=True)
    v2 = registry.register(tiny_checkpoint(seed=2), gates_passed=True)
    lock = tmp_path / "mlflow.db.registry.lock"
    assert lock.is_file(), "the lock file lies beside the sqlite database"
    holder = open(lock, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        # when a promotion runs, then it waits while the lock is held ...
        done = {}
        worker = threading.Thread(target=lambda: done.update(event=registry.promote(v2, reason="release")))
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() and registry.aliases()[CHAMPION] == v1, "promote must wait for the lock"
        # ... and a rollback gives up with a clear error after the lock timeout
        monkeypatch.setattr(registry, "LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(RegistryError, match="registry lock .* still held"):
            registry.rollback(to=v1, reason="x")
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    # and once the lock is released the promotion completes
    worker.join(timeout=60)
    assert done["event"]["version"] == v2 and registry.aliases() == {CHAMPION: v2, PREVIOUS: v1}, registry.aliases()


def test_lock_paths_local_stores_only():
    assert registry._lock_path("sqlite:////srv/mlruns/mlflow.db") == Path("/srv/mlruns/mlflow.db.registry.lock")
    assert registry._lock_path("file:///srv/mlruns") == Path("/srv/mlruns.registry.lock")
    for remote in ("http://mlflow:5000", "https://mlflow.example.com", "postgresql://u@db/mlflow", "databricks"):
        assert registry._lock_path(remote) is None, f"{remote} has no lock file (it takes the remote lease lock)"


# --- against a real `mlflow server` -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free port; its URI is the tracking URI."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log_file = open(tmp_path / "server.log", "wb")
    proc = process_group.start(cmd, stdout=log_file, stderr=subprocess.STDOUT)   # mlflow's job consumers end with it
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, tmp_path / "server.log", timeout_s=60)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("AIVOICE_ARTIFACT_ROOT", raising=False)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        monkeypatch.setenv("AIVOICE_CACHE_DIR", str(tmp_path / "cache"))
        yield uri
    finally:
        stop_process(proc)
        log_file.close()
        mlflow.set_tracking_uri(None)


def _wait_healthy(uri: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s: {log_path.read_text()[-2000:]}")


@pytest.mark.integration
def test_register_promote_rollback_resolve_through_a_real_server(mlflow_server, tiny_checkpoint):
    # given two checkpoints registered through the server
    ckpt1, ckpt2 = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    v1 = registry.register(ckpt1, gates_passed=True)
    v2 = registry.register(ckpt2, gates_passed=True)
    # when v2 is promoted, then rolled back
    registry.promote(reason="server test")
    assert registry.resolve(CHAMPION).checkpoint_path.read_bytes() == ckpt2.read_bytes(), "champion should be v2"
    registry.rollback(reason="server rollback")
    # then aliases, history and the resolved weights all follow, through the server's proxied artifacts
    assert registry.aliases() == {CHAMPION: v1, PREVIOUS: v2}, f"aliases: {registry.aliases()}"
    assert [e["action"] for e in registry.history()] == ["promote", "promote", "rollback"], f"{registry.history()}"
    resolved = registry.resolve(f"models:/{registry.DEFAULT_NAME}@{CHAMPION}")
    assert resolved.version == v1 and resolved.checkpoint_path.read_bytes() == ckpt1.read_bytes(), f"{resolved}"


@pytest.mark.integration
def test_gc_archives_and_restores_through_a_real_server(mlflow_server, tiny_checkpoint, tmp_path):
    from pipeline.io.archive import restore_version
    from pipeline.io.retention import collect_garbage

    # given a champion and a refused candidate whose artifacts sit in the server's proxied artifact store
    registry.register(tiny_checkpoint(seed=1), base=True)
    refused = tiny_checkpoint(seed=2)
    v2 = registry.register(refused, gates_passed=False)
    before = sorted(p.name for p in (tmp_path / "server-artifacts").rglob("*.pt"))
    assert len(before) == 2
    # when gc archives it (nothing newer to keep)
    result = collect_garbage(registry.DEFAULT_NAME, keep=0, repo=None, archive_dir=tmp_path / "archive")
    # then the tarball holds it, the server's store no longer does, and resolving says how to restore
    assert [a["version"] for a in result["archived"]] == [v2]
    assert len(sorted((tmp_path / "server-artifacts").rglob("*.pt"))) == 1, "its checkpoint left the server"
    with pytest.raises(registry.RegistryError, match=f"aivoice restore {v2}"):
        registry.resolve(v2)
    # and restore uploads it back through the server: the same bytes resolve again
    restore_version(registry.DEFAULT_NAME, v2)
    assert registry.resolve(v2).checkpoint_path.read_bytes() == refused.read_bytes()
