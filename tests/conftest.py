"""Shared fixtures: `shared_corpus` (the optional real-speech corpus, used by test_data and
test_audio) and `speech_like` (synthetic speech-like signal factory, test_audio/test_features)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


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

