"""How does a base rank a voice it has never heard? Bootstraps a base on a demo project's store without the
new generator (the store as it was before the retrain ingested it), with params overridden, then scores
every clip of that voice in the project's demo corpus against the store's test-split humans (never trained
on) and the corpus's `human_holdout` humans (speakers never in the store). The params are this checkout's
params.yaml plus --set, so the shipped defaults are measured, whatever the project was made with.

    python bench/unseen_voice_rank.py /path/to/demo-project --seeds 0 1 --set train.ai_loss=ocsoftmax

The retrain's leave-one-file-out gate passes only where the base already ranks the new voice above nearly
all humans (docs/benchmarks.md, 6d): this measures that ranking directly, without the retrain. Prints and
writes one JSON row per seed: recall of the voice at the test humans' 99th / 98th / 95th percentile, AUC
against the test humans and against the unseen humans, and the bootstrap's wall time.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from _common import REPO, RESULTS, machine, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", type=Path, help="a demo project (bench/demo_story.py --keep)")
    ap.add_argument("--generator", default="piper-joe", help="the new voice's generator name in the store")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (VALUE as YAML)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable on shared cores)")
    ap.add_argument("--keep", type=Path, help="save each seed's base here (base_seed<N>.pt), e.g. to retrain it "
                    "with bench/retrain_variant.py")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.config import load_params
    from pipeline.core.audio import load_audio
    from pipeline.core.metrics import roc_auc
    from pipeline.core.model import load_checkpoint
    from pipeline.core.scoring import score_model
    from pipeline.training.train import bootstrap

    if args.keep and any((args.keep / f"base_seed{seed}.pt").exists() for seed in args.seeds):
        raise SystemExit(f"{args.keep}: already holds a base of one of these seeds; choose another --keep")
    project = args.project.resolve()
    store = project / "data" / "store"
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    with open(store / "MANIFEST.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_humans = [store / r["path"] for r in rows if r["split"] == "test" and r["label"] == "human"]
    voice = sorted((project / "demo" / "corpus" / "new_generator").glob("*.wav"))
    unseen = sorted((project / "demo" / "corpus" / "human_holdout").glob("*.wav"))
    out_rows = []
    for seed in args.seeds:
        params = load_params(REPO / "params.yaml", overrides=overrides | {"train.seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / "store"
            view.mkdir()
            (view / "audio").symlink_to(store / "audio")
            with open(view / "MANIFEST.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(r for r in rows if r["generator"] != args.generator)
            started = time.monotonic()
            bootstrap(view, params, Path(tmp) / "base.pt", Path(tmp) / "base.json", twins=project / "data" / "twins")
            wall = time.monotonic() - started
            model = load_checkpoint(Path(tmp) / "base.pt", params.audio)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(tmp) / "base.pt", args.keep / f"base_seed{seed}.pt")

        def scores(paths):
            return np.array([s.ai_score for s in score_model(model, [load_audio(p, params.audio) for p in paths],
                                                             params, "cpu")])

        h, v, u = scores(test_humans), scores(voice), scores(unseen)
        row = {"project": project.name, "seed": seed, "overrides": overrides, "n_voice": len(v), "n_test_humans": len(h),
               "n_unseen_humans": len(u), "bootstrap_s": round(wall, 1),
               **{f"recall_at_p{q}": round(float((v > np.percentile(h, q)).mean()), 3) for q in (99, 98, 95)},
               "auc_vs_test_humans": round(roc_auc(np.r_[h, v], np.r_[np.zeros(len(h)), np.ones(len(v))]), 4),
               "auc_vs_unseen_humans": round(roc_auc(np.r_[u, v], np.r_[np.zeros(len(u)), np.ones(len(v))]), 4)
               if len(u) else None,
               "voice_scores": [round(float(s), 4) for s in v]}
        print({k: row[k] for k in row if k != "voice_scores"}, flush=True)
        out_rows.append(row)
    tag = "_".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
    write_json(args.out or RESULTS / f"unseen_voice_rank_{project.name}_{tag}.json", {"machine": machine(), "rows": out_rows})


if __name__ == "__main__":
    main()
