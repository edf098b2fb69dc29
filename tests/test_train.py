"""Base training on real speech: speaker-disjoint, reported per generator and source, deterministic on CPU."""
import pytest
import torch

from pipeline.core.data import CorpusError
from pipeline.core.model import load_checkpoint
from pipeline.training.train import bootstrap

pytestmark = pytest.mark.integration


def test_bootstrap_reports_and_is_deterministic(small_corpus, tiny_params, tmp_path):
    first = bootstrap(small_corpus.root, tiny_params, tmp_path / "a.pt", tmp_path / "a.json")
    second = bootstrap(small_corpus.root, tiny_params, tmp_path / "b.pt", tmp_path / "b.json")
    a = load_checkpoint(tmp_path / "a.pt", tiny_params.audio).state_dict()
    b = load_checkpoint(tmp_path / "b.pt", tiny_params.audio).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "same data, params and seed give bit-identical weights on CPU"
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
