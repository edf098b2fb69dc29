"""pipeline/ holds the domain and never imports Prefect; flows/ only orchestrate."""
import pkgutil
import subprocess
import sys

import pipeline
import pipeline.stages


def test_pipeline_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
    assert "pipeline.stages.finetune" in modules and "pipeline.apps.cli" in modules, "walked the whole package"
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "importing every pipeline module must not import prefect"
