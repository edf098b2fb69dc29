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
