"""Retraining stages on real audio: ingest, augment, finetune, validate gates."""
import copy
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.config import GatesConfig
from pipeline.core.data import Clip, CorpusError, read_corpus
from pipeline.core.metrics import rate
from pipeline.core.model import Detector, load_checkpoint, new_model, save_checkpoint
from pipeline.core.scoring import scoring_settings
from pipeline.io.store import ClipInfo, from_corpus, ingest, read_manifest
from pipeline.stages import augment as augment_stage
from pipeline.training import finetune as finetune_module
from pipeline.training.finetune import Adapter, finetune, loss_weights, speaker_parts, teacher_outputs
from pipeline.training.net import TrainingNet
from pipeline.training.one_class import one_class_meta
from pipeline.training.report import describe_candidate
from pipeline.training.validate import INSUFFICIENT, frozen_parts_unchanged, head_accuracy, judge


def _fingerprint(paths):
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in paths}


def _ingest(items, params):
    return ingest(items, Path(params.ingest.store), Path(params.ingest.quarantine), params.audio, params.ingest)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the working directory (params paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ingest_dedupes_quarantines_and_never_touches_the_originals(project, small_corpus, tiny_params, speech_like):
    # given real clips and two bad files among them
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    bad = project / "user" / "broken.wav"
    bad.parent.mkdir()
    bad.write_text("not audio")
    silent = project / "user" / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    before = _fingerprint(new + [bad, silent])
    info = ClipInfo(label="ai", generator="piper-joe")
    # when they are ingested
    report = _ingest([(p, info) for p in new + [bad, silent]], tiny_params)
    # then the good ones are stored by content, the bad ones quarantined with a reason, the rest goes on
    assert len(report.added) == 2, f"two good clips stored: {report.to_dict()}"
    assert {Path(r["file"]).name for r in report.rejected} == {"broken.wav", "silent.wav"}, "bad files are rejected"
    assert all(Path(r["quarantined_as"]).exists() for r in report.rejected), "rejects are kept in quarantine"
    assert any("silent" in r["reason"] for r in report.rejected), "the reason is recorded"
    rows = read_manifest(Path(tiny_params.ingest.store))
    for row in rows:
        stored = Path(tiny_params.ingest.store) / row["path"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"], "stored bytes match their hash"
        assert row["split"] in ("train", "test") and row["batch"], "split and batch are recorded"
    # and re-ingesting the same bytes is a no-op that says so
    again = _ingest([(p, info) for p in new], tiny_params)
    assert not again.added and len(again.duplicates) == 2, "same bytes twice are not stored twice"
    assert "already ingested" in again.duplicates[0], "the no-op is reported"
    assert len(read_manifest(Path(tiny_params.ingest.store))) == 2, "the manifest did not grow"
    assert _fingerprint(new + [bad, silent]) == before, "nothing the user gave is moved or modified"


def test_augment_stage_is_reproducible(project, small_corpus, tiny_params):
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new], tiny_params)
    first = augment_stage.run(tiny_params)
    out = Path(tiny_params.augment_stage.out)
    files = {p.name: p.read_bytes() for p in out.glob("*.wav")}
    assert first["copies"] == 2 * tiny_params.augment.copies, f"copies per new clip: {first}"
    for data in files.values():
        wave, sr = sf.read(__import__("io").BytesIO(data))
        assert sr == 24000 and len(wave) == 72000 and np.isfinite(wave).all(), "3 s at 24 kHz, finite"
    augment_stage.run(tiny_params)
    assert {p.name: p.read_bytes() for p in out.glob("*.wav")} == files, "same inputs and seed, same bytes"


def test_incoming_ai_clips_are_training_samples_and_humans_keep_the_hash_split(project, small_corpus, tiny_params):
    # given: the retrain's drop folder with six clips of a new voice and six human clips
    from pipeline.stages import ingest as ingest_stage

    incoming = Path(tiny_params.ingest.incoming)
    for i, p in enumerate(sorted(small_corpus.new_generator_dir.glob("*.wav"))[:6]):
        (incoming / "ai" / "piper-joe").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, incoming / "ai" / "piper-joe" / f"{i}.wav")
    humans = [p for p, info in from_corpus(small_corpus.root) if info.label == "human"][:12]
    for i, p in enumerate(humans):
        (incoming / "human").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, incoming / "human" / f"{i}{p.suffix}")
    # when: the ingest stage runs
    ingest_stage.run(tiny_params)
    rows = read_manifest(Path(tiny_params.ingest.store))
    # then: every AI clip is a training sample (judged leave-one-file-out), humans are split by hash
    assert {r["split"] for r in rows if r["label"] == "ai"} == {"train"}, "a hash split would hide new clips from training"
    assert {r["split"] for r in rows if r["label"] == "human"} == {"train", "test"}, "humans keep the hash split"


