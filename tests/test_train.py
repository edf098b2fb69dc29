"""Base training on real speech: speaker-disjoint, reported per generator and source, deterministic on CPU."""
from pathlib import Path

import pytest
import torch

from pipeline.core.data import CorpusError
from pipeline.core.model import load_checkpoint
from pipeline.training.train import bootstrap

pytestmark = pytest.mark.integration


def test_bootstrap_reports_and_is_deterministic(small_corpus, tiny_params, tmp_path, caplog):
    first = bootstrap(small_corpus.root, tiny_params, tmp_path / "a.pt", tmp_path / "a.json")
    with_workers = tiny_params.model_copy(update={"compute": tiny_params.compute.model_copy(update={"batch_workers": 2})})
    with caplog.at_level("INFO", logger="pipeline.training.train"):
        second = bootstrap(small_corpus.root, with_workers, tmp_path / "b.pt", tmp_path / "b.json")
    assert "batch workers: 2 per training process" in caplog.text, "the log says how the batches were made"
    a = load_checkpoint(tmp_path / "a.pt", tiny_params.audio).state_dict()
    b = load_checkpoint(tmp_path / "b.pt", tiny_params.audio).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), \
        "same data, params and seed give bit-identical weights on CPU, whether or not worker processes make the batches"
    val = first["validation"]
    for key in ("eer", "auc", "accuracy", "fpr", "fnr"):
        assert key in val["overall"], f"validation reports {key}"
    assert val["per_generator"] and val["per_source"], "per-generator and per-source tables"
    assert first["n_val"] > 0 and first["history"], "validated each epoch"
    assert len(first["languages"]) >= 2, f"the language head has the corpus' languages: {first['languages']}"
    assert second["data_hash"] == first["data_hash"], "the data hash identifies the training audio"
    with pytest.raises(FileExistsError):
        bootstrap(small_corpus.root, tiny_params, tmp_path / "a.pt", tmp_path / "c.json")


def test_bootstrap_refuses_one_class(tmp_path, tiny_params, small_corpus):
    (tmp_path / "ai" / "x__y").mkdir(parents=True)
    for clip in sorted(small_corpus.new_generator_dir.glob("*.wav"))[:2]:
        (tmp_path / "ai" / "x__y" / clip.name).write_bytes(clip.read_bytes())
    with pytest.raises(CorpusError, match="only ai"):
        bootstrap(tmp_path, tiny_params, tmp_path / "m.pt", tmp_path / "r.json")


def test_select_last_keeps_the_full_schedule_whatever_validation_says(small_corpus, tiny_params, tmp_path, monkeypatch):
    # given: a validation EER that only gets worse after epoch 1 (early stopping would keep epoch 1),
    # and one that only gets better (best = the last epoch)
    import pipeline.training.train as train_mod

    def run(name, eers, select):
        seq = iter(eers)
        monkeypatch.setattr(train_mod, "compute_eer", lambda scores, labels: (next(seq), 0.5))
        params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
            update={"epochs": 4, "patience": 1, "select": select})})
        report = bootstrap(small_corpus.root, params, tmp_path / f"{name}.pt", tmp_path / f"{name}.json")
        return report, load_checkpoint(tmp_path / f"{name}.pt", params.audio).state_dict()

    worse, improving = [0.1, 0.2, 0.3, 0.4, 0.5], [0.4, 0.3, 0.2, 0.1, 0.1]
    best_report, best_w = run("best", worse, "best")
    last_report, last_w = run("last", worse, "last")
    _, reference = run("ref", improving, "best")
    # then: select best stopped after epoch 2 and kept epoch 1; select last trained all 4 epochs and kept
    # the 4th, the same weights as an early-stopping run whose best epoch was the 4th
    assert len(best_report["history"]) == 2 and len(last_report["history"]) == 4, "early stop only with best"
    assert all(torch.equal(last_w[k], reference[k]) for k in last_w), "select last = the weights after epoch 4"
    assert not all(torch.equal(last_w[k], best_w[k]) for k in last_w), "select best kept an earlier epoch"


