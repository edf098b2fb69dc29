"""Helpers shared by the benchmark scripts: machine description, peak RSS, markdown tables, JSON out."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"

if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports the project's pipeline/
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """nproc, CPU model, load average, python/torch versions and the date (UTC)."""
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "nproc": os.cpu_count(), "cpu_model": model, "loadavg": os.getloadavg(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "gpu": gpu,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def md_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """GitHub markdown table of dict rows (floats formatted, NaN/None as '-')."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def logit(p):
    """log(p / (1 - p)) of probabilities clipped to [1e-6, 1 - 1e-6]: scores of several models averaged as logits."""
    import numpy as np

    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def mean_logit(scores):
    """The probability at the mean logit of several score arrays (one per model or channel): how the
    benchmarks average scores."""
    import numpy as np

    return 1 / (1 + np.exp(-np.mean([logit(np.asarray(s)) for s in scores], axis=0)))
