"""The `aivoice` command line."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pipeline.config import ParamsError, apply_threads, load_params

log = logging.getLogger("aivoice")
# commands that only talk to the registry or start other programs: no torch work, so no thread setting
_NO_COMPUTE = frozenset({"promote", "rollback", "models", "report", "export-champion", "ui", "schedule", "remote",
                         "gc", "restore", "webhook"})


def _cmd_detect(args, params) -> int:
    from pipeline.core.audio import find_audio
    from pipeline.apps.detect import detect_files, write_results
    from pipeline.apps.decode_pool import DecodePool, resolve_workers
    from pipeline.core.scoring import Scorer, threshold_mismatch

    paths = find_audio(args.paths)
    if not paths:
        log.error("no audio files found in %s", " ".join(map(str, args.paths)))
        return 1
    if args.output is not None:   # resume: the files an earlier run wrote there are skipped
        from pipeline.apps.detect_resume import OutputFileError, done_paths
        try:
            done = done_paths(args.output, args.format)
        except (OutputFileError, OSError) as err:
            log.error("%s", err)
            return 2
        if done:
            before = len(paths)
            paths = [p for p in paths if str(p) not in done]
            log.warning("%s: %d file(s) already there, skipped; %d to score", args.output, before - len(paths), len(paths))
        if not paths:
            return 0
    workers = resolve_workers(params.detect.workers if args.workers is None else args.workers, len(paths))
    if args.device == "cuda":
        workers = 0   # the front end runs on the GPU beside the model
    pool = DecodePool(workers) if workers else None   # started first: the workers import torch meanwhile
    try:
        model, model_ref = _load_detector(args.model or params.detect.model, params)
        threshold = args.threshold if args.threshold is not None else model.meta.threshold
        mismatch = threshold_mismatch(model.meta, params) if args.threshold is None else None
        if mismatch:   # its false-positive rate was measured under other scoring settings
            if not args.force:
                log.error("%s: threshold %.3f was calibrated with other scoring settings: %s; set them back, give "
                          "--threshold, or --force", model_ref, threshold, mismatch)
                return 2
            log.warning("%s: threshold %.3f was calibrated with other scoring settings (%s); --force: using it anyway",
                        model_ref, threshold, mismatch)
        scorer = Scorer(model, params.audio, args.device, channels_last=True)
        log.info("scoring %d file(s) with %s (threshold %.3f; %d decoding worker(s))", len(paths), model_ref, threshold,
                 workers if scorer.device.type == "cpu" else 0)
        results = detect_files(paths, scorer, params, threshold, model_name=str(model_ref),
                               pool=pool if scorer.device.type == "cpu" else None)
        if args.output is None:
            failed = write_results(results, args.format, sys.stdout)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            fresh = not args.output.exists() or args.output.stat().st_size == 0
            with args.output.open("a", encoding="utf-8", newline="") as out:
                failed = write_results(results, args.format, out, header=fresh)
    finally:
        if pool is not None:
            pool.close()
    for r in failed:
        log.error("%s: %s", r.path, r.error)
    return 1 if failed else 0


def _load_detector(ref, params):
    """(model, description) for `ref`; a checkpoint file, or an alias or version of the local registry that
    was downloaded before, is loaded without importing mlflow (~1.5 s of start-up)."""
    from pipeline.core.model import load_checkpoint   # what registry.load_model does with the file

    text = str(ref or "champion")
    if not text.startswith(("models:/", "runs:/")) and not text.isdigit() and Path(text).is_file():
        return load_checkpoint(Path(text), params.audio), text
    if text.isdigit() or re.fullmatch(r"[A-Za-z][\w-]*", text):
        from pipeline.io.local_registry import cached_checkpoint

        name = params.registry.model_name
        if found := cached_checkpoint(int(text) if text.isdigit() else text, name):
            return load_checkpoint(found[1], params.audio), f"{name} v{found[0]}" + ("" if text.isdigit() else f" (@{text})")
    from pipeline.io import registry
    model, resolved = registry.load_model(ref, params, name=params.registry.model_name)
    return model, _describe_model(resolved, params)


def _describe_model(resolved, params) -> str:
    if resolved.version is None:
        return str(resolved.checkpoint_path)
    return f"{params.registry.model_name} v{resolved.version}" + (f" (@{resolved.alias})" if resolved.alias else "")


def _cmd_bootstrap(args, params) -> int:
    from pipeline.training.evaluate import GENERATOR_COLUMNS, format_table
    from pipeline.stages.bootstrap import run

    if args.nproc > 1 and args.lso:
        log.error("--lso with --nproc: run `aivoice evaluate` first, then bootstrap")
        return 2
    twins = _twins_for(args, params)
    if args.nproc > 1:   # the same command again, under torchrun, in nproc processes, on the twins made here
        from pipeline.training.distributed import launch

        made_here = ["--twins", twins] if twins and args.twins is None else []
        return launch(args.nproc, "pipeline.apps.cli", _without_nproc(args.argv) + made_here)
    report = run(params, args.corpus, args.out, args.report, twins, args.lso, args.seeds)
    if not report:   # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if report["lso"]:
        from pipeline.stages.evaluate import describe

        print(describe(report["lso"]))
    val, cal = report["validation"], report["calibration"]
    print(f"checkpoint: {report['checkpoint']}  (data {report['data_hash']}, params {report['params_hash']}; "
          f"{report['n_train']} training clips, {report['n_twins']} of them twins)")
    print(f"validation ({report['n_val']} clips, {report['split_by']}s unseen in training: "
          f"{', '.join(report['val_sources'][:8])}{' ...' if len(report['val_sources']) > 8 else ''}):")
    print(f"  EER {val['overall']['eer']:.3f}  AUC {val['overall']['auc']:.3f}  FPR {val['overall']['fpr']:.3f}  "
          f"FNR {val['overall']['fnr']:.3f} at the calibrated threshold {cal['threshold']:.3f} "
          f"(target FPR {cal['target_fpr']:.1%} on {cal['n_humans']} humans)")
    for warning in cal["warnings"]:
        print(f"  warning: {warning}")
    print("per generator (its AI clips against all human clips):\n" + format_table(val["per_generator"], GENERATOR_COLUMNS))
    print("per source:\n" + format_table(val["per_source"]))
    print(f"report: {args.report or params.train.report}")
    print(f"registered {params.registry.model_name} v{report['model_version']} (MLflow run {report['mlflow_run_id']})")
    return 0


def _twins_for(args, params) -> str:
    """The twins folder a training reads: `--twins DIR` as given (read only), none with `--no-twins`, else
    `train.twins` with the twins of the corpus it lacks made first (the twins step; docs: README, Twins)."""
    if args.no_twins:
        return ""
    if args.twins is not None:
        return str(args.twins)
    from pipeline.stages.twins import ensure

    made = ensure(params, args.corpus or params.ingest.store)
    if made is not None:
        print(f"twins: {made['added']} made, {made['existing']} already there, {made['failed']} failed "
              f"(reasons in {made['report']}); in {made['out']}")
    return params.train.twins


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _cmd_evaluate(args, params) -> int:
    from pipeline.stages.evaluate import describe, run

    twins = _twins_for(args, params)
    result = run(params, args.corpus or params.ingest.store, args.leave_sources_out, args.seeds, twins)
    print(describe(result))
    print(f"report: {result['report']} (per source and per generator); MLflow run {result['mlflow_run_id']}")
    return 0


def _cmd_audit(args, params) -> int:
    import json

    from pipeline.stages.common import write_json
    from pipeline.stages.evaluate import REPORT
    from pipeline.training.audit import audit_corpus

    result = audit_corpus(args.dir, args.folds, params.train.seed, params.train.linked_sources)
    print(f"shortcut audit of {args.dir}: a logistic regression on recording-chain features only "
          f"(sample rate, band, silences, level, noise floor, duration, codec), {result['k']} source folds:")
    print(f"  leave-sources-out EER {result['eer']:.3f} on {result['n_clips']} clips")
    lso = Path(REPORT)
    if lso.exists() and (found := json.loads(lso.read_text())).get("corpus") == str(args.dir):
        print(f"  the model ({lso}): pooled EER {found['summary']['pooled_eer']['mean']:.3f}, "
              f"matched-pair EER {found['summary']['matched_pair_eer']['mean']:.3f}")
    print("  strongest features: " + ", ".join(f"{t['feature']} -> {t['sign']}" for t in result["top_features"]))
    if result["warning"]:
        print(f"WARNING: {result['warning']}")
    write_json(args.report, result)
    print(f"report: {args.report}")
    return 0


def _cmd_twins(args, params) -> int:
    from pipeline.stages.twins import run

    result = run(params, args.corpus, args.out)
    print(f"{result['added']} twins added, {result['existing']} already there, {result['failed']} failed "
          f"(reasons in {result['report']}); twins in {result['out']}")
    return 0


def _cmd_import(args, params) -> int:
    from pipeline.io import registry
    from pipeline.io.import_checkpoint import import_checkpoint
    from pipeline.core.model import save_checkpoint

    languages = args.languages.split(",") if args.languages else None
    model, report = import_checkpoint(args.file, params, languages)
    out = Path(args.out or f"models/imported-{Path(args.file).stem}.pt")
    save_checkpoint(model, out)
    print(report.describe())
    from pipeline.training.report import describe_base

    matched = f"{len(report.mapped)} tensors mapped, {len(report.missing)} missing, {len(report.unexpected)} unexpected"
    description = describe_base(f"imported from {Path(args.file).name} by import-checkpoint",
                                data_hash=model.meta.data_hash, figures=[matched, f"threshold {model.meta.threshold:.3f}"])
    version = registry.register(out, name=params.registry.model_name, description=description,
                                tags={"source": "import", "imported_from": Path(args.file).name},
                                base=True)   # an adopted base model: champion when the registry has none
    print(f"imported {args.file} -> {out}, registered {params.registry.model_name} v{version}")
    return 0


def _cmd_ingest(args, params) -> int:
    from pipeline.core.audio import find_audio
    from pipeline.stages.common import write_json
    from pipeline.io.store import ClipInfo, from_corpus, ingest

    from pipeline.io.disk import require_free

    cfg = params.ingest
    require_free(cfg.store, params.storage.min_free_gb, "ingest")
    unsafe: list[dict] = []
    if args.corpus:   # files must stay inside the corpus folder (no absolute paths, `..` or symlinks out)
        items = from_corpus(args.corpus, args.split or "", unsafe)
    else:
        if not args.label or not args.generator:
            log.error("ingest needs --label and --generator (or --corpus DIR with a MANIFEST.csv)")
            return 2
        info = ClipInfo(label=args.label, generator=args.generator, speaker=args.speaker, language=args.language,
                        source=args.source or "", split=args.split or "")
        items = [(p, info) for p in find_audio(args.paths)]
    report = ingest(items, Path(cfg.store), Path(cfg.quarantine), params.audio, cfg,
                    within=args.corpus, rejected=unsafe)
    write_json(cfg.report, report.to_dict())
    for row in report.added:
        print(f"added      {row['original_name']} -> {cfg.store}/{row['path']} ({row['label']}, {row['generator']}, {row['split']})")
    for line in report.duplicates:
        print(f"unchanged  {line}")
    for rej in report.rejected:
        print(f"rejected   {rej['file']}: {rej['reason']} (copy in {rej['quarantined_as'] or 'nowhere'})")
    print(f"{len(report.added)} added, {len(report.duplicates)} already present, {len(report.rejected)} rejected; "
          f"report: {cfg.report}. Version the store with `dvc commit` (or `dvc repro`) and `git commit dvc.lock`.")
    return 1 if report.rejected else 0


def _cmd_gc(args, params) -> int:
    from pipeline.io.retention import collect_garbage

    keep = params.storage.keep_candidates if args.keep is None else args.keep
    archive_dir = None if args.no_archive else params.storage.archive_dir
    res = collect_garbage(params.registry.model_name, keep, None if args.no_dvc else ".", args.dry_run, archive_dir)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{res['versions']} registry versions, all kept; local checkpoints kept for v{', v'.join(map(str, res['kept']))}"
          if res["kept"] else f"{res['versions']} registry versions, all kept")
    for folder in res["removed"]:
        print(f"{verb}  {folder}")
    print(f"checkpoint cache: {res['cache_freed_bytes'] / 1e6:.1f} MB {'to free' if args.dry_run else 'freed'}")
    for a in res["archived"]:
        print(f"{'would archive' if args.dry_run else 'archived'}  v{a['version']} (refused candidate)"
              + (f": {a['files']} files, {a['bytes'] / 1e6:.1f} MB -> {a['archive']}; MLflow artifacts deleted"
                 if a["archive"] else f" into {archive_dir}/"))
    if archive_dir is None:
        print("refused candidates' MLflow artifacts: left alone")
    if res["dvc"] is None:
        print("DVC cache: left alone" + ("" if args.no_dvc else " (no .dvc folder here)"))
    elif res["dvc"]["ran"]:
        print(f"DVC cache (dvc gc -w): {res['dvc']['freed_bytes'] / 1e6:.1f} MB freed, {res['dvc']['cache_bytes'] / 1e6:.1f} MB left")
    else:
        print(f"DVC cache: {res['dvc']['cache_bytes'] / 1e6:.1f} MB; `dvc gc -w` would keep only what the workspace uses")
    return 0


def _cmd_restore(args, params) -> int:
    from pipeline.io.archive import restore_version

    res = restore_version(params.registry.model_name, args.version)
    print(f"restored {params.registry.model_name} v{args.version} from {res['archive']} (the tarball is kept)")
    return 0


def _cmd_promote(args, params) -> int:
    from pipeline.io import registry

    event = registry.promote(args.version, reason=args.reason, force=args.force, name=params.registry.model_name,
                             ui_promotion=params.registry.ui_promotion)
    print(f"champion -> v{event['version']} (previous-champion v{event['previous']}); by {event['user']}: {event['reason']}")
    return 0


def _cmd_rollback(args, params) -> int:
    from pipeline.io import registry

    event = registry.rollback(args.to, reason=args.reason, name=params.registry.model_name,
                              ui_promotion=params.registry.ui_promotion)
    print(f"champion -> v{event['version']} (rolled back from v{event['previous']}); by {event['user']}: {event['reason']}")
    return 0


def _cmd_models(args, params) -> int:
    from pipeline.io import registry

    name = params.registry.model_name
    versions = registry.list_versions(name)
    if not versions:
        print(f"{name}: no registered versions yet (aivoice bootstrap or import-checkpoint registers the first)")
        return 0
    print(f"{'version':>7}  {'aliases':<28} {'validation':<10} {'eer':>6} {'fpr':>6} {'new_rec':>7} {'thresh':>6}  created")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for v in versions:
        m = v["metrics"]
        print(f"{v['version']:>7}  {','.join(v['aliases']) or '-':<28} {v['validation_status']:<10} "
              f"{fmt(m.get('eer')):>6} {fmt(m.get('human_fpr')):>6} {fmt(m.get('new_gen_recall')):>7} "
              f"{fmt(v['threshold']):>6}  {v['created']}" + (f"  archived: {v['archived']}" if v["archived"] else ""))
    print("\npromotion history:")
    for e in registry.history(name):
        print(f"  {e['at']}  {e['action']:<8} v{e['version']} (was v{e['previous'] or '-'})  {e['user']}: {e['reason']}"
              + ("  [forced]" if e["forced"] else ""))
    return 0


def _cmd_report(args, params) -> int:
    from pipeline.io import version_report

    out = args.out or Path("reports") / "versions" / f"v{args.version}"
    written = version_report.write(args.version, out, params.registry.model_name)
    print(f"{params.registry.model_name} v{args.version}: {written['html']} (pictures in {written['det'].parent})")
    return 0


def _cmd_export(args, params) -> int:
    from pipeline.io import registry

    resolved = registry.export_champion(args.path, params.registry.model_name)
    print(f"{args.path}: {params.registry.model_name} v{resolved.version} (@champion)")
    return 0


def _cmd_serve(args, params) -> int:
    from pipeline.apps.serve import serve

    cfg = params.serve.model_dump() | {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(params, **cfg, model_name=params.registry.model_name)
    return 0


def _cmd_ui(args, params) -> int:
    """The MLflow UI on the tracking store; with a webhook secret set, champion moves made in it are sent to
    `aivoice serve` (--hook-url, default serve.host:serve.port) and pass the promotion guard. The UI runs in
    a process group of its own that is stopped whole when this command ends (Ctrl-C, SIGTERM or the UI's
    own exit): MLflow's job consumers outlive a SIGTERM to the mlflow process alone."""
    import os
    import signal
    import time
    import urllib.request

    from pipeline.apps import process_group
    from pipeline.io import alias_guard, tracking

    uri = tracking.tracking_uri()
    secret = alias_guard.webhook_secret()
    hook_url = args.hook_url or f"http://{params.serve.host}:{params.serve.port}/hooks/mlflow"
    env = dict(os.environ) | (alias_guard.server_env(hook_url, secret) if secret else {})
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))   # so the finally below runs
    proc = process_group.start([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                "--host", args.host, "--port", str(args.port)], env=env)
    try:
        if secret is None:
            log.warning("no webhook: champion moves made in this UI bypass the promotion guard (set $%s or $%s, "
                        "and run aivoice serve with it)", alias_guard.SECRET_ENV, alias_guard.SECRET_FILE_ENV)
            return proc.wait()
        server = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{server}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        if proc.poll() is None:
            alias_guard.register_webhook(hook_url, secret, server)
            print(f"champion moves in the UI go to {hook_url} (webhook {alias_guard.WEBHOOK_NAME})", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        process_group.stop(proc)


def _cmd_webhook(args, params) -> int:
    from pipeline.io import alias_guard

    secret = alias_guard.webhook_secret()
    if secret is None:
        log.error("no webhook secret: set $%s or $%s (the same for aivoice serve)", alias_guard.SECRET_ENV,
                  alias_guard.SECRET_FILE_ENV)
        return 2
    hook_id = alias_guard.register_webhook(args.url, secret, args.tracking_uri)
    print(f"webhook {alias_guard.WEBHOOK_NAME} ({hook_id}): {', '.join(alias_guard.EVENTS)} -> {args.url}")
    env = alias_guard.server_env(args.url, secret)
    print("the MLflow server delivering it needs: " + " ".join(f"{k}=..." if "KEY" in k else f"{k}={v}"
                                                              for k, v in env.items()))
    return 0


# The flow commands import flows/ (and with it Prefect) only when they run: pipeline/ itself never imports Prefect.

def _quiet_prefect() -> None:
    """No usage analytics from the ephemeral server (its telemetry write can hit a locked sqlite and log a traceback)."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

def _cmd_retrain(args, params) -> int:
    _quiet_prefect()
    from flows.retrain import RetrainError, StageError, run_retrain

    try:
        result = run_retrain(args.params, promote=args.promote, reason=args.reason)
    except (StageError, RetrainError) as err:
        log.error("retrain: %s", err)
        return 2
    ran = ", ".join(f"{stage}{'' if did else ' (unchanged)'}" for stage, did in result["stages"].items())
    print(f"stages: {ran}")
    print(f"verdict: {result['status'].upper()}" + ("" if result["passed"] else ": " + "; ".join(result["reasons"])))
    print(f"candidate: {params.registry.model_name} v{result['model_version']} (MLflow run {result['mlflow_run_id']}, "
          f"Prefect flow run {result['flow_run_id']})")
    print(f"promotion: {result['promotion']['action']}: {result['promotion']['why']}")
    return 0


def _cmd_monitor(args, params) -> int:
    _quiet_prefect()
    from flows.monitor import run_monitor

    result = run_monitor([str(p) for p in args.paths], args.params, review_count=args.review_count)
    drift = result["drift"]
    print(f"AI rate {result['ai_rate']:.3f}; drift: {drift['status']}"
          + (f" ({drift.get('metric')} {drift.get('value'):.3f} vs {drift.get('threshold')})" if drift.get("value") is not None else ""))
    print(f"review queue: {result['review']}  (label it, then `aivoice ingest --corpus <folder>`)")
    return 0


def _cmd_schedule(args, params) -> int:
    from flows.deploy import schedule

    deployment = schedule(args.cron, name=args.name, work_pool=args.pool, params_file=args.params)
    print(f"deployment retrain/{args.name} ({deployment}) runs on '{args.cron}' in work pool {args.pool}; "
          f"start a worker with: prefect worker start --pool {args.pool}")
    return 0



def _cmd_remote(args, params) -> int:
    from pipeline.io import dvc_remote

    try:
        if args.action == "add":
            if not args.name or not args.url:
                log.error("remote add: give NAME and URL, e.g. `aivoice remote add origin ssh://me@host/srv/aivoice-dvc`")
                return 2
            dvc_remote.add(args.name, args.url, keyfile=args.keyfile, user=args.user, default=not args.no_default)
            print(f"remote {args.name} -> {dvc_remote.remotes()[args.name]}"
                  f"{'' if args.no_default else ' (default: retrain pulls and pushes through it)'}")
        elif args.action == "list":
            default = dvc_remote.default()
            for name, url in dvc_remote.remotes().items():
                print(f"{name}\t{url}{'  (default)' if name == default else ''}")
        elif args.action == "pull":
            pulled = dvc_remote.pull_missing(remote=args.name)
            print(f"pulled {', '.join(pulled)}" if pulled else "nothing to pull: every output dvc.lock records is here "
                  "(outputs already here are never overwritten; `dvc pull` for that)")
        else:
            out = dvc_remote.push(remote=args.name)
            print(out.strip().splitlines()[-1] if out.strip() else "push: done")
    except dvc_remote.RemoteError as err:
        log.error("%s", err)
        return 2
    return 0


def _workers_arg(value: str):
    from pipeline.config import _workers

    try:
        return _workers(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aivoice", description="AI-generated-voice detector and its retraining pipeline")
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="score audio files or folders (recursive)")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--model", help="alias, version, models:/ or runs:/ URI, or a checkpoint file (default: detect.model, champion)")
    p.add_argument("--threshold", type=float, help="override the model's decision threshold")
    p.add_argument("--force", action="store_true", help="use the model's threshold although detect.hop_s, aggregate, "
                   "silent_window_db or audio.segment_s differ from those it was calibrated with (a warning)")
    p.add_argument("--format", choices=("table", "json", "csv", "hf"), default="table",
                   help="hf: per file, Hugging Face's audio-classification list [{label, score}, ...], one line each")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=_workers_arg, help="processes decoding and computing features ahead of the model: auto or N "
                   "(0 = none; default: detect.workers)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="append results to FILE (json or csv), flushed per file; run again with the same FILE to "
                   "resume: the files already in it are skipped")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("bootstrap", help="train a base model from scratch on a labelled corpus folder")
    p.add_argument("--corpus", required=True, type=Path, help="folder with MANIFEST.csv or human/ and ai/ subfolders")
    p.add_argument("--out", type=Path, help="checkpoint to write (default: train.out in params)")
    p.add_argument("--report", type=Path, help="JSON report (default: train.report in params)")
    p.add_argument("--twins", type=Path, help="vocoded twins folder to read as it is (default: train.twins, where "
                                              "the twins the corpus lacks are made first, as `aivoice twins` makes them)")
    p.add_argument("--no-twins", action="store_true", help="train without vocoded twins")
    p.add_argument("--lso", type=int, default=0, metavar="K",
                   help="first evaluate the recipe leave-sources-out with K folds and tag the version with the figures")
    p.add_argument("--seeds", type=int, default=1, help="with --lso: training seeds")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train in N processes under torchrun (DistributedDataParallel: gloo on CPU, NCCL on GPUs)")
    p.set_defaults(func=_cmd_bootstrap)

    p = sub.add_parser("evaluate", help="leave-sources-out evaluation of the bootstrap recipe (K fold models per seed)")
    p.add_argument("--leave-sources-out", type=int, required=True, metavar="K", help="number of folds of whole sources")
    p.add_argument("--corpus", type=Path, help="corpus folder (default: the store, ingest.store)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (train.seed, +1, ...)")
    p.add_argument("--twins", type=Path, help="vocoded twins folder to read as it is (default: train.twins, where "
                                              "the twins the corpus lacks are made first)")
    p.add_argument("--no-twins", action="store_true", help="evaluate the recipe without vocoded twins")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("audit-corpus", help="shortcut audit: can recording-chain features alone tell the labels apart?")
    p.add_argument("dir", type=Path)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--report", type=Path, default=Path("reports/audit.json"))
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("twins", help="resynthesise every human training clip through the vocoders of twins.vocoders (AI twins)")
    p.add_argument("--corpus", type=Path, help="corpus folder (default: the store, ingest.store)")
    p.add_argument("--out", type=Path, help="twins folder (default: twins.out)")
    p.set_defaults(func=_cmd_twins)

    p = sub.add_parser("import-checkpoint", help="adopt an existing ResNet18 multitask state_dict")
    p.add_argument("file", type=Path)
    p.add_argument("--languages", help="comma-separated names of the language head's classes, in order")
    p.add_argument("--out", type=Path, help="where to write the adopted checkpoint")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("ingest", help="validate and copy audio into the DVC-tracked store (re-ingesting is a no-op)")
    p.add_argument("paths", nargs="*", type=Path, help="files or folders (recursive); never moved or modified")
    p.add_argument("--label", choices=("ai", "human"))
    p.add_argument("--generator", help="the TTS/voice-cloning system ('human' for human speech)")
    p.add_argument("--speaker", default="unknown")
    p.add_argument("--language", default="unknown")
    p.add_argument("--source", help="recording chain / origin (default: folder prefix before __, else the generator)")
    p.add_argument("--corpus", type=Path, help="ingest a labelled corpus folder (MANIFEST.csv or human/ and ai/)")
    p.add_argument("--split", choices=("train", "test"), help="fix the split (default: drawn per file by hash)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("promote", help="make a validated version champion (default: the challenger)")
    p.add_argument("version", nargs="?", type=int)
    p.add_argument("--reason", default="", help="why (required with --force)")
    p.add_argument("--force", action="store_true", help="promote a version whose gates did not pass (recorded)")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("rollback", help="point champion back at previous-champion (or --to VERSION)")
    p.add_argument("--to", type=int)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("models", help="registered versions, aliases, key metrics, gates and promotion history")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("report", help="rebuild a version's report (HTML with embedded pictures, PNGs) from its MLflow run")
    p.add_argument("version", type=int)
    p.add_argument("--out", type=Path, help="folder for report.html and plots/ (default: reports/versions/v<VERSION>)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("gc", help="remove local checkpoint copies of old unaliased versions and unused DVC cache "
                       "(registry versions and aliased models are never deleted)")
    p.add_argument("--keep", type=int, help="newest unaliased versions to keep (default: storage.keep_candidates)")
    p.add_argument("--no-dvc", action="store_true", help="leave the DVC cache alone (no `dvc gc -w`)")
    p.add_argument("--no-archive", action="store_true", help="leave refused candidates' MLflow artifacts in place "
                   "(default: moved into storage.archive_dir)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.set_defaults(func=_cmd_gc)

    p = sub.add_parser("restore", help="put an archived version's artifacts back into MLflow (from its tarball)")
    p.add_argument("version", type=int)
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("export-champion", help="write the champion's checkpoint to a file (the DVC pipeline's production model)")
    p.add_argument("path", nargs="?", default="models/production.pt", type=Path)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="HTTP service scoring with @champion (POST /detect, GET /health, GET /model)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("ui", help="MLflow UI on the tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--hook-url", help="where champion moves are sent (default http://<serve.host>:<serve.port>/hooks/mlflow)")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("webhook", help="register the MLflow webhook that sends champion moves to aivoice serve")
    p.add_argument("action", choices=("register",))
    p.add_argument("--url", required=True, help="the service's hook, e.g. http://detector:8000/hooks/mlflow")
    p.add_argument("--tracking-uri", help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd_webhook)

    p = sub.add_parser("retrain", help="the retrain flow: export champion, ingest..validate via DVC, gated promotion")
    p.add_argument("--promote", choices=("auto", "manual"), help="override registry.promotion")
    p.add_argument("--reason", default="retrain flow: validation gates passed")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("monitor", help="the monitor flow: score traffic with champion, log drift, queue clips for review")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--review-count", type=int, default=20)
    p.set_defaults(func=_cmd_monitor)

    p = sub.add_parser("schedule", help="deploy the retrain flow on a cron schedule to a Prefect work pool")
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * 1" (Mondays 03:00 UTC)')
    p.add_argument("--name", default="scheduled")
    p.add_argument("--pool", default="aivoice-process")
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("remote", help="the DVC remote holding the store and models: add, list, push, pull (pull: only outputs missing here)")
    p.add_argument("action", choices=("add", "list", "push", "pull"))
    p.add_argument("name", nargs="?", help="remote name (add; push/pull: default remote when omitted)")
    p.add_argument("url", nargs="?", help="a path, ssh://user@host[:port]/path, s3://... (add)")
    p.add_argument("--keyfile", help="SSH private key, stored in .dvc/config.local (add)")
    p.add_argument("--user", help="SSH user, stored in .dvc/config.local (add)")
    p.add_argument("--no-default", action="store_true", help="do not make it the default remote (add)")
    p.set_defaults(func=_cmd_remote)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    try:
        params = load_params(args.params)
        if args.command not in _NO_COMPUTE:
            apply_threads(params)   # compute.threads, before any model is loaded
        return args.func(args, params)
    except _user_errors() as err:
        log.error("%s", err)
        return 2


# errors a command reports in one line (exit 2), by module: looked up only in the modules the command
# imported (one it never imported cannot have raised), so that start-up does not import them all (the
# registry alone imports mlflow: ~2 s)
_USER_ERRORS = {"pipeline.core.data": "CorpusError", "pipeline.core.model": "CheckpointError",
                "pipeline.io.registry": "RegistryError", "pipeline.io.disk": "DiskSpaceError",
                "pipeline.io.archive": "ArchiveError"}


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ParamsError, FileExistsError) + tuple(getattr(sys.modules[m], name) for m, name in _USER_ERRORS.items()
                                                  if m in sys.modules)


if __name__ == "__main__":
    sys.exit(main())
