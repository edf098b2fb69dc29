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


def test_first_registered_version_becomes_champion_with_lineage_tags(mlflow_store, tiny_checkpoint):
    # given an empty registry
    ckpt = tiny_checkpoint(seed=1, threshold=0.42)
    # when the first checkpoint is registered, gates not run
    v1 = registry.register(ckpt, tags={"eer": 0.12, "owner": "ci"}, gates_passed=None)
    # then it is champion, promoted as the first model, and carries lineage and validation tags
    assert registry.aliases() == {CHAMPION: v1}, f"first version should be champion only: {registry.aliases()}"
    tags = tracking.configure().get_model_version(registry.DEFAULT_NAME, str(v1)).tags
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"]), f"git_commit tag: {tags.get('git_commit')!r}"
    assert tags["git_dirty"] in ("true", "false", "unknown"), f"git_dirty tag: {tags.get('git_dirty')!r}"
    assert tags["data_hash"] == "data-1", f"data_hash should come from the checkpoint: {tags}"
    assert tags["params_hash"] == params_hash(PARAMS), f"params_hash should come from the checkpoint: {tags}"
    assert tags["validation_status"] == "none" and tags["threshold"] == "0.42", f"validation tags: {tags}"
    assert tags["owner"] == "ci" and tags["promotion_reason"] == "first model", f"given/promotion tags: {tags}"
    [info] = registry.list_versions()
    assert info["metrics"] == {"eer": 0.12} and info["threshold"] == 0.42, f"list_versions: {info}"
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


def test_flatten_params_names_sections_and_truncates():
    # given the default params, and one with an over-long value
    flat = tracking.flatten_params(PARAMS)
    long = PARAMS.model_copy(update={"detect": PARAMS.detect.model_copy(update={"model": "x" * 10_000})})
    # then keys are "section.key", values strings, within MLflow's limit
    assert flat["audio.sample_rate"] == str(PARAMS.audio.sample_rate), f"flattened: {list(flat)[:5]}"
    assert all(isinstance(v, str) for v in flat.values()), "every value should be a string"
    assert len(tracking.flatten_params(long)["detect.model"]) == 6000, "values longer than 6000 chars are truncated"


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
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, tmp_path / "server.log", timeout_s=60)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("AIVOICE_ARTIFACT_ROOT", raising=False)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        monkeypatch.setenv("AIVOICE_CACHE_DIR", str(tmp_path / "cache"))
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
