"""Screenshots of the MLflow UI's registry pages in headless Chromium, for the docs (docs/img/).

    .venv/bin/python scripts/registry_screenshot.py                  # a throwaway registry, built here
    .venv/bin/python scripts/registry_screenshot.py --store sqlite:///$PWD/mlruns/mlflow.db

Without --store it builds a throwaway project in a temporary folder from the test corpus (build/test-corpus,
made by the tests) with tiny, barely trained models: `aivoice import-checkpoint` registers v1, then the
augment, finetune and validate stages register v2 with its description and report. The numbers on the
pictures are those of such a tiny model; the page layout is what matters. Then it starts `mlflow server` on
the store, opens the model's version list and the latest version's page in Chromium (Debian's `chromium`
and `chromium-driver`, through selenium) and saves both pages as PNGs. Not a test: it illustrates the docs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TINY = """model: {base_width: 8}
finetune: {epochs: 3, replay_per_class: 16}
augment: {copies: 3}
validate: {gates: {min_calibration_humans: 1}}
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def build_store(root: Path, corpus: Path) -> str:
    """A project with v1 (an imported checkpoint) and v2 (a validated candidate); returns its tracking URI."""
    import torch

    from pipeline.config import load_params, params_hash
    from pipeline.core.model import new_model, save_checkpoint

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    (root / "params.yaml").write_text(TINY)
    params = load_params(root / "params.yaml")
    torch.manual_seed(0)
    ckpt = save_checkpoint(new_model(["en"], params.audio, params.features, 8, 0.0), root / "base.pt", threshold=0.5,
                           data_hash="screenshot", params_hash=params_hash(params))
    aivoice = [sys.executable, "-m", "pipeline.apps.cli"]
    _run(aivoice + ["ingest", "--corpus", str(corpus)], root, env)
    new = sorted((corpus / "new_generator").glob("*.wav"))[:2]
    _run(aivoice + ["ingest", *map(str, new), "--label", "ai", "--generator", "piper-joe"], root, env)
    _run(aivoice + ["import-checkpoint", str(ckpt), "--out", "models/production.pt"], root, env)
    for stage in ("augment", "finetune", "validate"):
        _run([sys.executable, "-m", f"pipeline.stages.{stage}"], root, env)
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshots(uri: str, out: Path, model: str) -> list[Path]:
    from mlflow.tracking import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    versions = sorted(MlflowClient(uri).search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))
    if not versions:
        sys.exit(f"{uri}: no versions of {model}")
    latest = versions[-1]
    port = _free_port()
    from pipeline.apps import process_group

    server = process_group.start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                  "127.0.0.1", "--port", str(port), "--workers", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("mlflow server did not start")
            time.sleep(1)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        out.mkdir(parents=True, exist_ok=True)
        pages = {"mlflow-model-versions.png": (f"{base}/#/models/{model}", f"Version {latest.version}"),
                 "mlflow-model-version.png": (f"{base}/#/models/{model}/versions/{latest.version}",
                                              (latest.description or "")[:40])}
        written = []
        for name, (url, expect) in pages.items():
            driver.get(url)
            WebDriverWait(driver, 60).until(lambda d: expect in d.find_element(By.TAG_NAME, "body").text)
            _close_side_panels(driver, By)
            time.sleep(1.5)   # let fonts and lazy parts settle
            driver.save_screenshot(str(out / name))
            written.append(out / name)
        return written
    finally:
        if driver is not None:
            driver.quit()
        process_group.stop(server, grace_s=30)   # with mlflow's job consumers


def _close_side_panels(driver, by) -> None:
    """Close the UI's assistant side panel, if shown, so the registry page gets the width."""
    for button in driver.find_elements(by.CSS_SELECTOR, "button[aria-label*='lose']"):
        try:
            if button.is_displayed() and button.location["x"] > 1000:
                button.click()
        except Exception:  # noqa: BLE001 - a panel that went away or re-rendered: nothing to close
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="tracking URI (default: build a throwaway registry)")
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "test-corpus")
    parser.add_argument("--model", default="ai-voice-detector")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="registry-screenshot-") as tmp:
        uri = args.store or build_store(Path(tmp), args.corpus.resolve())
        for path in screenshots(uri, args.out, args.model):
            print(path)


if __name__ == "__main__":
    main()
