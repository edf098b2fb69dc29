"""Validation: the candidate AND the production model on the same held-out data, and the gates.

Held-out data: the store's `test` split (humans never trained on, earlier AI generators) and the new
generator's files. The candidate's threshold was calibrated on the test humans: on all of them, and its
human FPR is then judged cross-fitted by speaker (each part at a threshold calibrated on the others,
pipeline.training.calibration.crossfit_fpr); or on a part of them (`finetune.calibration_folds` 0),
which is then left out here. The candidate is
judged on the new files it trained on leave-one-file-out (each scored by a candidate made without it,
at that candidate's own calibrated threshold: pipeline.training.finetune), and on the new generator's
test-split files (never trained on) directly; production scores them all directly. Every rate carries its count and 95 % Wilson interval.

The verdict is `passed`, `failed`, or `insufficient evidence` (fewer new files or calibration humans
than the gates need: it says what is missing). Candidate and production are compared at the same human
false-positive rate on the test humans (the no-forgetting gates at each `compare_at_fpr`, 1 %, 5 % and
10 % by default, and the table at `operating_points`), never each at its own threshold. The EER is
reported for both; it is not gated by default, because each model's EER sits at its own human FPR.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.config import GatesConfig, Params
from pipeline.core.data import Clip, CorpusError, check_two_classes, load_clips, read_corpus
from pipeline.core.metrics import (EARLIER_GATE, at_fpr, best_end, compute_eer, least_trials, rate, recall_at_fpr,
                                   threshold_at_fpr)
from pipeline.core.model import AI_LABEL, Detector
from pipeline.core.scoring import score_model
from pipeline.progress import progress
from pipeline.training.calibration import crossfit_fpr
from pipeline.training.evaluate import evaluate
from pipeline.training.forked import fork_map, forked_workers

PASSED, FAILED, INSUFFICIENT = "passed", "failed", "insufficient evidence"


def held_out_clips(store: Path, new_generators: set[str], calibration: set[str] = frozenset()) -> tuple[list[Clip], list[Clip]]:
    """(test split without the new generators and without the humans the threshold was calibrated on,
    the new generators' clips)."""
    clips = read_corpus(store)
    test = [c for c in clips if c.split == "test" and c.generator not in new_generators and c.sha256 not in calibration]
    new = [c for c in clips if c.label == AI_LABEL and c.generator in new_generators]
    check_two_classes(test, f"the test split of {store}")
    if not new:
        raise CorpusError(f"{store}: no clips of the new generator(s) {', '.join(sorted(new_generators))}")
    return test, new


def gate_clips(store: Path, finetune_report: dict) -> tuple[list[Clip], list[Clip]]:
    """held_out_clips for this fine-tuning report: the humans its threshold was calibrated on are left
    out, unless the calibration is judged cross-fitted (calibration mode "crossfit")."""
    calibration = finetune_report["calibration"]
    crossfit = calibration.get("mode") == "crossfit"
    return held_out_clips(store, set(finetune_report["new_generators"]),
                          set() if crossfit else set(calibration.get("clips", [])))


def gate_data_key(test: list[Clip], new: list[Clip]) -> str:
    """Identity of the data a verdict rests on: candidates judged on the same key are retries."""
    ids = sorted(c.sha256 for c in test) + ["new"] + sorted(c.sha256 for c in new)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def score_clips(model: Detector, clips: list[Clip], params: Params) -> tuple[list[Clip], list[float], list]:
    """Scores of the clips that decode (others are reported and left out); also language/speaker outputs."""
    loaded = load_clips(clips, params)
    results = score_model(model, progress([it.wave for it in loaded], desc="score", unit="clip"), params)
    return [it.clip for it in loaded], [r.ai_score for r in results], results


def head_accuracy(clips: list[Clip], results: list, languages: tuple[str, ...]) -> dict[str, float]:
    """Accuracy of the language head (clips of a language it knows) and the speakers head (all clips);
    1.0 for a head with no clip to check."""
    lang = [r.language == c.language for c, r in zip(clips, results) if c.language in languages]
    spk = [(r.speakers == "several") == (c.n_speakers > 1) for c, r in zip(clips, results)]
    return {"language": float(np.mean(lang)) if lang else 1.0, "speakers": float(np.mean(spk)) if spk else 1.0}


def frozen_parts_unchanged(candidate: Detector, production: Detector, trained: str) -> dict[str, bool]:
    """Bit-identity of what the recipe must not touch (`trained` as in the fine-tuning report)."""
    cand, prod = candidate.state_dict(), production.state_dict()
    same = lambda keep: all(torch.equal(cand[k], prod[k]) for k in prod if keep(k))
    checks = {"heads.language": same(lambda k: k.startswith("heads.language")),
              "heads.speakers": same(lambda k: k.startswith("heads.speakers"))}
    if "layer4" in trained:   # the ai head's own layer4 trained; everything the other heads read is production's
        checks["trunk"] = same(lambda k: k.startswith("trunk."))
    elif "layer1" in trained:
        checks["trunk (layer2..layer4)"] = same(lambda k: k.startswith(("trunk.layer2", "trunk.layer3", "trunk.layer4",
                                                                        "ai_layer4.")))
    else:
        checks["trunk"] = same(lambda k: k.startswith(("trunk.", "ai_layer4.")))
    if "cosine" in trained:
        checks["heads.ai"] = same(lambda k: k.startswith("heads.ai"))
    return checks


def operating_points(humans: np.ndarray, new: np.ndarray, earlier_ai: np.ndarray, fprs: tuple[float, ...]) -> list[dict]:
    """Recall on the new generator and on earlier AI at thresholds that let fpr of these humans through."""
    rows = []
    for fpr in fprs:
        thr = threshold_at_fpr(humans, fpr)
        rows.append({"human_fpr": fpr, "threshold": thr, "new_recall": float((new >= thr).mean()) if len(new) else None,
                     "earlier_ai_recall": float((earlier_ai >= thr).mean()) if len(earlier_ai) else None})
    return rows


def earlier_gate(fpr: float) -> str:
    """The no-forgetting gate's name at one human FPR, as the metrics name that operating point."""
    return f"{EARLIER_GATE}_{at_fpr(fpr)}"


def judge(cand: dict, prod: dict, frozen: dict[str, bool], evidence: dict, tries: int, gates: GatesConfig) -> dict:
    """Each gate's value, interval, limit and outcome; the verdict's status and reasons.
    cand/prod hold eer, fpr and new_recall (rates with intervals), earlier_at_fpr (recall on earlier AI
    at each human FPR of gates.compare_at_fpr, the same for both) and head_accuracy."""
    missing = []
    if evidence["new_files"] < gates.min_new_files:
        missing.append(f"{evidence['new_files']} new file(s) held out, need >= {gates.min_new_files} "
                       "(ingest more clips of the new generator)")
    if evidence["calibration_humans"] < gates.min_calibration_humans:
        missing.append(f"threshold calibrated on {evidence['calibration_humans']} humans, need >= "
                       f"{gates.min_calibration_humans} (ingest more human speech)")
    if "unavailable" in cand["fpr"]:
        missing.append(f"no out-of-sample human FPR: {cand['fpr']['unavailable']} (ingest test-split human speech "
                       "of more speakers, or set finetune.calibration_folds: 0)")
    for gate, key, limit, upper in (("human_fpr", "fpr", gates.max_human_fpr, True),
                                    ("new_recall", "new_recall", gates.min_new_recall, False)):
        n, need = cand[key]["n"], least_trials(limit, upper)
        if gate in gates.pessimistic and "unavailable" not in cand[key] and need and 0 < n < need:
            best = best_end(n, upper)
            missing.append(f"{n} humans judge the human FPR, and with none flagged its 95 % upper end is still "
                           f"{best:.3f}, over {limit}: need >= {need} (ingest test-split human speech)" if upper else
                           f"{n} new files judge the recall, and with all caught its 95 % lower end is still {best:.3f}, "
                           f"under {limit}: need >= {need} (ingest more clips, or gate the estimate: "
                           "validate.gates.pessimistic)")
    end = lambda r, name, high: (r["high"] if high else r["low"]) if name in gates.pessimistic else r["value"]
    fpr_used = end(cand["fpr"], "human_fpr", True)
    recall_used = end(cand["new_recall"], "new_recall", False)
    results = {
        "new_generator_recall": (recall_used, gates.min_new_recall, recall_used >= gates.min_new_recall, ">=", cand["new_recall"]),
        "human_fpr": (fpr_used, gates.max_human_fpr, fpr_used <= gates.max_human_fpr, "<=", cand["fpr"]),
    } | {earlier_gate(fpr): (cand["earlier_at_fpr"][fpr], prod["earlier_at_fpr"][fpr] - gates.max_recall_drop,
                             cand["earlier_at_fpr"][fpr] >= prod["earlier_at_fpr"][fpr] - gates.max_recall_drop, ">=", None)
         for fpr in gates.compare_at_fpr}
    eer_slack = None
    if gates.max_eer_increase is not None:
        n_small = min(evidence.get("test_ai", 0), evidence.get("test_humans", 0))
        eer_slack = max(gates.max_eer_increase, 1 / n_small) if gates.eer_step_floor and n_small else gates.max_eer_increase
        results["eer_vs_production"] = (cand["eer"], prod["eer"] + eer_slack, cand["eer"] <= prod["eer"] + eer_slack, "<=", None)
    results |= {f"{head}_accuracy_vs_production": (acc, prod["head_accuracy"][head] - gates.max_head_accuracy_drop,
                                                   acc >= prod["head_accuracy"][head] - gates.max_head_accuracy_drop, ">=", None)
                for head, acc in sorted(cand["head_accuracy"].items())}
    if gates.max_tries_per_split:
        results["tries_on_gate_data"] = (tries, gates.max_tries_per_split, tries <= gates.max_tries_per_split, "<=", None)
    out = {}
    for name, (v, lim, ok, op, r) in results.items():
        out[name] = {"value": round(float(v), 4), "limit": round(float(lim), 4), "passed": bool(ok), "rule": f"{op} {lim:.4f}"}
        if r is not None:
            out[name] |= {"estimate": round(r["value"], 4), "interval": [round(r["low"], 4), round(r["high"], 4)],
                          "count": f"{r['k']}/{r['n']}", "gated_on": "pessimistic end" if v != r["value"] else "estimate"}
    if eer_slack is not None:
        out["eer_vs_production"]["tolerance"] = (f"{eer_slack:.4f}: one clip of {n_small}" if eer_slack > gates.max_eer_increase
                                                 else f"{eer_slack:.4f}: max_eer_increase")
    if gates.frozen_heads_unchanged:
        out["frozen_weights_unchanged"] = {"value": frozen, "limit": "bit-identical", "passed": all(frozen.values()),
                                           "rule": "frozen parts bit-identical"}
    reasons = [f"{name}: {g['value']} fails {g['rule']}" for name, g in out.items() if not g["passed"]]
    status = INSUFFICIENT if missing else (FAILED if reasons else PASSED)
    return {"status": status, "passed": status == PASSED, "reasons": missing + reasons, "missing_evidence": missing,
            "gates": out}


def validate(candidate: Detector, production: Detector, finetune_report: dict, params: Params, earlier_tries: int = 0) -> dict:
    """Metrics of both models on the same held-out data, the operating-point table, the before/after
    table, and the verdict. `earlier_tries`: candidates already judged on this gate data."""
    gates = params.validation.gates
    calibration = finetune_report["calibration"]
    crossfit = calibration.get("mode") == "crossfit"
    test, new = gate_clips(Path(params.ingest.store), finetune_report)
    lofo = finetune_report["lofo"]["files"]
    out = {}
    # both models on the test split, side by side (a forked worker scores production)
    on_test = fork_map(lambda m: score_clips(m, test, params), [candidate, production], forked_workers(params, "cpu"))
    for (name, model), (kept, scores, results) in zip((("candidate", candidate), ("production", production)), on_test):
        thr = model.meta.threshold
        if name == "candidate":   # each new file as scored by a candidate that never trained on it
            held = [c for c in new if c.sha256 not in lofo and c.split == "test"]
            new_kept, held_scores, _ = score_clips(model, held, params)
            new_kept = [c for c in new if c.sha256 in lofo] + new_kept
            new_scores = [lofo[c.sha256]["score"] for c in new_kept if c.sha256 in lofo] + held_scores
            caught = [lofo[c.sha256]["caught"] for c in new_kept if c.sha256 in lofo] + [s >= thr for s in held_scores]
            held_out = dict(zip([c.sha256 for c in new_kept], new_scores))
        else:
            new_kept, new_scores, _ = score_clips(model, new, params)
            caught = [s >= thr for s in new_scores]
        s, y = np.array(scores), np.array([c.label for c in kept])
        humans, earlier = s[y != AI_LABEL], s[y == AI_LABEL]
        tables = evaluate(kept + new_kept, scores + new_scores, thr)
        fpr = rate(int((humans >= thr).sum()), len(humans))
        if name == "candidate" and crossfit:   # the served threshold saw these humans: judge the calibration out of sample
            h_clips = [c for c in kept if c.label != AI_LABEL]
            try:
                fpr = crossfit_fpr(h_clips, humans.tolist(), calibration["target_fpr"], calibration["folds"],
                                   calibration["seed"]) | {"in_sample": fpr}
            except ValueError as err:   # too few speakers: the in-sample rate is shown, the verdict lacks evidence
                fpr = fpr | {"unavailable": str(err)}
        out[name] = {
            "threshold": thr, "eer": compute_eer(s, y)[0], "auc": tables["overall"]["auc"],
            "earlier_at_fpr": {fpr: recall_at_fpr(s, y, fpr) for fpr in gates.compare_at_fpr},
            "fpr": fpr, "recall": rate(int((earlier >= thr).sum()), len(earlier)),
            "new_recall": rate(int(sum(caught)), len(caught)), "n_test": len(kept), "n_new": len(new_kept),
            "operating_points": operating_points(humans, np.array(new_scores), earlier, gates.operating_points),
            "tables": tables, "scores": scores, "new_scores": new_scores, "labels": [c.label for c in kept],
            "sources": [c.source for c in kept], "generators": [c.generator for c in kept],
            "new_generators": [c.generator for c in new_kept],
            "language": [r.language for r in results], "speakers": [r.speakers for r in results],
            "head_accuracy": head_accuracy(kept, results, model.meta.languages),
        }
    cand, prod = out["candidate"], out["production"]
    agree = {h: float(np.mean([a == b for a, b in zip(cand[h], prod[h])])) for h in ("language", "speakers")}
    frozen = frozen_parts_unchanged(candidate, production, finetune_report["trained"])
    evidence = {"new_files": cand["n_new"], "calibration_humans": calibration["n_humans"],
                "calibration_sources": calibration.get("n_sources"), "test_humans": cand["fpr"]["n"],
                "human_fpr_method": ("none: " + cand["fpr"]["unavailable"] if "unavailable" in cand["fpr"] else
                                     f"{cand['fpr']['folds']}-fold cross-fitted by speaker (the served threshold is "
                                     "calibrated on all test humans)" if crossfit else
                                     "at the served threshold, on test humans it was not calibrated on"),
                "test_ai": cand["recall"]["n"]}
    key = gate_data_key(test, new)
    verdict = judge(cand, prod, frozen, evidence, earlier_tries + 1, gates)
    _, seen, _ = score_clips(candidate, new, params)
    before_after = [{"file": c.sha256[:16], "generator": c.generator, "production": round(p, 4),
                     "candidate": round(s, 4), "trained_on_it": c.split != "test",   # test-split files never are
                     "candidate_held_out": round(held_out[c.sha256], 4) if c.sha256 in held_out else None}
                    for c, p, s in zip(new, prod["new_scores"], seen)]
    n_test_new = cand["n_new"] - len([f for f in held_out if f in lofo])
    method = finetune_report["lofo"]["method"] + (f"; {n_test_new} test-split file(s) scored by the candidate"
                                                   if n_test_new else "")
    verdict |= {"threshold": cand["threshold"], "lofo_method": method,
                "recipe": finetune_report.get("recipe"), "evidence": evidence, "gate_data": key,
                "tries_on_gate_data": earlier_tries + 1, "head_agreement": agree, "before_after": before_after,
                "operating_points": {"candidate": cand["operating_points"], "production": prod["operating_points"]}}
    return {"models": out, "verdict": verdict}