def test_select_swa_averages_the_tail_of_the_full_schedule(small_corpus, tiny_params, tmp_path, monkeypatch):
    # given: a validation EER that only gets worse (early stopping would stop after epoch 2)
    import pipeline.training.train as train_mod

    seq = iter([0.1, 0.2, 0.3, 0.4, 0.05])   # the 5th is the averaged model's
    monkeypatch.setattr(train_mod, "compute_eer", lambda scores, labels: (next(seq), 0.5))
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(
        update={"epochs": 4, "patience": 1, "select": "swa", "swa_start": 0.5})})
    report = bootstrap(small_corpus.root, params, tmp_path / "swa.pt", tmp_path / "swa.json")
    swa_w = load_checkpoint(tmp_path / "swa.pt", params.audio).state_dict()
    monkeypatch.undo()
    last = params.model_copy(update={"train": params.train.model_copy(update={"select": "last"})})
    bootstrap(small_corpus.root, last, tmp_path / "last.pt", tmp_path / "last.json")
    last_w = load_checkpoint(tmp_path / "last.pt", params.audio).state_dict()
    # then: all 4 epochs ran, the second half of the 12 steps was averaged, and the kept weights are that
    # average (not the last step's), reported with their own validation EER
    history = report["history"]
    assert len(history) == 4, "no early stop with swa"
    assert history[-1]["swa_steps"] == 6 and history[-1]["swa_val_eer"] == 0.05
    assert not torch.equal(swa_w["trunk.conv1.weight"], last_w["trunk.conv1.weight"]), "the mean, not the last step"
    assert report["validation"]["overall"]["eer"] is not None


def test_bootstrap_with_the_one_class_loss_scores_by_its_direction(small_corpus, tiny_params, tmp_path):
    # given: train.ai_loss ocsoftmax
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"ai_loss": "ocsoftmax"})})
    report = bootstrap(small_corpus.root, params, tmp_path / "oc.pt", tmp_path / "oc.json", twins=tmp_path / "none")
    # then: the checkpoint is a one-class model (a cosine head with the learnt direction, the linear ai head
    # switched off), calibrated and reported like any other, and its validation scores are the direction's
    model = load_checkpoint(tmp_path / "oc.pt", params.audio)
    assert model.meta.cosine_head == {"kind": "ocsoftmax", "generators": [], "n_prototypes": 0}
    assert report["ai_loss"] == "ocsoftmax" and model.meta.notes["ai_loss"] == "ocsoftmax"
    assert torch.count_nonzero(model.heads["ai"].weight) == 0
    assert torch.linalg.norm(model.cosine.human).item() == pytest.approx(1.0, abs=1e-5)
    scores = [r["ai_score"] for r in report["val_scores"]]
    assert all(0.0 < s < 1.0 for s in scores) and len(set(scores)) > 1, "unsaturated, distinct scores"
    assert 0.0 < model.meta.threshold < 1.0 and report["calibration"]["threshold"] == model.meta.threshold


