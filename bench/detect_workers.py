"""`aivoice detect` end to end (process start, model load, decode, features, model, output) with
0, 1 and 2 decoding workers (`--workers`), interleaved over rounds in one invocation, so the ratios
between settings are measured under the same load. Realtime factor = audio seconds (from the headers)
/ wall seconds of the whole command. torch threads of the main process: `compute.threads` forced to
--threads; the workers always use one thread each. Also checks that every setting printed the same
JSON lines (the scores do not depend on the workers).

    python bench/detect_workers.py                               # shared corpus, workers 0 1 2, 1 and 2 threads
    python bench/detect_workers.py --workers 0 2 --threads 1 --rounds 2
    git archive 1ea1a35 | tar -x -C /tmp/base && python bench/detect_workers.py --baseline /tmp/base
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPUS, REPO, RESULTS, machine, md_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--model", help="checkpoint file (default: an untrained model of params model.base_width)")
    ap.add_argument("--workers", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--baseline", type=Path, help="a checkout of the code before --workers (git archive): measured "
                    "too, as workers 'base', with the same model and params")
    ap.add_argument("--out", type=Path, default=RESULTS / "detect_workers.json")
    args = ap.parse_args(argv)

    import soundfile as sf

    from pipeline.config import load_params
    from pipeline.core.audio import find_audio
    from pipeline.core.model import new_model, save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="detect_workers_"))
    params = load_params(REPO / "params.yaml")
    model = args.model or str(save_checkpoint(new_model(["unknown"], params.audio, params.features,
                                                        params.model.base_width, params.model.dropout), tmp / "m.pt"))
    paths = find_audio([args.folder])
    audio_s = sum(sf.info(str(p)).duration for p in paths)
    env = os.environ | {"AIVOICE_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    rows, outputs = [], {}
    info = machine()
    for r in range(args.rounds):
        for threads in args.threads:
            for workers in (["base"] if args.baseline else []) + args.workers:
                base = workers == "base"
                pfile = tmp / f"params-{threads}{'-base' if base else ''}.yaml"
                source = (args.baseline if base else REPO) / "params.yaml"
                pfile.write_text(source.read_text().replace("threads: auto", f"threads: {threads}"))
                load = os.getloadavg()[0]
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "pipeline.apps.cli", "--params", str(pfile), "detect",
                                       str(args.folder), "--model", model, "--format", "json"]
                                      + ([] if base else ["--workers", workers]), capture_output=True, text=True,
                                      env=env | {"PYTHONPATH": str(args.baseline if base else REPO)},
                                      cwd=args.baseline if base else REPO)
                wall = time.perf_counter() - t
                lines = proc.stdout.splitlines()
                digest = hashlib.sha256(proc.stdout.encode()).hexdigest()[:12]
                if proc.returncode not in (0, 1) or not lines:
                    raise SystemExit(f"{workers} failed:\n{proc.stderr[-2000:]}")
                if not base:   # the old code's scores differ in the last digits (other feature batching)
                    outputs.setdefault(digest, []).append(f"t{threads}w{workers}")
                rows.append({"round": r + 1, "threads": threads, "workers": workers, "files": len(lines),
                             "errors": sum(1 for x in lines if json.loads(x)["error"]), "wall_s": round(wall, 1),
                             "x_realtime": round(audio_s / wall, 1), "load_1min": round(load, 2), "output": digest})
                print(rows[-1], flush=True)
    result = {"machine": info, "audio_s": audio_s, "files": len(paths), "rows": rows,
              "identical_outputs": len(outputs) == 1, "outputs": outputs}
    write_json(args.out, result)
    print(md_table(rows))
    print(f"{len(paths)} files, {audio_s:.0f} s audio; outputs identical across settings: {len(outputs) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