def test_test_split_clips_of_the_new_generator_are_never_trained_on(project, small_corpus, tiny_params):
    # given: two clips of a new voice for training and one ingested as held-out test data
    params = _with_recipe(tiny_params, "head")
    base = _store_with_new_samples(small_corpus, params)
    held = sorted(small_corpus.new_generator_dir.glob("*.wav"))[2]
    _ingest([(held, ClipInfo(label="ai", generator="piper-joe", split="test"))], params)
    sha = hashlib.sha256(Path(params.ingest.store, read_manifest(Path(params.ingest.store))[-1]["path"]).read_bytes()).hexdigest()
    # when: augment and finetune run
    augment_stage.run(params)
    index = (Path(params.augment_stage.out) / augment_stage.INDEX).read_text()
    candidate, report = finetune(base, params)
    # then: the test clip has no augmented copy and is not among the leave-one-file-out files
    assert sha not in index and sha not in report["lofo"]["files"], "a test-split clip is never trained on"
    assert len(report["lofo"]["files"]) == 2, report["lofo"]
    # and validate counts it as held-out evidence, scored by the candidate itself
    from pipeline.training.validate import validate

    candidate.meta = candidate.meta.__class__(**{**candidate.meta.__dict__, "threshold": report["calibration"]["threshold"]})
    verdict = validate(candidate, base, report, params)["verdict"]
    assert verdict["evidence"]["new_files"] == 3 and "1 test-split file" in verdict["lofo_method"], verdict["evidence"]
    row = next(r for r in verdict["before_after"] if r["file"] == sha[:16])
    assert row["candidate_held_out"] == row["candidate"] and row["trained_on_it"] is False, \
        "the candidate never trained on it: one score, and the row says so"
    assert all(r["trained_on_it"] for r in verdict["before_after"] if r["file"] != sha[:16])


def test_the_served_threshold_is_judged_on_humans_it_was_not_calibrated_on(project, small_corpus, tiny_params):
    from pipeline.training.validate import validate

    params = _with_recipe(tiny_params, "head")
    base = _store_with_new_samples(small_corpus, params)
    test_humans = {c.sha256 for c in read_corpus(Path(params.ingest.store)) if c.split == "test" and c.label == 0}
    for folds in (2, 0):
        # when: the threshold is calibrated on all test humans (cross-fitted gate), or on a part of them
        p = _with_recipe(params, "head", calibration_folds=folds)
        candidate, report = finetune(base, p)
        cal, fpr = report["calibration"], validate(candidate, base, report, p)["models"]["candidate"]["fpr"]
        if folds:
            # then: every test human is judged, each at a threshold calibrated on the other speakers
            assert cal["mode"] == "crossfit" and set(cal["clips"]) == test_humans, cal["mode"]
            assert fpr["n"] == len(test_humans) and fpr["folds"] == 2, fpr
            assert all(f["calibrated_on"] == fpr["n"] - f["n"] for f in fpr["per_fold"])
        else:
            # or only the humans the threshold never saw
            assert cal["mode"] == "holdout" and set(cal["clips"]) < test_humans
            assert fpr["n"] == len(test_humans - set(cal["clips"])) and "folds" not in fpr, fpr


def test_augment_never_copies_test_split_clips_of_the_new_generator(project, small_corpus, tiny_params):
    # given three clips of the new generator, one of them placed in the test split at ingest
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:3]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new[:2]], tiny_params)
    _ingest([(new[2], ClipInfo(label="ai", generator="piper-joe", split="test"))], tiny_params)
    test_sha = hashlib.sha256(new[2].read_bytes()).hexdigest()
    # when the augment stage makes the training copies
    out = augment_stage.run(tiny_params)
    # then the test-split clip has no copy: it is never trained on
    index = (Path(tiny_params.augment_stage.out) / augment_stage.INDEX).read_text()
    assert out["new_clips"] == 2 and test_sha not in index, f"test-split clip left out: {out}"
    # and with only test-split clips there is nothing to train on, which is said
    only_test = [r | {"split": "test"} for r in read_manifest(Path(tiny_params.ingest.store))]
    with pytest.raises(CorpusError, match="test split"):
        augment_stage.new_samples(only_test, ("piper-joe",))


def test_finetune_refuses_one_class(project, small_corpus, tiny_params):
    # given a store holding only AI clips (the production incident)
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new], tiny_params)
    augment_stage.run(tiny_params)
    model = new_model(["en"], tiny_params.audio, tiny_params.features, 8, 0.0)
    with pytest.raises(CorpusError, match="refused"):
        finetune(model, tiny_params)


def _store_with_new_samples(small_corpus, params, n_new=2):
    """The corpus and `n_new` new-generator clips stored, their copies augmented; a fresh narrow base model."""
    _ingest(from_corpus(small_corpus.root), params)
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:n_new]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new], params)
    augment_stage.run(params)
    torch.manual_seed(0)
    return new_model(["en"], params.audio, params.features, 8, 0.0).eval()


def _with_recipe(params, recipe, **more):
    return params.model_copy(update={"finetune": params.finetune.model_copy(update={"recipe": recipe} | more)})


