"""Shared fixtures: `shared_corpus` (the optional real-speech corpus, used by test_data and
test_audio) and `speech_like` (synthetic speech-like signal factory, test_audio/test_features)."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# the demo-corpus builder is demo tooling, kept outside the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def make_speech_like(seconds: float, sr: int, *, seed: int = 0, level: float = 0.3,
                     noise: float = 0.003) -> np.ndarray:
    """Voiced-speech-like float32 signal: 20 harmonics of a gliding pitch (90-220 Hz) under a
    ~4 Hz syllable envelope, plus a little white noise so no mel band is empty."""
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 2 * np.pi)) + 20 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 21) if k * f0.max() < sr / 2)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi))
    x = harmonics * envelope
    x = level * x / np.abs(x).max() + noise * rng.standard_normal(n)
    return x.astype(np.float32)


@pytest.fixture
def speech_like() -> Callable[..., np.ndarray]:
    """Factory: speech_like(seconds, sr, seed=0, level=0.3, noise=0.003) -> float32 mono array."""
    return make_speech_like


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real-speech corpus (MANIFEST.csv + clips); skips when it is not on this machine.

    $AIVOICE_CORPUS wins; otherwise <repo>/../shared/corpus."""
    env = os.environ.get("AIVOICE_CORPUS")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "corpus"
    if not (root / "MANIFEST.csv").is_file():
        pytest.skip(f"shared corpus not found at {root} (set AIVOICE_CORPUS to its folder to run these)")
    return root



# --- MLflow registry fixtures (test_registry, test_serve); imports are local to keep other tests light ---

@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite database made once per session (creating one costs ~1.5 s)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("mlflow-template")
    SqlAlchemyStore(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()).engine.dispose()
    return root / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_template_db: Path):
    """A fresh sqlite MLflow store: $MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db, artifacts and the
    checkpoint cache under tmp_path. Yields the tracking URI."""
    import shutil
    import sqlite3

    import mlflow

    db, artifacts = tmp_path / "mlflow.db", tmp_path / "artifacts"
    shutil.copy(_mlflow_template_db, db)
    with sqlite3.connect(db) as con:  # the copy's Default experiment keeps its artifacts here too
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", ((artifacts / "0").as_uri(),))
    con.close()
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("AIVOICE_ARTIFACT_ROOT", str(artifacts))
    monkeypatch.setenv("AIVOICE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def model_path(tmp_path: Path, tiny_params) -> Path:
    """An untrained width-8 checkpoint for tiny_params (seed 0, threshold 0.5) at tmp_path/m.pt: for scoring tests."""
    import torch

    from pipeline.core.model import new_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(new_model(["en"], tiny_params.audio, tiny_params.features, 8, 0.0), tmp_path / "m.pt",
                           threshold=0.5)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: tiny_checkpoint(seed=0, threshold=0.5) -> a new base_width=8 checkpoint file for the default
    params, weights drawn with `seed`, data_hash "data-<seed>" and the default params' hash."""
    import itertools

    import torch

    from pipeline.config import load_params, params_hash
    from pipeline.core.model import new_model, save_checkpoint

    params = load_params("/nonexistent")
    counter = itertools.count()

    def make(seed: int = 0, threshold: float = 0.5) -> Path:
        torch.manual_seed(seed)
        model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
        return save_checkpoint(model, tmp_path / "checkpoints" / f"tiny-{next(counter)}-seed{seed}.pt",
                               threshold=threshold, data_hash=f"data-{seed}", params_hash=params_hash(params))

    return make


# --- real speech made offline (Debian prompts + TTS engines), shared by detection and pipeline tests ---

TEST_CORPUS_DIR = Path(__file__).resolve().parents[1] / "build" / "test-corpus"


@pytest.fixture(scope="session")
def small_corpus():
    """A small demo corpus (real human prompts, espeak-ng/flite/festival AI, piper as the new generator),
    built once into build/test-corpus and reused across runs."""
    from demo_corpus import build_demo_corpus

    return build_demo_corpus(TEST_CORPUS_DIR, n_human=24, n_ai_per_engine=8, n_new=4, seed=0)


@pytest.fixture(scope="session")
def tiny_params():
    """Default params with a narrow trunk and short schedules, for tests that train."""
    from pipeline.config import load_params

    return load_params("/nonexistent", overrides={
        "model.base_width": 8,
        "train.epochs": 2, "train.steps_per_epoch": 3, "train.batch_size": 8,
        "finetune.epochs": 5, "finetune.replay_per_class": 24, "augment.copies": 4,
        "twins.vocoders": ["griffinlim", "codec2"], "twins.neural_steps": 3, "twins.neural_batch_size": 2,
    })
