"""Retraining stages on real audio: ingest, augment, finetune, validate gates."""
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.config import GatesConfig
from pipeline.core.data import CorpusError
from pipeline.training.finetune import Adapter, finetune, loss_weights, teacher_outputs
from pipeline.core.model import new_model
from pipeline.stages import augment as augment_stage
from pipeline.io.store import ClipInfo, from_corpus, ingest, read_manifest
from pipeline.training.validate import apply_gates, head_accuracy


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
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe")) for p in new], tiny_params)
    first = augment_stage.run(tiny_params)
    out = Path(tiny_params.augment_stage.out)
    files = {p.name: p.read_bytes() for p in out.glob("*.wav")}
    assert first["copies"] == 2 * tiny_params.augment.copies, f"copies per new clip: {first}"
    for data in files.values():
        wave, sr = sf.read(__import__("io").BytesIO(data))
        assert sr == 24000 and len(wave) == 72000 and np.isfinite(wave).all(), "3 s at 24 kHz, finite"
    augment_stage.run(tiny_params)
    assert {p.name: p.read_bytes() for p in out.glob("*.wav")} == files, "same inputs and seed, same bytes"


def test_finetune_refuses_one_class(project, small_corpus, tiny_params):
    # given a store holding only AI clips (the production incident)
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe", split="train")) for p in new], tiny_params)
    augment_stage.run(tiny_params)
    model = new_model(["en"], tiny_params.audio, tiny_params.features, 8, 0.0)
    with pytest.raises(CorpusError, match="refused"):
        finetune(model, tiny_params)


def _store_with_new_samples(small_corpus, params):
    """The corpus and two new-generator clips stored, their copies augmented; a fresh narrow base model."""
    _ingest(from_corpus(small_corpus.root), params)
    new = sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]
    _ingest([(p, ClipInfo(label="ai", generator="piper-joe")) for p in new], params)
    augment_stage.run(params)
    torch.manual_seed(0)
    return new_model(["en"], params.audio, params.features, 8, 0.0).eval()


def test_head_only_finetune_leaves_frozen_weights_bit_identical(project, small_corpus, tiny_params):
    base = _store_with_new_samples(small_corpus, tiny_params)
    candidate, report = finetune(base, tiny_params)
    before, after = base.state_dict(), candidate.state_dict()
    for key in before:
        if key.startswith("heads.ai."):
            continue
        assert torch.equal(before[key], after[key]), f"{key} must not change when only the ai head trains"
    assert not torch.equal(before["heads.ai.weight"], after["heads.ai.weight"]), "the ai head did train"
    assert report["lofo"]["method"] == "leave-one-file-out" and len(report["lofo"]["scores"]) == 2, report["lofo"]
    assert report["segments"]["human_replay"] > 0, "human replay is always part of fine-tuning"
    assert 0 <= report["calibration"]["threshold"], "a calibrated threshold is recorded"


def test_loss_weights_balance_classes_and_give_the_new_samples_their_share():
    labels = np.array([0] * 60 + [1] * 10 + [1] * 30)          # 60 human, 10 new-sample copies, 30 earlier AI
    is_new = np.array([False] * 60 + [True] * 10 + [False] * 30)
    w = loss_weights(labels, is_new, new_share=0.5).numpy()
    assert w.mean() == pytest.approx(1.0), "weights average 1 (the loss keeps its scale)"
    assert w[:60].sum() == pytest.approx(w[60:].sum()), "human and AI carry the same total weight"
    assert w[60:70].sum() == pytest.approx(w[70:].sum()), "new samples carry new_share of the AI weight"
    only_new = loss_weights(labels[:70], is_new[:70], new_share=0.5).numpy()
    assert only_new[60:].sum() == pytest.approx(only_new[:60].sum()), "without earlier AI the new samples are the AI class"


def test_last_block_finetune_trains_layer4_and_keeps_everything_else(project, small_corpus, tiny_params):
    params = tiny_params.model_copy(update={"finetune": tiny_params.finetune.model_copy(update={"train_last_block": True})})
    base = _store_with_new_samples(small_corpus, params)
    # the distillation target is production itself: an untrained adapter reproduces its other heads exactly
    cached = torch.randn(4, 32, 5, 19)
    adapter = Adapter(base, train_last_block=True).eval()
    teacher = teacher_outputs(base, cached, "cpu")
    with torch.no_grad():
        emb = adapter.embed(cached)
        for head, target in teacher.items():
            assert torch.allclose(torch.log_softmax(adapter.other_heads[head](emb), -1), target, atol=1e-6), head
    candidate, report = finetune(base, params)
    before, after = base.state_dict(), candidate.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("trunk.layer4.", "heads.ai.")) for k in changed), \
        f"only layer4 and the ai head may change: {sorted(changed)}"
    assert any(k.startswith("trunk.layer4.") for k in changed), "layer4 did train"
    assert report["trained"] == "ai head + layer4", report["trained"]


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


def _metrics(eer, fpr, new_recall, language=0.8, speakers=0.9):
    return {"eer": eer, "fpr": fpr, "new_recall": new_recall, "head_accuracy": {"language": language, "speakers": speakers}}


@pytest.mark.parametrize(("cand", "frozen", "failed"), [
    (_metrics(0.05, 0.01, 0.95), {"trunk": True}, set()),
    (_metrics(0.05, 0.01, 0.50), {"trunk": True}, {"new_generator_recall"}),
    (_metrics(0.05, 1.00, 1.00), {"trunk": True}, {"human_fpr", "human_fpr_vs_production"}),  # the incident
    (_metrics(0.05, 0.035, 0.95), {"trunk": True}, {"human_fpr_vs_production"}),
    (_metrics(0.20, 0.01, 0.95), {"trunk": True}, {"eer_vs_production"}),
    (_metrics(0.05, 0.01, 0.95), {"trunk": False}, {"frozen_weights_unchanged"}),
    # layer4 trained: the language head got worse on held-out clips
    (_metrics(0.05, 0.01, 0.95, language=0.70), {"trunk (except layer4)": True}, {"language_accuracy_vs_production"}),
])
def test_gates_on_constructed_cases(cand, frozen, failed):
    production = _metrics(0.06, 0.02, 0.10)
    verdict = apply_gates(cand, production, frozen, GatesConfig())
    got = {name for name, g in verdict["gates"].items() if not g["passed"]}
    assert got == failed, f"expected failing gates {failed}, got {got}"
    assert verdict["passed"] == (not failed), "the verdict passes only when every gate does"
    assert len(verdict["reasons"]) == len(failed), "each failure has a reason"