def _with_workers(params, n):
    return params.model_copy(update={"compute": params.compute.model_copy(update={"batch_workers": n})})


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_head_only_finetune_leaves_frozen_weights_bit_identical(project, small_corpus, tiny_params):
    params = _with_recipe(tiny_params, "head")
    base = _store_with_new_samples(small_corpus, params)
    candidate, report = finetune(base, params)
    changed = _changed(base.state_dict(), candidate.state_dict())
    assert changed and all(k.startswith("heads.ai.") for k in changed), f"only the ai head may change: {changed}"
    assert report["lofo"]["method"] == "leave-one-file-out" and len(report["lofo"]["files"]) == 2, report["lofo"]
    assert all({"score", "threshold", "caught"} <= set(r) for r in report["lofo"]["files"].values()), \
        "each held-out file is scored at its own candidate's threshold"
    assert report["segments"]["human_replay"] > 0, "human replay is always part of fine-tuning"
    cal = report["calibration"]
    assert cal["n_humans"] > 0 and candidate.meta.threshold == cal["threshold"], "the threshold is calibrated and served"


def test_leave_one_file_out_never_trains_or_stops_on_the_held_out_file(project, small_corpus, tiny_params, monkeypatch):
    # given: a store with three new files (every fit in this process, where the spy sees it)
    params = _with_workers(_with_recipe(tiny_params, "head"), 0)
    base = _store_with_new_samples(small_corpus, params, n_new=3)
    seen = []
    real_fit = finetune_module.fit_candidate

    def spy(model, cached, data, train_mask, val_mask, params, device):
        seen.append({str(f) for f in data.seg.files[train_mask | val_mask] if f in data.generators})
        return real_fit(model, cached, data, train_mask, val_mask, params, device)

    monkeypatch.setattr(finetune_module, "fit_candidate", spy)
    # when: fine-tuning runs (the candidate, then one candidate per held-out file)
    _, report = finetune(base, params)
    files = set(report["lofo"]["files"])
    # then: the first fit sees every new file; each later one sees all but the file it will score
    assert len(seen) == 4 and seen[0] == files, f"candidate + 3 held-out fits: {seen}"
    assert sorted(map(frozenset, seen[1:]), key=sorted) == sorted((frozenset(files - {f}) for f in files), key=sorted), \
        "a held-out file's copies are in neither the training nor the early-stopping segments"


