"""Metrics on hand-built scores, where the right answer is known."""
import math

import numpy as np
import pytest

from pipeline.core.metrics import compute_eer, rate, rates_at, recall_at_fpr, roc_auc, summarize, threshold_at_fpr, wilson


def test_perfect_separation_has_zero_eer_and_unit_auc():
    scores, labels = [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]
    eer, thr = compute_eer(scores, labels)
    assert eer == 0.0, "separable scores must give EER 0"
    assert 0.2 < thr <= 0.8, f"EER threshold {thr} must lie between the classes"
    assert roc_auc(scores, labels) == 1.0, "separable scores must give AUC 1"


def test_inverted_scores_have_full_error():
    scores, labels = [0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]
    assert compute_eer(scores, labels)[0] == 1.0, "every clip on the wrong side means EER 1"
    assert roc_auc(scores, labels) == 0.0, "inverted ranking means AUC 0"


def test_eer_on_known_overlap():
    # humans 0.1 0.2 0.3 0.6 ; AI 0.4 0.7 0.8 0.9: at threshold 0.6 one human passes (FPR 1/4) and
    # one AI is missed (FNR 1/4), so EER = 0.25
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    eer, thr = compute_eer(scores, labels)
    assert eer == pytest.approx(0.25), f"expected EER 0.25, got {eer}"
    assert roc_auc(scores, labels) == pytest.approx(15 / 16), "one AI-human pair out of 16 is misordered"


def test_ties_count_half_in_auc():
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5, "a tie between classes counts half"


def test_rates_at_threshold():
    r = rates_at([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1], 0.5)
    assert r["fpr"] == 0.5 and r["fnr"] == 0.5 and r["recall"] == 0.5, f"wrong rates {r}"
    assert r["accuracy"] == 0.5, "two of four clips are right"
    assert rates_at([0.5], [1], 0.5)["recall"] == 1.0, "a score equal to the threshold is AI"


def test_threshold_at_fpr_bounds_false_positives():
    human = np.linspace(0, 1, 101)
    for target in (0.0, 0.01, 0.05, 0.2):
        thr = threshold_at_fpr(human, target)
        fpr = float((human >= thr).mean())
        assert fpr <= target + 1e-12, f"target {target}: threshold {thr} lets {fpr} through"
        assert fpr >= target - 0.011, f"target {target}: threshold {thr} is needlessly strict ({fpr})"


