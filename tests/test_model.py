"""Model shapes, checkpoint round trip and refusals, and adopting a foreign production checkpoint."""
import pytest
import torch

from pipeline.config import load_params
from pipeline.io.import_checkpoint import import_checkpoint
from pipeline.core.scoring import Scorer
from pipeline.core.model import CheckpointError, load_checkpoint, new_model, save_checkpoint


class Evil:
    """An arbitrary pickled object: must not load under weights_only=True."""


@pytest.fixture(scope="module")
def params():
    return load_params("/nonexistent/params.yaml")  # the defaults


def test_forward_shapes(params):
    model = new_model(["en", "fr"], params.audio, params.features, base_width=8, dropout=0.0).eval()
    out = model(torch.randn(3, 1, params.features.n_mels, 301))
    assert out["ai"].shape == (3, 2), "ai head: human / ai"
    assert out["language"].shape == (3, 2), "language head has one class per language"
    assert out["speakers"].shape == (3, 2), "speakers head: single / several"


def test_full_width_matches_production_size(params):
    model = new_model(["en"], params.audio, params.features, base_width=64, dropout=0.2)
    n = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < n < 11.3e6, f"ResNet18 with three heads has ~11.2 M parameters (44 MB), got {n}"


def test_checkpoint_round_trip_and_never_overwrites(params, tmp_path):
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", threshold=0.42)
    loaded = load_checkpoint(path, params.audio)
    x = torch.randn(2, 1, 80, 301)
    assert torch.equal(model(x)["ai"], loaded(x)["ai"]), "a reloaded checkpoint must predict identically"
    assert loaded.meta.threshold == 0.42, "metadata travels with the weights"
    with pytest.raises(FileExistsError):
        save_checkpoint(model, path)


def test_the_ai_branch_changes_the_ai_head_only_and_survives_a_round_trip(params, tmp_path):
    # given: a model, and its copy whose ai head reads its own layer4
    model = new_model(["en", "fr"], params.audio, params.features, base_width=8, dropout=0.0).eval()
    forked = model.with_ai_branch().eval()
    x = torch.randn(3, 1, 80, 301)
    with torch.no_grad():
        before, same = model(x), forked(x)
        assert all(torch.allclose(before[k], same[k], atol=1e-6) for k in before), "the fork starts as the model"
        # when: the branch's weights change
        for p in forked.ai_layer4.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        after = forked(x)
    # then: only the ai head's output moves; language and speakers are the model's, bit for bit
    assert not torch.allclose(after["ai"], before["ai"]), "the ai head reads the branch"
    assert torch.equal(after["language"], before["language"]) and torch.equal(after["speakers"], before["speakers"])
    assert forked.meta.ai_branch == "layer4" and model.ai_layer4 is None
    loaded = load_checkpoint(save_checkpoint(forked, tmp_path / "f.pt"), params.audio)
    with torch.no_grad():
        again = loaded(x)
    assert all(torch.equal(again[k], after[k]) for k in after), "a reloaded fork predicts identically"
    assert torch.equal(loaded.embed(x), forked.embed(x)), "embed is the ai head's embedding"


def test_the_same_model_saved_twice_has_the_same_bytes(params, tmp_path):
    # (a clone that re-trains the same candidate must see the same sha256: the registry and dvc.lock key on it)
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
    a = save_checkpoint(model, tmp_path / "a" / "candidate.pt", threshold=0.4)
    b = save_checkpoint(model, tmp_path / "b" / "other-name.pt", threshold=0.4)
    assert a.read_bytes() == b.read_bytes()


def test_checkpoint_scores_with_its_own_front_end(params, tmp_path):
    # given: a model trained with 80 mel bins, and params that now ask new models for 64 and a linear front end
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
    path = save_checkpoint(model, tmp_path / "m.pt")
    other = load_params("/nonexistent", overrides={"features.n_mels": 64, "features.kind": "linear"})
    # when: it is loaded and scores under the new params
    loaded = load_checkpoint(path, other.audio)
    scorer = Scorer(loaded, other.audio, "cpu")
    # then: it still sees the 80-bin mel it was trained on
    assert loaded.meta.feature_config() == params.features, "the checkpoint records its front end"
    assert scorer.front_end(torch.zeros(1, other.audio.segment_samples) + 0.1).shape[2] == 80, "scoring uses it"


def test_checkpoint_with_other_audio_is_refused(params, tmp_path):
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
    path = save_checkpoint(model, tmp_path / "m.pt")
    other = load_params("/nonexistent", overrides={"audio.sample_rate": 16000})
    with pytest.raises(CheckpointError, match="audio.sample_rate"):
        load_checkpoint(path, other.audio)