def test_forked_workers_give_the_same_candidate_threshold_estimates_and_verdict(project, small_corpus, tiny_params):
    from pipeline.training.validate import validate

    # given: a store with two new files and the default recipe
    params = _with_recipe(tiny_params, "last_block")
    base = _store_with_new_samples(small_corpus, params)
    # when: fine-tuning and validation run in this process alone, then with a forked worker (replay,
    # held-out fits; production's scores in validation), on one torch thread as in a worker
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, report_alone = finetune(copy.deepcopy(base), _with_workers(params, 0))
        shared, report_shared = finetune(copy.deepcopy(base), _with_workers(params, 1))
        judged = [json.dumps(validate(alone, base, json.loads(json.dumps(report_alone, default=str)), _with_workers(params, n)),
                             default=str, sort_keys=True) for n in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    # then: the same weights, threshold and leave-one-file-out estimates, to the bit
    assert finetune_module.forked_workers(_with_workers(params, 1), torch.device("cpu")) == 1, "a worker was forked"
    assert not _changed(alone.state_dict(), shared.state_dict()), "the candidate does not depend on the workers"
    assert report_alone["calibration"] == report_shared["calibration"], "the same threshold"
    assert report_alone["lofo"] == report_shared["lofo"] and len(report_alone["lofo"]["files"]) == 2, \
        "the same held-out estimates"
    assert report_alone["history"] == report_shared["history"]
    assert judged[0] == judged[1], "the same scores, gates and verdict"


def test_one_new_file_gives_no_held_out_estimate(project, small_corpus, tiny_params):
    params = _with_recipe(tiny_params, "prototype")
    base = _store_with_new_samples(small_corpus, params, n_new=1)
    _, report = finetune(base, params)
    assert report["lofo"]["files"] == {} and report["lofo"]["method"].startswith("none"), \
        "one file cannot be held out from itself: no estimate, not a fallback"


def test_prototype_recipe_adds_a_cosine_head_and_changes_nothing_else(project, small_corpus, tiny_params, tmp_path):
    params = _with_recipe(tiny_params, "prototype")
    base = _store_with_new_samples(small_corpus, params)
    candidate, report = finetune(base, params)
    before, after = base.state_dict(), candidate.state_dict()
    assert not _changed(before, {k: after[k] for k in before}), "trunk and every head stay bit-identical"
    assert candidate.cosine is not None and candidate.meta.cosine_head["generators"] == ["piper-joe"], \
        "the new generator became a prototype"
    x = torch.randn(6, 1, 80, 301)
    with torch.no_grad():
        p_base = base(x)["ai"].softmax(-1)[:, 1]
        p_cand = candidate(x)["ai"].softmax(-1)[:, 1]
    assert torch.all(p_cand >= p_base - 1e-6), "the served score is the larger of production's head and the prototypes'"
    path = save_checkpoint(candidate, tmp_path / "cand.pt")
    again = load_checkpoint(path)
    with torch.no_grad():
        assert torch.allclose(again(x)["ai"], candidate(x)["ai"]), "the cosine head survives a checkpoint round trip"


def test_prototype_recipe_on_a_one_class_base_keeps_its_learnt_direction(project, small_corpus, tiny_params):
    # given: a base trained with the one-class loss (train.ai_loss ocsoftmax): its ai score is the cosine to
    # a learnt human direction, its linear ai head switched off
    params = _with_recipe(tiny_params, "prototype")
    plain = _store_with_new_samples(small_corpus, params)
    base = Detector(dataclasses.replace(plain.meta, cosine_head=one_class_meta()))
    base.load_state_dict(plain.state_dict(), strict=False)   # the cosine head's buffers: set by TrainingNet
    net = TrainingNet(base, one_class=True)   # what bootstrap trains: the linear ai head off, the cosine head's scale
    net.sync()
    direction = base.cosine.human.clone()
    base.eval()
    # when: the new generator becomes a prototype
    candidate, _ = finetune(base, params)
    # then: the candidate scores against the base's learnt direction, not a centroid of the replay humans
    assert candidate.meta.cosine_head["generators"] == ["piper-joe"]
    assert torch.allclose(candidate.cosine.human, direction, atol=1e-6)


def test_loss_weights_balance_classes_and_give_the_new_samples_their_share():
    labels = np.array([0] * 60 + [1] * 10 + [1] * 30)          # 60 human, 10 new-sample copies, 30 earlier AI
    is_new = np.array([False] * 60 + [True] * 10 + [False] * 30)
    w = loss_weights(labels, is_new, new_share=0.5).numpy()
    assert w.mean() == pytest.approx(1.0), "weights average 1 (the loss keeps its scale)"
    assert w[:60].sum() == pytest.approx(w[60:].sum()), "human and AI carry the same total weight"
    assert w[60:70].sum() == pytest.approx(w[70:].sum()), "new samples carry new_share of the AI weight"
    only_new = loss_weights(labels[:70], is_new[:70], new_share=0.5).numpy()
    assert only_new[60:].sum() == pytest.approx(only_new[:60].sum()), "without earlier AI the new samples are the AI class"


def test_speaker_parts_are_disjoint_by_speaker():
    clips = [Clip(Path(f"/h/{i}.wav"), 0, "human", f"spk{i % 10}", "en", "src") for i in range(50)]
    train, stop, cal = speaker_parts(clips, (0.2, 0.3), seed=0)
    speakers = [{c.speaker for c in part} for part in (train, stop, cal)]
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2]), \
        "replay, early-stopping and calibration humans share no speaker"
    assert (len(stop), len(cal)) == (10, 15) and len(train) + len(stop) + len(cal) == 50, \
        "20 % and 30 % of the clips, whole speakers at a time; every clip in one part"
    # a few big speakers and many one-clip speakers (as in the demo corpus): shares follow clips, not speakers
    lumpy = [Clip(Path(f"/b/{i}.wav"), 0, "human", f"big{i % 4}", "en", "src") for i in range(80)] + \
            [Clip(Path(f"/s/{i}.wav"), 0, "human", f"one{i}", "en", "src") for i in range(40)]
    train, stop, cal = speaker_parts(lumpy, (0.2, 0.3), seed=3)
    assert 24 <= len(stop) <= 36 and 36 <= len(cal) <= 54, f"about 24 and 36 of 120 clips: {len(stop)}, {len(cal)}"


