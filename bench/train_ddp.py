"""Bootstrap training throughput with 1 and N processes (`aivoice bootstrap --nproc N`, DDP over gloo on
CPU) and with 0 or more batch-making processes per training process (`compute.batch_workers`), each
process one torch thread, configurations interleaved in one invocation. Segments/s counts the
global batch (train.batch_size rows per step, split across the processes) over the training steps of an
epoch, validation left out (rank 0 validates alone); the best epoch is reported, the first included.
Each run registers into a throw-away MLflow store.

    python bench/train_ddp.py --width 32             # build/test-corpus, the shipped width, 1 and 2 processes
    python bench/train_ddp.py --nproc 1 2 --steps 20 --epochs 2 --rounds 2
    python bench/train_ddp.py --nproc 1 --batch-workers 0 1 --corpus demo-project/data/store \
        --twins demo-project/data/twins --steps 50 --epochs 1 --rounds 2

Rows with the same process count and arithmetic but other batch workers say whether their weights equal
the first such row's (they should: a batch depends only on the seed and the step). The runs' params file holds only
the settings above (train schedule, compute, width): everything else is the code's default
(pipeline/config.py), not this checkout's params.yaml, so the figures do not move when params.yaml does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine, md_table, write_json  # noqa: E402

ARITHMETIC = {"fp32": {"channels_last": False, "cpu_amp": False}, "cl": {"channels_last": True, "cpu_amp": False},
              "bf16": {"channels_last": True, "cpu_amp": True}}   # bf16 only where the CPU has it natively


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=REPO / "build" / "test-corpus",
                    help="labelled corpus (default: the tests' small corpus, made by `pytest tests/test_train.py`)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-workers", type=int, nargs="+", default=[0], help="compute.batch_workers values")
    ap.add_argument("--twins", type=Path, help="vocoded twins of the corpus (default: none)")
    ap.add_argument("--width", type=int, help="trunk width (default: the code's, 64; params.yaml ships 32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--arith", nargs="+", default=["cl"], choices=list(ARITHMETIC),
                    help="training arithmetic: fp32 (contiguous), cl (float32, channels_last), bf16 (train.cpu_amp)")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_ddp.json")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="train_ddp_"))
    settings = {"train": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch,
                          "patience": args.epochs + 1}, "compute": {"threads": 1}}
    if args.width:
        settings["model"] = {"base_width": args.width}
    env = os.environ | {"AIVOICE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                        "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                        "AIVOICE_ARTIFACT_ROOT": str(tmp / "artifacts"), "AIVOICE_CACHE_DIR": str(tmp / "cache")}
    rows, info = [], machine()
    first: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for n, bw, arith in [(n, bw, a) for n in args.nproc for bw in args.batch_workers for a in args.arith]:
            tag = f"r{r}n{n}w{bw}{arith}"
            run_settings = settings | {"compute": {"threads": 1, "batch_workers": bw},
                                       "train": settings["train"] | ARITHMETIC[arith]}
            (tmp / f"{tag}.yaml").write_text(yaml.safe_dump(run_settings))
            load = os.getloadavg()[0]
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pipeline.apps.cli", "--params", str(tmp / f"{tag}.yaml"),
                                   "bootstrap", "--corpus", str(args.corpus.resolve()), "--out", str(tmp / f"{tag}.pt"),
                                   "--report", str(tmp / f"{tag}.json"), "--twins",
                                   str(args.twins.resolve() if args.twins else tmp / "none"), "--nproc", str(n)],
                                  capture_output=True, text=True, env=env, cwd=tmp)
            wall = time.perf_counter() - t
            if proc.returncode:
                raise SystemExit(f"{tag} failed:\n{proc.stderr[-3000:]}")
            report = json.loads((tmp / f"{tag}.json").read_text())
            hist = report["history"]
            weights = torch.load(tmp / f"{tag}.pt", weights_only=True)["state_dict"]
            same = all(torch.equal(weights[k], v) for k, v in first.setdefault((n, arith), weights).items())
            rows.append({"round": r + 1, "processes": n, "batch_workers": bw, "arithmetic": arith, "threads_each": 1,
                         "global_batch": args.batch,
                         "segments_per_s": max(h["segments_per_s"] for h in hist),
                         "epoch_train_s": [h["train_s"] for h in hist], "val_eer": report["validation"]["overall"]["eer"],
                         "same_weights": same, "command_wall_s": round(wall, 1), "load_1min": round(load, 2)})
            print(rows[-1], flush=True)
    write_json(args.out, {"machine": info, "settings": settings, "corpus": str(args.corpus), "rows": rows})
    print(md_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
