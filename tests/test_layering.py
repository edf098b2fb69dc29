"""pipeline/ holds the domain and never imports Prefect; flows/ only orchestrate; DVC stages list what they import."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import yaml

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


def _pipeline_imports(module: str, root: Path, seen: set[str]) -> set[str]:
    """Every pipeline module `module` imports, transitively (read from the source, nothing run)."""
    if module in seen:
        return seen
    seen.add(module)
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        return seen
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            _pipeline_imports(node.module, root, seen)
            for alias in node.names:
                _pipeline_imports(f"{node.module}.{alias.name}", root, seen)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline"):
                    _pipeline_imports(alias.name, root, seen)
    return seen


def test_every_module_a_dvc_stage_imports_is_its_dependency():
    # a fix in a module a stage uses must make `dvc status` show the stage as changed
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split("-m ", 1)[1].split()[0]
        files = {m.replace(".", "/") + ".py" for m in _pipeline_imports(module, root, set())}
        files = {f for f in files if (root / f).is_file()}
        deps = {d for d in stage["deps"] if not d.startswith("${")}
        missing = sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {name} imports modules it does not list as deps: {missing}"