def test_last_block_finetune_trains_the_ai_heads_own_layer4_and_keeps_everything_else(project, small_corpus, tiny_params):
    params = _with_recipe(tiny_params, "last_block")
    base = _store_with_new_samples(small_corpus, params)
    # the distillation target is production itself: an untrained adapter reproduces its other heads exactly
    cached = torch.randn(4, 32, 5, 19)
    adapter = Adapter(base, "last_block").eval()
    teacher = teacher_outputs(base, cached, "cpu")
    with torch.no_grad():
        emb = adapter.embed(cached)
        for head, target in teacher.items():
            module = adapter.head if head == "ai" else adapter.other_heads[head]
            assert torch.allclose(torch.log_softmax(module(emb), -1), target, atol=1e-6), head
    candidate, report = finetune(base, params)
    changed = _changed(base.state_dict(), candidate.state_dict())
    assert changed and all(k.startswith("heads.ai.") for k in changed), f"only the ai head may change: {sorted(changed)}"
    assert candidate.meta.ai_branch == "layer4", "the trained layer4 is the ai head's own"
    assert not all(torch.equal(a, b) for a, b in zip(candidate.ai_layer4.state_dict().values(),
                                                     base.trunk.layer4.state_dict().values())), "the branch did train"
    x = torch.randn(3, 1, 80, 301)
    with torch.no_grad():
        out_b, out_c = base(x), candidate(x)
    assert all(torch.equal(out_b[k], out_c[k]) for k in ("language", "speakers")), \
        "the other heads read production's layer4: their outputs are production's, bit for bit"
    assert report["trained"] == "ai head + its own layer4", report["trained"]
    assert candidate.meta.threshold_scoring == scoring_settings(params), "the threshold carries its scoring settings"
    assert all(frozen_parts_unchanged(candidate, base, report["trained"]).values())
    # a second retrain starts from the candidate's branch and leaves the shared trunk alone again
    again, _ = finetune(candidate, _with_recipe(params, "last_block", seed=1))
    changed = _changed(candidate.state_dict(), again.state_dict())
    assert any(k.startswith("ai_layer4.") for k in changed) and not any(k.startswith("trunk.") for k in changed), \
        sorted(changed)


@pytest.mark.parametrize("recipe, upto, trained", [("last_block", "layer3", "ai_layer4."),
                                                    ("input_layers", "input", "trunk.conv1.")])
def test_calibration_from_cached_windows_scores_as_detection_does(project, small_corpus, tiny_params, recipe, upto, trained):
    from pipeline.core.scoring import score_model
    from pipeline.training.finetune import calibration_scores, calibration_windows, prepare

    # given: production, and a candidate whose trained part differs from it
    params = _with_recipe(tiny_params, recipe)
    base = _store_with_new_samples(small_corpus, params)
    data = prepare(params)
    candidate = base.with_ai_branch() if recipe == "last_block" else copy.deepcopy(base)
    with torch.no_grad():
        for name, p in candidate.named_parameters():
            if name.startswith(trained):
                p.add_(torch.randn_like(p) * 0.5)
    # when: its calibration humans are scored from production's frozen part, computed once
    cal = calibration_windows(base, data, params, "cpu")
    cached = calibration_scores(candidate, cal, params, "cpu")
    # then: each human's score is the one detection gives the candidate, not production's
    waves = [it.wave for it in data.calibration]
    direct = [s.ai_score for s in score_model(candidate, waves, params)]
    production = [s.ai_score for s in score_model(base, waves, params)]
    assert cal.upto == upto and len(cached) == len(waves) > 3
    assert np.allclose(cached, direct, atol=1e-5), np.abs(np.array(cached) - direct).max()
    assert not np.allclose(direct, production, atol=1e-3), "the candidate's own weights decide its scores"


def test_distilling_the_ai_head_keeps_the_replay_scores_near_production(project, small_corpus, tiny_params):
    # given: one store and base, fine-tuned twice by last_block, without and with the ai head's distillation
    from pipeline.training.finetune import CACHE_FOR, cache_inputs, prepare

    runs = {}
    for weight in (0.0, 30.0):
        params = _with_recipe(tiny_params, "last_block", distill_ai=weight, epochs=8, patience=8, lr=3e-3)
        base = _store_with_new_samples(small_corpus, params) if not runs else runs["base"]
        candidate, _ = finetune(base, params)
        data = prepare(params)
        replay = torch.from_numpy(~np.isin(data.seg.files, list(data.generators)))
        x = cache_inputs(base, data.seg.waves, params, CACHE_FOR["last_block"], "cpu", 0)[replay]
        with torch.no_grad():
            p_base = base.heads["ai"](base.embeddings_from_layer3(x)[1]).softmax(-1)[:, 1]
            p_cand = candidate.heads["ai"](candidate.embeddings_from_layer3(x)[1]).softmax(-1)[:, 1]
        runs |= {"base": base, weight: float((p_cand - p_base).abs().mean())}
    # then: with the distillation the replay's ai scores moved less from production's
    assert runs[30.0] < runs[0.0], f"mean |score change| on the replay: {runs}"


def test_input_layers_finetune_trains_the_stem_and_layer1_only(project, small_corpus, tiny_params):
    params = _with_recipe(tiny_params, "input_layers", epochs=2)
    base = _store_with_new_samples(small_corpus, params)
    candidate, report = finetune(base, params)
    changed = _changed(base.state_dict(), candidate.state_dict())
    assert any(k.startswith("trunk.layer1.") for k in changed), "layer1 did train"
    assert all(k.startswith(("trunk.conv1", "trunk.bn1.weight", "trunk.bn1.bias", "trunk.layer1.")) for k in changed), \
        f"only the stem's weights and layer1 may change (batch-norm statistics stay production's): {sorted(changed)}"
    assert not any("running_" in k for k in changed), "batch-norm statistics are production's"
    # on a production whose ai head has its own layer4, each head is distilled on what it reads in production
    forked = base.with_ai_branch()
    with torch.no_grad():
        for p in forked.ai_layer4.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 1, 80, 301)
        adapter = Adapter(forked, "input_layers").eval()
        teacher, (shared, ai) = teacher_outputs(forked, x, "cpu", "input"), adapter.embeddings(x)
        for head, target in teacher.items():
            module, emb = (adapter.head, ai) if head == "ai" else (adapter.other_heads[head], shared)
            assert torch.allclose(torch.log_softmax(module(emb), -1), target, atol=1e-6), head


