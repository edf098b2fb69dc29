"""The command-line shell shared by every stage's `main`."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline import atomic
from pipeline.faults import fault_point
from pipeline.config import Params, ParamsError, apply_threads, load_params

log = logging.getLogger(__name__)


def stage_main(name: str, run: Callable[[Params], dict], argv: list[str] | None) -> int:
    """Parse --params, set torch's threads (compute.threads), run the stage, print its outputs as JSON;
    2 on a user error."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        params = load_params(args.params)
        apply_threads(params)
        outputs = run(params)
        fault_point(f"{name}.done")   # outputs written, the stage not yet reported done to DVC
    except (ParamsError, ValueError, FileNotFoundError) as err:
        log.error("%s stage: %s", name, err)
        return 2
    print(json.dumps(outputs, indent=2, default=str))
    return 0


def write_json(path: str | Path, data: dict) -> Path:
    """A report, written atomically (temp + fsync + rename): a reader never sees half of one."""
    return atomic.write_text(path, json.dumps(data, indent=2, default=float) + "\n")
