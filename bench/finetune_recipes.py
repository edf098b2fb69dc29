"""Which fine-tuning recipe learns a new generator from two clips, without flagging humans?

Leave-one-generator-out, the way a user meets a new generator: the base never heard it.
- Shared corpus (`--bases DIR --corpus ../shared/corpus`): every AI generator with >= --min-clips clips.
  Its base is the leave-sources-out fold model (`aivoice evaluate ... ` / bench/base_eer.py --keep-models)
  whose held-out sources include the generator's source, so neither the generator nor its recording
  chain was trained on. The store holds the base's training sources (split by hash, as ingest does).
- Demo corpus (`--demo demo/corpus --base models/base.pt`): piper, held aside from the demo base.
For each draw, two of the generator's clips (seeded) are ingested, then exactly what the retrain flow
runs: the augment stage, `pipeline.training.finetune.finetune` with the recipe, and
`pipeline.training.validate.validate` (the gates). The candidate then scores, at its served threshold:
- the generator's OTHER clips (never ingested): recall;
- humans of sources never trained on (the base's held-out fold, or the demo's human_holdout): FPR.

    python bench/finetune_recipes.py --bases bench/results/lso_models --draws 3
    python bench/finetune_recipes.py --demo demo/corpus --base models/base.pt --draws 5 --recipes prototype head
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from _common import DEFAULT_CORPUS, RESULTS, machine, md_table, write_json  # first: puts the project on sys.path
from pipeline.config import load_params
from pipeline.core.audio import load_audio
from pipeline.core.data import file_sha256, read_corpus
from pipeline.core.model import load_checkpoint
from pipeline.core.scoring import score_model
from pipeline.io.store import ClipInfo, from_corpus, ingest
from pipeline.stages import augment as augment_stage
from pipeline.training.finetune import RECIPES, finetune
from pipeline.training.validate import validate

log = logging.getLogger("bench.finetune_recipes")


def scores(model, files: list[Path], params) -> np.ndarray:
    return np.array([s.ai_score for s in score_model(model, [load_audio(f, params.audio) for f in files], params)])


def one_draw(work: Path, base_store: Path, base: Path, pair: list[Path], generator: str, others: list[Path],
             humans: list[Path], recipe: str, params_file: Path, overrides: dict) -> dict:
    """Ingest the pair into a copy of the store, fine-tune and validate as the retrain flow does, then score."""
    store = work / "store"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base_store, store)
    paths = {"ingest.store": str(store), "ingest.quarantine": str(work / "quarantine"),
             "augment_stage.out": str(work / "augmented"), "finetune.out": str(work / "candidate.pt"),
             "augment_stage.new_generators": [generator], "finetune.recipe": recipe}
    params = load_params(params_file, overrides | paths)
    ingest([(p, ClipInfo(label="ai", generator=generator, split="train")) for p in pair], store, work / "quarantine",
           params.audio, params.ingest)
    augment_stage.run(params)
    production = load_checkpoint(base, params.audio)
    started = time.perf_counter()
    candidate, report = finetune(production, params)
    secs = time.perf_counter() - started
    verdict = validate(candidate, production, report, params)["verdict"]
    thr = candidate.meta.threshold
    calibration = set(report["calibration"].get("clips", []))
    humans = [h for h in humans if file_sha256(h) not in calibration]   # the threshold's own humans do not count
    new, hum = scores(candidate, others, params), scores(candidate, humans, params)
    before = scores(production, others, params)
    return {"recipe": recipe, "generator": generator, "pair": [p.name for p in pair], "threshold": thr,
            "recall_other": float((new >= thr).mean()), "human_fpr": float((hum >= thr).mean()),
            "production_recall_other": float((before >= production.meta.threshold).mean()),
            "status": verdict["status"], "failed_gates": [n for n, g in verdict["gates"].items() if not g["passed"]],
            "lofo_caught": [r["caught"] for r in report["lofo"]["files"].values()], "finetune_s": secs,
            "n_other": len(others), "n_humans": len(humans)}


def shared_tasks(corpus: Path, bases: Path, min_clips: int, seed_name: str) -> list[dict]:
    """(generator, its clips, the fold base that never saw its source, that fold's humans and training sources)."""
    clips = [c for c in read_corpus(corpus) if not c.twin_of]
    folds = []
    for ckpt in sorted(bases.glob(f"{seed_name}_fold*.pt")):
        held = set(load_checkpoint(ckpt).meta.notes["held_out_sources"])
        folds.append({"base": ckpt, "held": held})
    by_gen = defaultdict(list)
    for c in clips:
        if c.label == 1:
            by_gen[(c.source, c.generator)].append(c.path)
    tasks = []
    for (source, gen), paths in sorted(by_gen.items()):
        fold = next((f for f in folds if source in f["held"]), None)
        if len(paths) < min_clips or fold is None:
            continue
        humans = [c.path for c in clips if c.label == 0 and c.source in fold["held"]]
        tasks.append({"generator": gen, "clips": sorted(paths), "base": fold["base"], "humans": humans,
                      "train_sources": sorted({c.source for c in clips} - fold["held"])})
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--bases", type=Path, help="folder of leave-sources-out fold checkpoints seed<s>_fold<f>.pt")
    ap.add_argument("--seed-name", default="seed0", help="which seed's fold models to use")
    ap.add_argument("--demo", type=Path, help="demo corpus folder (new_generator/, human_holdout/) instead")
    ap.add_argument("--base", type=Path, help="with --demo: the base checkpoint")
    ap.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    ap.add_argument("--set", nargs="*", default=[], help="params overrides key=json")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=["prototype", "head", "last_block"])
    ap.add_argument("--draws", type=int, default=3, help="pairs of clips per generator")
    ap.add_argument("--min-clips", type=int, default=6)
    ap.add_argument("--generators", nargs="*", help="only these generators")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune_recipes.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the rest")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    params = load_params(args.params, overrides)
    rows = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else []
    done = {(r["recipe"], r["generator"], r["draw"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="aivoice-recipes-") as tmp:
        tmp = Path(tmp)
        if args.demo:
            base_store = tmp / "store-demo"
            ingest(from_corpus(args.demo), base_store, tmp / "q", params.audio, params.ingest)
            holdout = sorted((args.demo / "human_holdout").glob("*.wav"))
            ingest([(h, ClipInfo(label="human", generator="human", split="test")) for h in holdout], base_store,
                   tmp / "q", params.audio, params.ingest)
            tasks = [{"generator": "piper-joe", "clips": sorted((args.demo / "new_generator").glob("*.wav")),
                      "base": args.base, "humans": holdout, "store": base_store}]
        else:
            tasks = shared_tasks(args.corpus, args.bases, args.min_clips, args.seed_name)
            stores = {}
            for t in tasks:
                key = str(t["base"])
                if key not in stores:
                    stores[key] = tmp / f"store-{len(stores)}"
                    keep = set(t["train_sources"])
                    ingest([(p, i) for p, i in from_corpus(args.corpus) if i.source in keep], stores[key], tmp / "q",
                           params.audio, params.ingest)
                t["store"] = stores[key]
        if args.generators:
            tasks = [t for t in tasks if t["generator"] in args.generators]
        for t in tasks:
            for draw in range(args.draws):
                rng = np.random.default_rng([draw, len(t["clips"])])
                pick = sorted(rng.choice(len(t["clips"]), 2, replace=False).tolist())
                pair = [t["clips"][i] for i in pick]
                others = [c for i, c in enumerate(t["clips"]) if i not in pick]
                for recipe in args.recipes:
                    if (recipe, t["generator"], draw) in done:
                        continue
                    r = one_draw(tmp / "run", t["store"], t["base"], pair, t["generator"], others, t["humans"], recipe,
                                 args.params, overrides) | {"draw": draw}
                    rows.append(r)
                    print(f"{recipe:12s} {t['generator'][:28]:28s} draw {draw}: recall {r['recall_other']:.2f} "
                          f"(base {r['production_recall_other']:.2f}) FPR {r['human_fpr']:.3f} {r['status']}"
                          f" {','.join(r['failed_gates'])} {r['finetune_s']:.0f}s", flush=True)
                    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows})
    table = summarise(rows)
    print(md_table(table, floatfmt="{:.2f}"))
    write_json(args.out, {"machine": machine(), "args": vars(args), "rows": rows, "table": table})
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rr = [r for r in rows if r["recipe"] == recipe]
        per_gen = defaultdict(list)
        for r in rr:
            per_gen[r["generator"]].append(r["recall_other"])
        worst = min(per_gen, key=lambda g: np.mean(per_gen[g]))
        out.append({"recipe": recipe, "generators": len(per_gen), "draws": len(rr),
                    "recall other clips": float(np.mean([r["recall_other"] for r in rr])),
                    "base recall": float(np.mean([r["production_recall_other"] for r in rr])),
                    "worst generator": f"{worst} ({np.mean(per_gen[worst]):.2f})",
                    "unseen-human FPR": float(np.mean([r["human_fpr"] for r in rr])),
                    "draws passing gates": float(np.mean([r["status"] == "passed" for r in rr])),
                    "finetune s": float(np.mean([r["finetune_s"] for r in rr]))})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