def test_head_accuracy_counts_known_languages_and_speaker_counts():
    from types import SimpleNamespace as NS

    from pipeline.core.data import Clip

    clips = [Clip(Path(f"{i}.wav"), 0, "human", "s", lang, "src", n) for i, (lang, n) in
             enumerate([("en", 1), ("fr", 1), ("xx", 2), ("en", 1)])]
    results = [NS(language="en", speakers="single"), NS(language="en", speakers="single"),
               NS(language="en", speakers="several"), NS(language="en", speakers="several")]
    acc = head_accuracy(clips, results, languages=("en", "fr"))
    assert acc["language"] == pytest.approx(2 / 3), "a language the head does not know is not counted"
    assert acc["speakers"] == pytest.approx(3 / 4), "several talkers is right only for clips with n_speakers > 1"


def _metrics(eer, fpr, new_recall, language=0.8, speakers=0.9, n=200, earlier=0.9):
    """A model's numbers as validate computes them: rates from counts out of n humans and 4 new files;
    earlier: recall on earlier AI at every compared human FPR, or {fpr: recall}."""
    points = earlier if isinstance(earlier, dict) else dict.fromkeys(GatesConfig().compare_at_fpr, earlier)
    return {"eer": eer, "fpr": rate(round(fpr * n), n), "new_recall": rate(round(new_recall * 4), 4),
            "earlier_at_fpr": points, "head_accuracy": {"language": language, "speakers": speakers}}


EARLIER_GATES = {"earlier_ai_recall_vs_production_at_1pct_fpr", "earlier_ai_recall_vs_production_at_5pct_fpr",
                 "earlier_ai_recall_vs_production_at_10pct_fpr"}


ENOUGH = {"new_files": 4, "calibration_humans": 80}


@pytest.mark.parametrize(("cand", "frozen", "failed"), [
    (_metrics(0.05, 0.005, 1.0), {"trunk": True}, set()),
    (_metrics(0.05, 0.005, 0.50), {"trunk": True}, {"new_generator_recall"}),
    (_metrics(0.05, 1.00, 1.00), {"trunk": True}, {"human_fpr"}),  # the incident
    (_metrics(0.05, 0.045, 1.0), {"trunk": True}, {"human_fpr"}),  # 9/200: estimate 0.045, upper end 0.083
    (_metrics(0.05, 0.035, 1.0, n=1000), {"trunk": True}, set()),  # 35/1000: upper end 0.048
    (_metrics(0.05, 0.005, 1.0, earlier=0.80), {"trunk": True}, EARLIER_GATES),  # forgot, at every human FPR
    # forgot only where 10 % of humans are flagged: that operating point's gate alone refuses
    (_metrics(0.05, 0.005, 1.0, earlier={0.01: 0.9, 0.05: 0.9, 0.10: 0.8}), {"trunk": True},
     {"earlier_ai_recall_vs_production_at_10pct_fpr"}),
    # a worse EER with the same recall at every compared FPR: the EER is reported, not gated, by default
    (_metrics(0.20, 0.005, 1.0), {"trunk": True}, set()),
    (_metrics(0.05, 0.005, 1.0), {"trunk": False}, {"frozen_weights_unchanged"}),
    # layer4 trained: the language head got worse on held-out clips
    (_metrics(0.05, 0.005, 1.0, language=0.70), {"trunk": True}, {"language_accuracy_vs_production"}),
])
def test_gates_on_constructed_cases(cand, frozen, failed):
    production = _metrics(0.06, 0.02, 0.25)
    verdict = judge(cand, production, frozen, ENOUGH, tries=1, gates=GatesConfig())
    got = {name for name, g in verdict["gates"].items() if not g["passed"]}
    assert got == failed, f"expected failing gates {failed}, got {got}"
    assert verdict["passed"] == (not failed) and verdict["status"] == ("failed" if failed else "passed"), \
        "the verdict passes only when every gate does"
    assert len(verdict["reasons"]) == len(failed), "each failure has a reason"