def test_one_class_and_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="both"):
        compute_eer([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="line up"):
        compute_eer([0.1, 0.2, 0.3], [0, 1])
    s = summarize([0.9, 0.8], [1, 1], 0.5)
    assert math.isnan(s["eer"]) and s["recall"] == 1.0, "one-class summary keeps recall, EER is undefined"


def test_eer_is_interpolated_between_roc_points():
    # humans 0.1 0.5 ; AI 0.4 0.9: FPR/FNR cross between two ROC points, at 0.5 (not at a point's rates)
    eer, _ = compute_eer([0.1, 0.5, 0.4, 0.9], [0, 0, 1, 1])
    assert eer == pytest.approx(0.5), f"the crossing of the two error rates, got {eer}"
    eer, _ = compute_eer([0.1, 0.2, 0.3, 0.9, 0.4, 0.8], [0, 0, 0, 0, 1, 1])
    assert 0.25 <= eer <= 0.5, f"between the two nearest points' errors, got {eer}"


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(0, 73)
    assert lo == 0 and hi == pytest.approx(0.05, abs=0.001), "0 of 73 humans: the upper end is just 5 %"
    lo, hi = wilson(2, 2)
    assert lo == pytest.approx(0.342, abs=0.001) and hi == 1.0, "2 of 2 new files: the interval starts at 0.34"
    r = rate(9, 200)
    assert r["value"] == 0.045 and r["low"] < 0.045 < r["high"] and (r["k"], r["n"]) == (9, 200), r
    assert wilson(0, 0) == (0.0, 1.0), "no evidence: the whole interval"


def test_recall_at_fpr_uses_the_humans_of_the_same_scores():
    humans, ai = np.linspace(0, 1, 100), np.array([0.5, 0.95, 0.999])
    s, y = np.r_[humans, ai], np.r_[np.zeros(100), np.ones(3)]
    assert recall_at_fpr(s, y, 0.01) == pytest.approx(1 / 3), "only the AI clip above the top 1 % of humans"
    assert recall_at_fpr(s, y, 0.10) == pytest.approx(2 / 3), "at 10 % FPR the 0.95 clip is caught too"


def test_eer_matches_the_crossing_of_the_error_rates_on_random_scores():
    # given scores with many ties (rounded), where the brute-force error rates at every threshold are easy
    rng = np.random.default_rng(0)
    for trial in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = (0, 1)
        s = np.round(rng.random(60) * 0.6 + 0.4 * y, 1)
        eer, thr = compute_eer(s, y)
        # then the EER lies between the two errors at the threshold it reports...
        fpr, fnr = (s[y == 0] >= thr).mean(), (s[y == 1] < thr).mean()
        assert min(fpr, fnr) - 1e-12 <= eer <= max(fpr, fnr) + 1e-12, f"trial {trial}: {eer} vs ({fpr}, {fnr}) at {thr}"
        # ...and no threshold has both errors below it
        grid = np.unique(np.r_[s, np.inf])
        both = [max((s[y == 0] >= t).mean(), (s[y == 1] < t).mean()) for t in grid]
        assert min(both) >= eer - 1e-12, f"trial {trial}: a threshold beats EER {eer}: max error {min(both)}"


def test_crossfit_judges_each_speaker_at_a_threshold_it_took_no_part_in():
    from pathlib import Path as P

    from pipeline.core.data import Clip
    from pipeline.training.calibration import crossfit_fpr

    # given: 40 humans of 10 speakers; speaker s9's clips score far above everyone else's
    clips = [Clip(P(f"/h/{i}.wav"), 0, "human", f"s{i % 10}", "en", "src") for i in range(40)]
    scores = [0.99 if c.speaker == "s9" else 0.1 for c in clips]
    r = crossfit_fpr(clips, scores, 0.0, folds=2, seed=0)
    # then: every human is judged once, by a threshold calibrated on the other part only
    assert r["n"] == 40 and sum(f["n"] for f in r["per_fold"]) == 40
    assert all(f["calibrated_on"] == 40 - f["n"] for f in r["per_fold"])
    # s9's 4 clips sit in one part: the other part's threshold (target 0: above its top score) lets them all through,
    # which calibrating and judging on the same humans (0 of 40 at or above the top score's threshold) would hide
    assert r["k"] == 4 and r["value"] == 0.1 and r["high"] > 0.1, r
    assert max(scores) < threshold_at_fpr(scores, 0.0), "in sample, nobody passes"
    with pytest.raises(ValueError, match="folds"):
        crossfit_fpr(clips, scores, 0.0, folds=1, seed=0)


def test_crossfit_uses_fewer_parts_when_the_speakers_cannot_fill_the_folds_asked():
    from pathlib import Path as P

    from pipeline.core.data import Clip
    from pipeline.training.calibration import crossfit_fpr

    rng = np.random.default_rng(0)
    for n_speakers, expected in ((20, 5), (3, 3), (2, 2)):
        # given: 60 humans of n_speakers speakers, 5 folds asked
        clips = [Clip(P(f"/h/{i}.wav"), 0, "human", f"s{i % n_speakers}", "en", "src") for i in range(60)]
        scores = rng.uniform(size=60).tolist()
        r = crossfit_fpr(clips, scores, 0.05, folds=5, seed=1)
        # then: as many speaker-disjoint parts as the speakers allow, each human judged once by the others' threshold
        assert (r["folds"], r["folds_asked"]) == (expected, 5), r
        assert len(r["per_fold"]) == expected and sum(f["n"] for f in r["per_fold"]) == 60
        assert all(f["calibrated_on"] == 60 - f["n"] for f in r["per_fold"])
        assert r["k"] == sum(f["flagged"] for f in r["per_fold"])
