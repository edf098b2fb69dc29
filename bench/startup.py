"""Start-up of the `aivoice` command: `aivoice --help`, and `aivoice detect` on one 2 s clip with the
model given as a checkpoint file and as `champion` of a local sqlite MLflow registry. Start-up = the
command's wall time minus the model's own time (checkpoint load + scoring the clip, measured in this
process). Each setting runs --rounds times, interleaved (and against --baseline DIR, a checkout of
older code, in the same invocation); the median is reported. With --importtime, the heaviest top-level
imports of `detect` by `python -X importtime` (cumulative ms).

    python bench/startup.py --rounds 3
    git archive a340dfe | tar -x -C /tmp/base && python bench/startup.py --baseline /tmp/base --importtime
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine, md_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a checkout of older code, measured too (as code 'base')")
    ap.add_argument("--importtime", action="store_true", help="also list detect's heaviest imports")
    ap.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = ap.parse_args(argv)

    import soundfile as sf
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_speech_like as make_clip
    from pipeline.config import load_params
    from pipeline.core.model import load_checkpoint, new_model, save_checkpoint
    from pipeline.core.scoring import Scorer

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="startup_"))
    params = load_params(REPO / "params.yaml")
    ckpt = save_checkpoint(new_model(["unknown"], params.audio, params.features, params.model.base_width,
                                     params.model.dropout), tmp / "m.pt", threshold=0.5)
    clip = tmp / "clip.wav"
    sf.write(clip, make_clip(2.0, 16000), 16000)
    pfiles = {}   # each code with its own params.yaml (older code refuses keys it does not know)
    for code, root in (("head", REPO), ("base", args.baseline)):
        if root is not None:
            pfiles[code] = tmp / f"params_{code}.yaml"
            pfiles[code].write_text((root / "params.yaml").read_text().replace("threads: auto", "threads: 1"))
    env = os.environ | {"AIVOICE_PROGRESS": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "AIVOICE_ARTIFACT_ROOT": str(tmp / "art"),
                        "AIVOICE_CACHE_DIR": str(tmp / "cache")}
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "AIVOICE_ARTIFACT_ROOT", "AIVOICE_CACHE_DIR")})
    from pipeline.io import registry
    registry.register(ckpt, base=True, experiment="startup")   # the first base version becomes champion
    registry.resolve("champion")   # downloaded once (the first detect after a promotion does this), then cached

    # the model's own time: load the checkpoint and score the clip (warm, in this process)
    model_s = []
    for _ in range(3):
        t = time.perf_counter()
        model = load_checkpoint(ckpt, params.audio)
        from pipeline.apps.detect import detect_files
        list(detect_files([clip], Scorer(model, params.audio, "cpu"), params, 0.5))
        model_s.append(time.perf_counter() - t)
    model_time = min(model_s)

    commands = {"--help": ["--help"],
                "detect FILE.pt": ["--params", "{params}", "detect", str(clip), "--model", str(ckpt), "--workers", "0"],
                "detect champion": ["--params", "{params}", "detect", str(clip), "--model", "champion", "--workers", "0"]}
    codes = ["base", "head"] if args.baseline else ["head"]
    walls: dict[tuple[str, str], list[float]] = {}
    loads = []
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            for code in codes:
                root = args.baseline if code == "base" else REPO
                loads.append(os.getloadavg()[0])
                t = time.perf_counter()
                argv = [str(pfiles[code]) if a == "{params}" else a for a in cmd]
                proc = subprocess.run([sys.executable, "-m", "pipeline.apps.cli", *argv], capture_output=True, text=True,
                                      env=env | {"PYTHONPATH": str(root)}, cwd=root)
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    raise SystemExit(f"{code} {name} failed:\n{proc.stderr[-2000:]}")
                walls.setdefault((name, code), []).append(wall)
    rows = []
    for (name, code), w in walls.items():
        med = statistics.median(w)
        rows.append({"command": name, "code": code, "wall_s": round(med, 2),
                     "startup_s": round(med - (model_time if name != "--help" else 0.0), 2)})
    print(md_table(rows))
    print(f"model load + scoring the clip in-process: {model_time:.2f} s; load average during the runs "
          f"{min(loads):.1f}-{max(loads):.1f}")
    result = {"machine": machine(), "model_s": model_time, "rows": rows, "load_1min": [min(loads), max(loads)]}
    if args.importtime:
        result["imports"] = {}
        for code in codes:
            root = args.baseline if code == "base" else REPO
            argv = [str(pfiles[code]) if a == "{params}" else a for a in commands["detect champion"]]
            proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.apps.cli", *argv],
                                  capture_output=True, text=True, env=env | {"PYTHONPATH": str(root)}, cwd=root)
            top = {}
            for line in proc.stderr.splitlines():
                if line.startswith("import time:") and "|" in line:
                    _, cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
                    if name.isidentifier() and cum.isdigit():   # top-level packages only
                        top[name] = max(top.get(name, 0), int(cum) // 1000)
            heavy = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
            result["imports"][code] = heavy
            print(f"{code}: heaviest imports of `detect --model champion` (ms, cumulative): {heavy}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