def test_the_eer_gate_when_switched_on_tolerates_one_clip_of_the_smaller_class_unless_the_floor_is_off():
    # given: 39 earlier-AI clips, so the EER moves in steps of about 1/39 = 0.026; a candidate one clip worse
    cand, production = _metrics(0.0256, 0.005, 1.0), _metrics(0.0078, 0.02, 0.25)
    evidence = ENOUGH | {"test_ai": 39, "test_humans": 257}
    assert "eer_vs_production" not in judge(cand, production, {"trunk": True}, evidence, 1, GatesConfig())["gates"], \
        "by default the EER is not a gate"
    on = GatesConfig(max_eer_increase=0.01)
    gate = judge(cand, production, {"trunk": True}, evidence, 1, on)["gates"]["eer_vs_production"]
    assert gate["passed"] and gate["limit"] == pytest.approx(0.0078 + 1 / 39, abs=1e-4), gate
    assert gate["tolerance"].endswith("one clip of 39"), gate
    # two clips worse is refused; and with the floor off, the 0.01 tolerance refuses the one clip
    worse = judge(_metrics(0.0078 + 2 / 39, 0.005, 1.0), production, {"trunk": True}, evidence, 1, on)
    assert not worse["gates"]["eer_vs_production"]["passed"]
    strict = judge(cand, production, {"trunk": True}, evidence, 1, GatesConfig(max_eer_increase=0.01, eer_step_floor=False))
    assert not strict["gates"]["eer_vs_production"]["passed"] and "max_eer_increase" in strict["gates"]["eer_vs_production"]["tolerance"]


def test_no_forgetting_gates_compare_both_models_at_each_configured_human_fpr():
    # given: the candidate catches fewer earlier-AI clips than production only at 1 % human FPR
    cand = _metrics(0.05, 0.005, 1.0, earlier={0.01: 0.70, 0.05: 0.95, 0.10: 0.97})
    production = _metrics(0.06, 0.02, 0.25, earlier={0.01: 0.80, 0.05: 0.90, 0.10: 0.97})
    gates = judge(cand, production, {"trunk": True}, ENOUGH, 1, GatesConfig())["gates"]
    assert {n for n in gates if n.startswith("earlier_ai")} == EARLIER_GATES, "one gate per compared human FPR"
    one = gates["earlier_ai_recall_vs_production_at_1pct_fpr"]
    assert not one["passed"] and one["limit"] == pytest.approx(0.75), one
    assert gates["earlier_ai_recall_vs_production_at_5pct_fpr"]["passed"], "better at 5 % does not excuse 1 %, nor is it refused"
    # a single point, as params written before the list: compare_at_fpr: 0.05
    single = GatesConfig.model_validate({"compare_at_fpr": 0.05})
    assert single.compare_at_fpr == (0.05,), single
    only5 = judge(cand, production, {"trunk": True}, ENOUGH, 1, single)
    assert only5["passed"] and "earlier_ai_recall_vs_production_at_5pct_fpr" in only5["gates"], only5["reasons"]


def test_a_version_description_names_the_operating_point_and_the_champion_recall_there():
    # given: a passed verdict from the per-point gates, and the metrics validate writes for both models
    cand = _metrics(0.05, 0.005, 1.0, earlier={0.01: 0.95, 0.05: 0.97, 0.10: 0.98})
    production = _metrics(0.06, 0.02, 0.25, earlier={0.01: 0.80, 0.05: 0.90, 0.10: 0.97})
    verdict = judge(cand, production, {"trunk": True}, ENOUGH, 1, GatesConfig())
    metrics = {"production": {"earlier_ai_recall_at_1pct_fpr": 0.80, "earlier_ai_recall_at_5pct_fpr": 0.90}}
    text = describe_candidate(verdict, metrics, base_version=1, data_hash="abcdef12", trigger="test")
    assert "PASSED" in text and "earlier-AI recall at equal FPR (1 %) 0.95 (rule >= 0.7500, champion 0.80)" in text, text
    # a verdict written before the gates took a list of points keeps its one line
    old = verdict | {"gates": {"earlier_ai_recall_vs_production": verdict["gates"]["earlier_ai_recall_vs_production_at_5pct_fpr"],
                               "new_generator_recall": verdict["gates"]["new_generator_recall"]}}
    assert "earlier-AI recall at equal FPR 0.97 (rule >= 0.8500)" in describe_candidate(
        old, metrics, base_version=1, data_hash="", trigger="test"), "an old verdict's gate is still described"


def test_human_fpr_gate_reads_the_pessimistic_end_unless_switched_off():
    cand = _metrics(0.05, 0.045, 1.0)   # 9 of 200 humans: estimate 0.045, Wilson upper end 0.083
    production = _metrics(0.06, 0.045, 0.25)
    strict = judge(cand, production, {"trunk": True}, ENOUGH, 1, GatesConfig())["gates"]["human_fpr"]
    assert not strict["passed"] and strict["gated_on"] == "pessimistic end" and strict["value"] > 0.05, strict
    lax = judge(cand, production, {"trunk": True}, ENOUGH, 1, GatesConfig(pessimistic=()))["gates"]["human_fpr"]
    assert lax["passed"] and lax["value"] == pytest.approx(0.045), "switched off, the estimate is gated"
    assert strict["interval"][0] < 0.045 < strict["interval"][1] and strict["count"] == "9/200", "interval and count shown"


