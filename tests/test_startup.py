"""Start-up: the `aivoice` command imports the heavy libraries only in the commands that use them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch

from pipeline.core.model import new_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mlflow", "prefect", "matplotlib", "sklearn", "pandas", "fastapi")

PROBE = """
import json, sys
from pipeline.apps.cli import main
{call}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _imported(call: str, cwd: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AIVOICE_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(call=call, heavy=HEAVY)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_cli_module_imports_no_heavy_library(tmp_path):
    assert _imported("", tmp_path) == []


def test_detect_with_a_checkpoint_file_imports_no_registry_or_flow_library(tmp_path, tiny_params, speech_like):
    torch.manual_seed(0)
    ckpt = save_checkpoint(new_model(["en"], tiny_params.audio, tiny_params.features, 8, 0.0), tmp_path / "m.pt", threshold=0.5)
    sf.write(tmp_path / "a.wav", speech_like(2.0, 16000), 16000)
    (tmp_path / "params.yaml").write_text("model:\n  base_width: 8\n")
    call = (f"code = main(['--params', 'params.yaml', 'detect', 'a.wav', '--model', {str(ckpt)!r}, '--workers', '0', "
            "'--format', 'json'])\nassert code == 0, code")
    assert _imported(call, tmp_path) == [], "detect with a file needs neither mlflow nor prefect nor plotting"


DETECT_CHAMPION = """code = main(['--params', 'params.yaml', 'detect', 'a.wav', '--workers', '0', '--format', 'json', '--model', {ref!r}])
assert code == 0, code"""


def _detect_json(ref: str, cwd: Path) -> tuple[dict, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AIVOICE_PROGRESS="0")
    probe = PROBE.format(call=DETECT_CHAMPION.format(ref=ref), heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    return json.loads("\n".join(lines[:-1])), json.loads(lines[-1])


def test_detect_with_a_cached_local_registry_version_does_not_import_mlflow_and_follows_the_alias(
        tmp_path, mlflow_store, tiny_checkpoint, speech_like):
    from pipeline.io import registry

    sf.write(tmp_path / "a.wav", speech_like(2.0, 16000), 16000)
    (tmp_path / "params.yaml").write_text("model:\n  base_width: 8\n")
    assert registry.register(tiny_checkpoint(seed=1), base=True) == 1
    # the first time champion is resolved goes through MLflow (and fills the cache) ...
    first, heavy = _detect_json("champion", tmp_path)
    assert first["model"] == "ai-voice-detector v1 (@champion)" and "mlflow" in heavy
    # ... later ones read the local registry without importing it, and score the same
    again, heavy = _detect_json("champion", tmp_path)
    assert heavy == [] and again == first, (heavy, again)
    # when champion moves to v2, the next detect serves v2 (through MLflow once: not cached yet), then fast
    assert registry.register(tiny_checkpoint(seed=2), gates_passed=True) == 2
    registry.promote(2, reason="test")
    moved, _ = _detect_json("champion", tmp_path)
    fast, heavy = _detect_json("champion", tmp_path)
    assert moved["model"] == fast["model"] == "ai-voice-detector v2 (@champion)" and heavy == []
    assert fast["ai_score"] != first["ai_score"]
    # and a rollback is followed at once by the fast path (v1 is cached)
    registry.rollback(reason="test")
    back, heavy = _detect_json("champion", tmp_path)
    assert back == first and heavy == [], back["model"]
    by_number, heavy = _detect_json("2", tmp_path)
    assert by_number["model"] == "ai-voice-detector v2" and heavy == []