def test_bootstrap_with_the_chain_adversary_keeps_it_out_of_the_checkpoint(small_corpus, tiny_params, tmp_path,
                                                                          caplog):
    # given: train.chain_adversary on
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"chain_adversary": 0.5})})
    with caplog.at_level("INFO", logger="pipeline.training.train"):
        report = bootstrap(small_corpus.root, params, tmp_path / "adv.pt", tmp_path / "adv.json",
                           twins=tmp_path / "none")
    assert any("chain adversary:" in r.message and "strength 0.5" in r.message for r in caplog.records)
    plain = bootstrap(small_corpus.root, tiny_params, tmp_path / "plain.pt", tmp_path / "plain.json",
                      twins=tmp_path / "none")
    # then: the model is a detector like any other (no adversary weights saved), its training was changed by the
    # adversary, and the report and checkpoint notes record the strength
    model = load_checkpoint(tmp_path / "adv.pt", params.audio)
    assert not any("adversary" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(load_checkpoint(tmp_path / "plain.pt", params.audio).state_dict())
    assert report["chain_adversary"] == 0.5 and model.meta.notes["chain_adversary"] == 0.5
    assert plain["chain_adversary"] == 0.0
    scores = [r["ai_score"] for r in report["val_scores"]]
    assert scores != [r["ai_score"] for r in plain["val_scores"]], "the reversed gradient reached the trunk"
    assert report["validation"]["overall"]["eer"] is not None


def test_aivoice_bootstrap_makes_the_twins_the_corpus_lacks_unless_told_otherwise(small_corpus, tiny_params, tmp_path,
                                                                                  monkeypatch, mlflow_store, capsys):
    import json

    from pipeline.apps.cli import main as aivoice
    from pipeline.core.data import read_corpus
    from pipeline.io.store import read_manifest
    from pipeline.synthesis.twins import originals

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(tiny_params.model_dump(mode="json", by_alias=True)))
    run = ["--params", "params.yaml", "bootstrap", "--corpus", str(small_corpus.root)]
    # given: no `aivoice twins` was run. when: the base is bootstrapped with the shipped settings
    assert aivoice(run + ["--out", "a.pt", "--report", "a.json"]) == 0
    made = read_manifest(tmp_path / tiny_params.train.twins)
    humans = len(originals(read_corpus(small_corpus.root)))
    assert {r["generator"] for r in made} == {"twin-griffinlim", "twin-codec2"}, "twins of every configured vocoder"
    assert len(made) > humans, f"{len(made)} twins of {humans} human training clips"
    assert json.loads(Path("a.json").read_text())["n_twins"] > 0, "the base trained on them (validation's own left out)"
    assert "twins: " in capsys.readouterr().out, "the command says it made them"
    # when: bootstrapped again, without twins, and on a twins folder given as it is
    assert aivoice(run + ["--out", "b.pt", "--report", "b.json", "--no-twins"]) == 0
    assert json.loads(Path("b.json").read_text())["n_twins"] == 0, "--no-twins trains without"
    given = tmp_path / "mine"
    given.mkdir()
    assert aivoice(run + ["--out", "c.pt", "--report", "c.json", "--twins", str(given)]) == 0
    assert list(given.iterdir()) == [] and json.loads(Path("c.json").read_text())["n_twins"] == 0, \
        "a folder given with --twins is only read"
    assert len(read_manifest(tmp_path / tiny_params.train.twins)) == len(made), "nothing was remade"


def test_training_runs_in_bf16_exactly_where_the_cpu_has_it_natively(small_corpus, tiny_params, tmp_path, caplog):
    from pipeline.core.scoring import native_bf16

    native = native_bf16(torch.device("cpu"))
    weights, logs = {}, {}
    for amp in (True, False):
        params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"cpu_amp": amp,
                                                                                                "device": "cpu"})})
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline.training.train"):
            report = bootstrap(small_corpus.root, params, tmp_path / f"{amp}.pt", tmp_path / f"{amp}.json")
        logs[amp] = caplog.text
        assert report["history"] and all(h["train_loss"] == h["train_loss"] for h in report["history"]), "finite losses"
        weights[amp] = load_checkpoint(tmp_path / f"{amp}.pt", tiny_params.audio).state_dict()
    assert ("bf16 autocast" in logs[True]) is native and "float32, channels_last" in logs[False], \
        f"train.cpu_amp on a CPU {'with' if native else 'without'} native bf16: {logs[True][-300:]}"
    differ = any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[False])
    assert differ is native, "the bf16 run's weights differ from float32's only where bf16 was used"
    saved = torch.load(tmp_path / "True.pt", weights_only=True)["state_dict"]
    assert all(t.is_contiguous() and t.dtype != torch.bfloat16 for t in saved.values()), \
        "the checkpoint holds float32 weights in the usual layout, whatever the training arithmetic"