@pytest.mark.parametrize(("evidence", "missing"), [
    ({"new_files": 1, "calibration_humans": 80}, "new file"),
    ({"new_files": 4, "calibration_humans": 12}, "humans"),
])
def test_too_little_evidence_is_never_a_pass(evidence, missing):
    verdict = judge(_metrics(0.01, 0.0, 1.0), _metrics(0.06, 0.02, 0.25), {"trunk": True}, evidence, 1, GatesConfig())
    assert verdict["status"] == INSUFFICIENT and not verdict["passed"], "perfect numbers on thin evidence do not pass"
    assert missing in verdict["missing_evidence"][0], f"the verdict says what is missing: {verdict['missing_evidence']}"


def test_a_human_fpr_that_cannot_be_cross_fitted_is_missing_evidence():
    from pipeline.training.calibration import crossfit_fpr

    one_speaker = [Clip(Path(f"/h/{i}.wav"), 0, "human", "allison", "en", "src") for i in range(60)]
    with pytest.raises(ValueError, match="1 speaker"):
        crossfit_fpr(one_speaker, [0.1] * 60, 0.01, folds=2, seed=0)
    cand = _metrics(0.01, 0.0, 1.0)
    cand["fpr"] |= {"unavailable": "60 test humans of 1 speaker(s) cannot be split by speaker into 2 parts"}
    verdict = judge(cand, _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 1, GatesConfig())
    assert verdict["status"] == INSUFFICIENT, "an FPR the threshold was fitted on is not evidence"
    assert "no out-of-sample human FPR" in verdict["missing_evidence"][0], verdict["missing_evidence"]


def test_retries_on_the_same_gate_data_are_counted_and_bounded():
    good = _metrics(0.05, 0.005, 1.0)
    ok = judge(good, _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 3, GatesConfig())
    over = judge(good, _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 4, GatesConfig())
    assert ok["passed"] and not over["passed"], "the fourth candidate judged on the same data is refused"
    assert "tries_on_gate_data" in over["reasons"][0], over["reasons"]


def test_twins_of_train_humans_join_the_earlier_ai_replay(project, small_corpus, tiny_params):
    # given a store and the twins of its humans (the twins stage, Griffin-Lim only)
    from pipeline.core.model import AI_LABEL
    from pipeline.stages import twins as twins_stage
    params = tiny_params.model_copy(update={"twins": tiny_params.twins.model_copy(update={"vocoders": ("griffinlim",)})})
    _ingest(from_corpus(small_corpus.root), params)
    twins_stage.run(params)
    store = Path(params.ingest.store)
    # when the replay set is drawn with and without them
    stored = read_corpus(store)
    humans, with_twins = finetune_module.replay_clips(store, stored, set(), params.twins.out)
    _, without = finetune_module.replay_clips(store, stored, set(), None)
    twins = [c for c in with_twins if c.twin_of]
    # then the twins are AI replay, only of train-split humans, and only when asked for
    assert twins and all(c.label == AI_LABEL for c in twins), "twins are replayed as AI"
    assert {t.twin_of for t in twins} <= {h.sha256 for h in humans}, "no twin of a test-split human is replayed"
    assert not any(c.twin_of for c in without) and len(with_twins) == len(without) + len(twins)


def test_a_gate_that_no_count_could_pass_is_insufficient_evidence_not_a_failure():
    # given: 60 gate humans, none flagged. The 95 % upper end of 0/60 is 0.060, over the 5 % limit, so the
    # pessimistic human-FPR gate could not pass whatever the candidate did: 73 is the least that can
    few = _metrics(0.01, 0.0, 1.0, n=60)
    verdict = judge(few, _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 1, GatesConfig())
    assert verdict["status"] == INSUFFICIENT, verdict["reasons"]
    assert any("60 humans" in m and "need >= 73" in m for m in verdict["missing_evidence"]), verdict["missing_evidence"]
    line = describe_candidate(verdict, {}, base_version=1, data_hash="abcdef12", trigger="test")
    assert "INSUFFICIENT EVIDENCE" in line and "upper end is still 0.060, over 0.05: need >= 73" in line, line
    enough = judge(_metrics(0.01, 0.0, 1.0, n=73), _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 1, GatesConfig())
    assert enough["passed"], enough["reasons"]
    # gated on its estimate, 60 humans with none flagged are evidence enough
    assert judge(few, _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 1, GatesConfig(pessimistic=()))["passed"]
    # the recall gated on its lower end: 4 of 4 new files caught is [0.51, 1], which 0.9 can never clear (35 can)
    strict = GatesConfig(pessimistic=("human_fpr", "new_recall"))
    recall = judge(_metrics(0.01, 0.0, 1.0), _metrics(0.06, 0.02, 0.25), {"trunk": True}, ENOUGH, 1, strict)
    assert recall["status"] == INSUFFICIENT and any("4 new files" in m and "need >= 35" in m
                                                     for m in recall["missing_evidence"]), recall["missing_evidence"]