def test_older_checkpoint_meta_gets_the_production_front_end(params, tmp_path):
    # a checkpoint written before features.kind/normalize existed: its meta lacks both keys
    model = new_model(["en"], params.audio, params.features, base_width=8, dropout=0.0)
    legacy = {k: v for k, v in params.features.model_dump().items() if k not in ("kind", "normalize")}
    path = save_checkpoint(model, tmp_path / "old.pt", features=legacy)
    cfg = load_checkpoint(path).meta.feature_config()
    assert (cfg.kind, cfg.normalize) == ("mel", "none"), "missing keys mean the production log-mel"


def test_garbage_and_pickled_objects_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)

    torch.save({"format": "x", "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def _production_like_state_dict(params, head_names=("fc_ai", "fc_lang", "fc_speakers"), prefix="module.backbone."):
    """A state_dict laid out like a torchvision-based production model with its own head names."""
    model = new_model(["en", "fr", "de"], params.audio, params.features, base_width=16, dropout=0.0)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("trunk."):
            sd[prefix + k[len("trunk."):]] = v.clone()
        else:
            head, _, leaf = k[len("heads."):].partition(".")
            new = dict(zip(("ai", "language", "speakers"), head_names))[head]
            sd[f"{new}.{leaf}"] = v.clone()
    return model, sd


def test_import_foreign_state_dict(params, tmp_path):
    original, sd = _production_like_state_dict(params)
    torch.save(sd, tmp_path / "multitask_English.pt")
    model, report = import_checkpoint(tmp_path / "multitask_English.pt", params, ["en", "fr", "de"])
    assert report.ok and len(report.mapped) == len(sd), report.describe()
    x = torch.randn(2, 1, 80, 301)
    original.eval()
    assert torch.allclose(original(x)["ai"], model(x)["ai"]), "imported model must predict like the original"
    assert model.meta.base_width == 16 and model.meta.languages == ("en", "fr", "de")


def test_auto_front_end_means_production_mel_for_models_not_trained_here(params, tmp_path):
    # given params with features.kind auto (chosen from the training audio, which an import has none of)
    auto = params.model_copy(update={"features": params.features.model_copy(update={"kind": "auto"})})
    _, sd = _production_like_state_dict(params)
    torch.save(sd, tmp_path / "multitask_English.pt")
    # then an imported production checkpoint and an untrained model both record the production mel
    imported, _ = import_checkpoint(tmp_path / "multitask_English.pt", auto, ["en", "fr", "de"])
    fresh = new_model(["en"], auto.audio, auto.features, base_width=8, dropout=0.0)
    assert imported.meta.feature_config().kind == fresh.meta.feature_config().kind == "mel"
    assert fresh.meta.feature_config() == params.features.model_copy(update={"kind": "mel"}), "only the kind changes"


def test_import_reports_every_mismatch(params, tmp_path):
    _, sd = _production_like_state_dict(params)
    sd["extra_branch.weight"] = torch.zeros(3)
    sd["fc_ai.weight"] = torch.zeros(3, 128)          # wrong shape: 3 classes
    del sd["module.backbone.layer4.1.conv2.weight"]   # missing tensor
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(tmp_path / "bad.pt", params, ["en", "fr", "de"])
    msg = str(err.value)
    assert "extra_branch.weight" in msg, "unexpected keys are named"
    assert "fc_ai.weight" in msg and "(3, 128)" in msg, "shape mismatches show both shapes"
    assert "trunk.layer4.1.conv2.weight" in msg, "missing tensors are named"


def test_import_needs_the_architecture(params, tmp_path):
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="conv1"):
        import_checkpoint(tmp_path / "other.pt", params)


def test_a_scorer_lays_weights_out_channels_last_only_when_asked(params):
    conv = lambda m: m.trunk.layer1[0].conv2.weight
    training = new_model(["en"], params.audio, params.features, 8, 0.0).to(memory_format=torch.channels_last)
    Scorer(training, params.audio, "cpu")   # validation between a bootstrap's epochs
    assert conv(training).is_contiguous(memory_format=torch.channels_last) and not conv(training).is_contiguous(), \
        "scoring a model that trains on leaves its layout as it is"
    plain = new_model(["en"], params.audio, params.features, 8, 0.0)
    Scorer(plain, params.audio, "cpu")
    assert conv(plain).is_contiguous(), "and a default-layout model keeps its own"
    Scorer(plain, params.audio, "cpu", channels_last=True)
    assert not conv(plain).is_contiguous(), "detect and serve lay it out channels_last"
