"""Validation: the candidate AND the production model on the same held-out data, and the gates.

Held-out data: the store's `test` split (human speech never trained on, earlier AI generators)
plus the new generator's files, which the candidate is scored on leave-one-file-out (from the
fine-tuning report) and the production model directly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import GatesConfig, Params
from pipeline.core.data import Clip, CorpusError, check_two_classes, read_corpus
from pipeline.training.evaluate import evaluate
from pipeline.core.model import AI_LABEL, Detector
from pipeline.core.scoring import Scorer, score_arrays
from pipeline.training.train import load_clips


def held_out_clips(store: Path, new_generators: set[str]) -> tuple[list[Clip], list[Clip]]:
    """(test split without the new generators, the new generators' clips)."""
    clips = read_corpus(store)
    test = [c for c in clips if c.split == "test" and c.generator not in new_generators]
    new = [c for c in clips if c.label == AI_LABEL and c.generator in new_generators]
    check_two_classes(test, f"the test split of {store}")
    if not new:
        raise CorpusError(f"{store}: no clips of the new generator(s) {', '.join(sorted(new_generators))}")
    return test, new


def score_clips(model: Detector, clips: list[Clip], params: Params) -> tuple[list[Clip], list[float], list]:
    """Scores of the clips that decode (others are reported and left out); also language/speaker outputs."""
    loaded = load_clips(clips, params)
    results = score_arrays(Scorer(model, params.audio, params.features, "cpu"), [it.wave for it in loaded],
                           params.audio, params.detect)
    return [it.clip for it in loaded], [r.ai_score for r in results], results


def head_accuracy(clips: list[Clip], results: list, languages: tuple[str, ...]) -> dict[str, float]:
    """Accuracy of the language head (clips of a language it knows) and the speakers head (all clips);
    1.0 for a head with no clip to check."""
    lang = [r.language == c.language for c, r in zip(clips, results) if c.language in languages]
    spk = [(r.speakers == "several") == (c.n_speakers > 1) for c, r in zip(clips, results)]
    return {"language": float(np.mean(lang)) if lang else 1.0, "speakers": float(np.mean(spk)) if spk else 1.0}


def frozen_parts_unchanged(candidate: Detector, production: Detector, trunk_trained: bool) -> dict[str, bool]:
    """Bit-identity of what fine-tuning must not touch."""
    cand, prod = candidate.state_dict(), production.state_dict()
    same = lambda prefix: all(torch.equal(cand[k], prod[k]) for k in prod if k.startswith(prefix))
    checks = {"heads.language": same("heads.language"), "heads.speakers": same("heads.speakers")}
    if trunk_trained:
        checks["trunk (except layer4)"] = all(torch.equal(cand[k], prod[k]) for k in prod
                                              if k.startswith("trunk.") and not k.startswith("trunk.layer4"))
    else:
        checks["trunk"] = same("trunk.")
    return checks


def apply_gates(cand: dict, prod: dict, frozen: dict[str, bool], gates: GatesConfig) -> dict:
    """Each gate's value, limit and pass/fail; the verdict passes only when all do.
    cand/prod hold eer, fpr, new_recall and head_accuracy ({head: accuracy on held-out clips})."""
    results = {
        "new_generator_recall": (cand["new_recall"], gates.min_new_recall, cand["new_recall"] >= gates.min_new_recall, ">="),
        "human_fpr": (cand["fpr"], gates.max_human_fpr, cand["fpr"] <= gates.max_human_fpr, "<="),
        "human_fpr_vs_production": (cand["fpr"], prod["fpr"] + gates.max_fpr_increase,
                                    cand["fpr"] <= prod["fpr"] + gates.max_fpr_increase, "<="),
        "eer_vs_production": (cand["eer"], prod["eer"] + gates.max_eer_increase,
                              cand["eer"] <= prod["eer"] + gates.max_eer_increase, "<="),
    } | {f"{head}_accuracy_vs_production": (acc, prod["head_accuracy"][head] - gates.max_head_accuracy_drop,
                                            acc >= prod["head_accuracy"][head] - gates.max_head_accuracy_drop, ">=")
         for head, acc in sorted(cand["head_accuracy"].items())}
    out = {name: {"value": round(v, 4), "limit": round(lim, 4), "passed": bool(ok), "rule": f"{op} {lim:.4f}"}
           for name, (v, lim, ok, op) in results.items()}
    if gates.frozen_heads_unchanged:
        out["frozen_weights_unchanged"] = {"value": frozen, "limit": "bit-identical", "passed": all(frozen.values()),
                                           "rule": "frozen parts bit-identical"}
    reasons = [f"{name}: {g['value']} fails {g['rule']}" for name, g in out.items() if not g["passed"]]
    return {"passed": not reasons, "reasons": reasons, "gates": out}


def validate(candidate: Detector, production: Detector, finetune_report: dict, params: Params) -> dict:
    """Metrics of both models on the same held-out data, the before/after table, and the verdict."""
    new_gens = set(finetune_report["new_generators"])
    test, new = held_out_clips(Path(params.ingest.store), new_gens)
    lofo = finetune_report["lofo"]["scores"]
    out = {}
    for name, model in (("candidate", candidate), ("production", production)):
        kept, scores, results = score_clips(model, test, params)
        thr = model.meta.threshold
        if name == "candidate":
            new_scores = [lofo[c.sha256] for c in new if c.sha256 in lofo]
            new_kept = [c for c in new if c.sha256 in lofo]
        else:
            new_kept, new_scores, _ = score_clips(model, new, params)
        tables = evaluate(kept + new_kept, scores + new_scores, thr)
        test_only = evaluate(kept, scores, thr)["overall"]
        out[name] = {
            "threshold": thr, "eer": test_only["eer"], "auc": test_only["auc"], "fpr": test_only["fpr"],
            "recall": test_only["recall"], "new_recall": float(np.mean(np.array(new_scores) >= thr)),
            "n_test": len(kept), "n_new": len(new_kept), "tables": tables, "scores": scores, "new_scores": new_scores,
            "language": [r.language for r in results], "speakers": [r.speakers for r in results],
            "labels": [c.label for c in kept], "head_accuracy": head_accuracy(kept, results, model.meta.languages),
        }
    cand, prod = out["candidate"], out["production"]
    agree = {h: float(np.mean([a == b for a, b in zip(cand[h], prod[h])])) for h in ("language", "speakers")}
    frozen = frozen_parts_unchanged(candidate, production, finetune_report["trained"] != "ai head")
    verdict = apply_gates(cand, prod, frozen, params.validation.gates)
    _, seen, _ = score_clips(candidate, new, params)
    before_after = [{"file": c.sha256[:16], "generator": c.generator, "production": round(p, 4),
                     "candidate_trained_on_it": round(s, 4), "candidate_held_out": round(lofo.get(c.sha256, float("nan")), 4)}
                    for c, p, s in zip(new, prod["new_scores"], seen)]
    verdict |= {"threshold": cand["threshold"], "lofo_method": finetune_report["lofo"]["method"],
                "head_agreement": agree, "before_after": before_after}
    return {"models": out, "verdict": verdict}
