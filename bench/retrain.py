"""Wall time of a seed-sized retrain through `dvc repro`: 2 new clips x augment.copies (20), finetune.epochs
(50) with human replay, then validation against production — split into stage times.

Set-up (not timed as part of the retrain): a fresh project in a temp folder built like
tests/test_dvc_pipeline.py (the project's dvc.yaml, pipeline/ and params.yaml copied; git init; dvc init),
MLFLOW_TRACKING_URI pointed at a temp sqlite store, a corpus ingested into data/store (plus its
human_holdout as the fixed test split, as scripts/demo.sh does), a base model registered (it becomes
@champion) and exported to models/production.pt, the twins of the corpus made (the twins stage), and the
existing store committed to DVC by running
the ingest stage once on an empty incoming folder (so the timed ingest is the steady-state one; pass
--cold to time the first tracking of the store instead). Then 2 clips of the held-aside generator are
copied into data/incoming/ai/piper-joe/ and each stage is timed with `dvc repro --single-item <stage>`.

Base model: --base CKPT (default: models/base.pt of this checkout if present: full width, trained by
`aivoice bootstrap` on the demo corpus); without one, a base is trained with a short schedule
(--bootstrap-epochs/--bootstrap-steps; the retrain's cost does not depend on how well the base was
trained, but its verdict does).

Corpus: --corpus DIR made by `python scripts/demo_corpus.py` (needs new_generator/ and human_holdout/). Default:
demo/corpus, else build/test-corpus, else one is built into the work folder (~25 s, offline).

    python bench/retrain.py                        # the target: < 120 s end to end on 2 CPU cores
    python bench/retrain.py --threads 1 --keep     # OMP/MKL threads for the stage processes; keep the project
    python bench/retrain.py --threads 0 1 0 1      # default vs 1 thread, alternated, in one invocation
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, machine, md_table, write_json  # noqa: E402

STAGES = ("ingest", "twins", "augment", "finetune", "validate")   # as the retrain flow runs them
TARGET_S = 120.0
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"$ {' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return secs, proc.stdout + proc.stderr


def pick_corpus(arg: Path | None, work: Path, env: dict) -> tuple[Path, str]:
    if arg:
        return arg.resolve(), "given"
    for cand in (REPO / "demo" / "corpus", REPO / "build" / "test-corpus"):
        if (cand / "MANIFEST.csv").exists() and (cand / "new_generator").is_dir():
            return cand, "existing"
    secs, _ = sh([str(BIN / "python"), str(REPO / "scripts" / "demo_corpus.py"), str(work / "corpus")], work, env)
    return work / "corpus", f"built in {secs:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="base checkpoint (default: models/base.pt if present, else trained short)")
    ap.add_argument("--corpus", type=Path, help="demo-corpus folder (default: demo/corpus, build/test-corpus, or build one)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params copied into the project")
    ap.add_argument("--bootstrap-epochs", type=int, default=2, help="short schedule when no base checkpoint exists")
    ap.add_argument("--bootstrap-steps", type=int, default=10)
    ap.add_argument("--new", type=int, default=2, help="new-generator clips dropped into data/incoming")
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="OMP_NUM_THREADS/MKL_NUM_THREADS for the stage processes, 0 = unset (torch default); "
                         "several values = one fresh project each, timed in this order, in one invocation")
    ap.add_argument("--cold", action="store_true", help="do not pre-track the store: the timed ingest also hashes and caches it")
    ap.add_argument("--workdir", type=Path, help="project folder to create (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temp project")
    ap.add_argument("--out", type=Path, default=RESULTS / "retrain.json")
    args = ap.parse_args(argv)
    if args.workdir and len(args.threads) > 1:
        raise SystemExit("--workdir takes one --threads value")
    results = [run_once(args, th) for th in args.threads]
    out = results[0] if len(results) == 1 else {"runs": results, "machine": results[0]["machine"]}
    write_json(args.out, out)
    text = "\n".join(r["text"] for r in results)
    if len(results) > 1:
        ref = results[0]["total_s"]
        text += "\n" + md_table([{"threads": r["threads"] or "default", "total_s": r["total_s"], "ratio_vs_first": r["total_s"] / ref,
                                  "target_met": r["target_met"]} for r in results], floatfmt="{:.2f}") + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def run_once(args, threads: int) -> dict:
    t0 = time.time()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="aivoice-retrain-"))).resolve()
    proj = work / "project"
    if proj.exists():
        raise SystemExit(f"{proj}: exists; choose another --workdir")
    proj.mkdir(parents=True)
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
                        "AIVOICE_ARTIFACT_ROOT": str(work / "mlruns" / "artifacts"),
                        "AIVOICE_CACHE_DIR": str(work / "mlruns" / "cache")}
    env.pop("MLFLOW_REGISTRY_URI", None)
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    setup: dict[str, float] = {}

    # the project, as tests/test_dvc_pipeline.py builds it
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", proj / ".gitignore")
    shutil.copytree(REPO / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(args.params, proj / "params.yaml")
    (proj / "data" / "incoming").mkdir(parents=True)
    (proj / "data" / "incoming" / ".gitkeep").touch()
    sh(["git", "init", "-q"], proj, env)
    sh(["dvc", "init", "-q"], proj, env)

    corpus, how = pick_corpus(args.corpus, work, env)
    if corpus.parent != work:   # snapshot: a shared checkout's demo/corpus may be rebuilt by others mid-run
        shutil.copytree(corpus, work / "corpus", ignore=shutil.ignore_patterns(".cache"))
        corpus, how = work / "corpus", f"snapshot of {corpus} ({how})"
    setup["ingest_corpus_s"], _ = sh(["aivoice", "ingest", "--corpus", str(corpus)], proj, env)
    if (corpus / "human_holdout").is_dir():
        secs, _ = sh(["aivoice", "ingest", str(corpus / "human_holdout"), "--label", "human", "--generator", "human",
                      "--split", "test"], proj, env)
        setup["ingest_corpus_s"] += secs
    # the twins of the starting corpus belong to bootstrapping (the demo makes them before the base);
    # the timed twins stage below only checks for new humans
    setup["twins_s"], _ = sh(["dvc", "repro", "--single-item", "twins"], proj, env)

    base = args.base or (REPO / "models" / "base.pt" if (REPO / "models" / "base.pt").exists() else None)
    if base:
        (proj / "models").mkdir()
        shutil.copy(base, proj / "models" / "base.pt")
        code = ("from pipeline.io import registry\n"
                "v = registry.register('models/base.pt', base=True, tags={'source': 'bench/retrain.py base'})\nprint('registered v', v)")
        setup["register_base_s"], _ = sh([sys.executable, "-c", code], proj, env)
        base_desc = f"{base} (reused)"
    else:
        short = proj / "params-bootstrap.yaml"
        code = ("import yaml,sys; p=yaml.safe_load(open('params.yaml')); "
                f"p['train'].update(epochs={args.bootstrap_epochs}, steps_per_epoch={args.bootstrap_steps}); "
                "yaml.safe_dump(p, open(sys.argv[1], 'w'), sort_keys=False)")
        sh([sys.executable, "-c", code, str(short)], proj, env)
        setup["bootstrap_short_s"], _ = sh(["aivoice", "--params", str(short), "bootstrap", "--corpus", "data/store",
                                            "--out", "models/base.pt", "--report", "reports/bootstrap.json"], proj, env)
        short.unlink()
        base_desc = f"trained here with a short schedule ({args.bootstrap_epochs} epochs x {args.bootstrap_steps} steps)"
    setup["export_champion_s"], _ = sh(["aivoice", "export-champion", "models/production.pt"], proj, env)
    if not args.cold:
        setup["track_store_s"], _ = sh(["dvc", "repro", "--single-item", "ingest"], proj, env)

    new_clips = sorted((corpus / "new_generator").glob("*.wav"))[: args.new]
    incoming = proj / "data" / "incoming" / "ai" / "piper-joe"
    incoming.mkdir(parents=True)
    for clip in new_clips:
        shutil.copy(clip, incoming / clip.name)

    load_start = os.getloadavg()
    stage_s: dict[str, float] = {}
    for stage in STAGES:
        stage_s[stage], out = sh(["dvc", "repro", "--single-item", stage], proj, env)
        if f"Running stage '{stage}'" not in out:
            raise SystemExit(f"stage {stage} did not run:\n{out[-2000:]}")
        print(f"{stage}: {stage_s[stage]:.1f} s", file=sys.stderr)
    total = sum(stage_s.values())
    load_end = os.getloadavg()
    again, out = sh(["dvc", "repro"], proj, env)

    verdict = json.loads((proj / "reports" / "verdict.json").read_text())
    ft = json.loads((proj / "reports" / "finetune.json").read_text())
    ingest = json.loads((proj / "reports" / "ingest.json").read_text())
    result = {
        "machine": machine(), "corpus": f"{corpus} ({how})", "base": base_desc, "new_clips": [c.name for c in new_clips],
        "threads": threads, "cold": args.cold, "setup_s": setup, "stage_s": stage_s, "total_s": total,
        "target_s": TARGET_S, "target_met": total < TARGET_S, "load_start": load_start, "load_end": load_end,
        "noop_repro_s": again, "noop_repro_ran_nothing": "Running stage" not in out,
        "ingested": len(ingest.get("added", [])), "finetune": {k: ft.get(k) for k in ("segments", "best_epoch", "trained", "new_generators")}
        | {"epochs_run": len(ft.get("history", [])), "recipe": ft.get("recipe"), "lofo": ft.get("lofo", {}).get("files")},
        "verdict": {"passed": verdict["passed"], "status": verdict.get("status"), "reasons": verdict["reasons"],
                    "threshold": verdict.get("threshold"),
                    "gates": {n: {"passed": g["passed"], "value": g["value"]} for n, g in verdict["gates"].items()}},
        "project": str(proj) if args.keep else None, "wall_s": round(time.time() - t0, 1),
    }
    rows = [{"stage": s, "seconds": stage_s[s], "share": stage_s[s] / total} for s in STAGES]
    rows.append({"stage": "**total**", "seconds": total, "share": 1.0})
    gates = ", ".join(f"{n} {'ok' if g['passed'] else 'FAIL'} ({g['value']:.3f})" if isinstance(g["value"], (int, float))
                      else f"{n} {'ok' if g['passed'] else 'FAIL'}" for n, g in result["verdict"]["gates"].items())
    text = "\n".join([
        f"Seed-sized retrain via `dvc repro --single-item`: {len(new_clips)} new clips, corpus {result['corpus']}, base {base_desc}; "
        f"threads {threads or 'default'}; load average {load_start[0]:.1f} -> {load_end[0]:.1f}",
        md_table(rows, ["stage", "seconds", "share"], "{:.2f}"), "",
        f"target < {TARGET_S:.0f} s: {'MET' if total < TARGET_S else 'NOT MET'} ({total:.1f} s). "
        f"finetune: {result['finetune']['epochs_run']} epochs run (best {result['finetune']['best_epoch']}), segments {result['finetune']['segments']}.",
        f"verdict: {verdict.get('status', 'passed' if verdict['passed'] else 'failed').upper()}; gates: {gates}",
        f"set-up (not in the total): " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items())
        + f"; no-op `dvc repro` afterwards {again:.1f} s (ran nothing: {result['noop_repro_ran_nothing']})",
        f"benchmark wall {result['wall_s']:.0f} s", ""])
    print(text, file=sys.stderr)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result | {"text": text}


if __name__ == "__main__":
    sys.exit(main())
