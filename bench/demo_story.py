"""How often does `make demo` tell the whole story? Runs the demo on N fresh corpora (one per seed).

Each trial is a fresh clone of this repository's HEAD (nothing of the working tree's state: no store,
no registry, no models), sharing this checkout's .venv, with PYTHONPATH set to the clone (so the
clone's code runs, not this working tree's), run as `DEMO_SEED=<seed> bash scripts/demo.sh`.
A trial tells the whole story when the demo exits 0 after: the retrain flow promoted its candidate
through the gates, `aivoice serve` answered with the new champion, the rollback was followed by the
running service, and `aivoice models` listed the registry. Wall time per trial is reported (the venv
is already there, so set-up from a warm cache is not in it; `make demo` adds `make setup`).

    python bench/demo_story.py --seeds 0 1 2 3 4 5 6 7 8 9
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from _common import REPO, RESULTS, machine, md_table, write_json

MARKS = {"promoted": "promotion: promoted", "served": "== 7. The new champion serves",
         "rolled_back": "== 8. Roll back", "models": "== 9. Every version stays in the registry"}


def trial(seed: int, work: Path, timeout: int) -> dict:
    clone = work / f"seed-{seed}"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", "scripts/demo.sh"], cwd=clone, env=os.environ | {"DEMO_SEED": str(seed), "PYTHONPATH": str(clone)},
                              capture_output=True, text=True, timeout=timeout)
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = (exc.stdout or b"").decode() + (exc.stderr or b"").decode(), "timeout"
    wall = time.monotonic() - started
    (RESULTS / f"demo_story_seed{seed}.log").write_text(out)
    seen = {k: mark in out for k, mark in MARKS.items()}
    verdict = re.search(r"^verdict: (.*)$", out, re.M)
    return {"seed": seed, "exit": code, "whole_story": code == 0 and all(seen.values()), **seen,
            "verdict": verdict.group(1)[:160] if verdict else None, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per trial")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_story.json")
    ap.add_argument("--keep", type=Path, help="keep the trials' clones here (corpus, store, base model, registry)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aivoice-demo-story-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            rows.append(trial(seed, work, args.timeout))
            print(rows[-1], flush=True)
            write_json(args.out, {"machine": machine(), "rows": rows})
    ok = sum(r["whole_story"] for r in rows)
    print(md_table(rows, ["seed", "whole_story", "promoted", "rolled_back", "verdict", "wall_s"]))
    print(f"whole story in {ok} of {len(rows)} fresh corpora")
    write_json(args.out, {"machine": machine(), "rows": rows, "whole_story": ok, "trials": len(rows)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
