"""The recording-chain adversary of base training (train.chain_adversary): which rows it learns from, that
its gradient reaches the trunk reversed and scaled, and that without it training is unchanged."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AudioConfig, FeatureConfig, load_params
from pipeline.core.data import Clip, LoadedClip
from pipeline.core.model import new_model
from pipeline.training.chain_adversary import NOT_A_CHAIN, ramp, reverse_gradient
from pipeline.training.net import TrainingNet
from pipeline.training.train import BalancedSampler, make_batch, multitask_loss
from conftest import make_speech_like


def _net(chain_sources: int) -> TrainingNet:
    torch.manual_seed(0)
    model = new_model(["en"], AudioConfig(), FeatureConfig(n_mels=16), base_width=4, dropout=0.0)
    return TrainingNet(model, one_class=False, chain_sources=chain_sources)


def test_reverse_gradient_is_the_identity_forward_and_minus_strength_backward():
    x = torch.randn(5, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(5.0))


def test_the_reversal_ramps_from_zero_to_its_strength():
    assert ramp(0.0, 0.5) == 0.0
    assert ramp(0.1, 0.5) < ramp(0.5, 0.5) < ramp(1.0, 0.5) <= 0.5
    assert ramp(1.0, 0.5) == pytest.approx(0.5, abs=1e-4)


def test_the_trunk_gets_the_adversary_gradient_reversed_and_the_adversary_its_own():
    net = _net(chain_sources=3)
    feats, chain = torch.randn(4, 1, 16, 40), torch.tensor([0, 2, NOT_A_CHAIN, 1])
    # when: the adversary's loss is back-propagated with a reversal of 0.4, and plainly (the trunk helping it)
    _, emb = net(feats)
    net.adversary.loss(emb, chain, 0.4).backward()
    reversed_trunk = net.model.trunk.conv1.weight.grad.clone()
    reversed_adv = net.adversary.net[0].weight.grad.clone()
    net.zero_grad()
    _, emb = net(feats)
    F.cross_entropy(net.adversary.net(emb[chain != NOT_A_CHAIN]), chain[chain != NOT_A_CHAIN]).backward()
    # then: the adversary learns as it would alone; the trunk is pushed the other way, scaled by the reversal
    assert torch.allclose(net.adversary.net[0].weight.grad, reversed_adv)
    assert torch.allclose(reversed_trunk, -0.4 * net.model.trunk.conv1.weight.grad, rtol=1e-4, atol=1e-6)
    assert reversed_trunk.abs().sum() > 0


def test_rows_without_a_human_chain_are_ignored_but_the_graph_reaches_every_adversary_weight():
    net = _net(chain_sources=2)
    _, emb = net(torch.randn(2, 1, 16, 40))
    loss = net.adversary.loss(emb, torch.tensor([NOT_A_CHAIN, NOT_A_CHAIN]), 0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in net.adversary.parameters())


def test_without_an_adversary_the_loss_is_the_heads_alone():
    net = _net(chain_sources=0)
    out, emb = net(torch.randn(4, 1, 16, 40))
    ai, lang, spk = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, -100, 0]), torch.tensor([0, 0, 1, 0])
    plain = multitask_loss(net, out, emb, ai, lang, spk)
    assert net.adversary is None
    assert torch.equal(multitask_loss(net, out, emb, ai, lang, spk, torch.tensor([0, 1, 0, 1]), 0.5), plain)


def test_batches_name_the_chain_of_humans_and_their_twins_only():
    params = load_params("/nonexistent", overrides={"train.twin_fraction": 0.5, "train.mixture_fraction": 0.0,
                                                     "train.batch_size": 32})
    wave = make_speech_like(4.0, 24000, seed=3)
    human = LoadedClip(Clip(Path("h.wav"), 0, "human", "s", "en", "phone", sha256="h"), wave, (0, len(wave)))
    other = LoadedClip(Clip(Path("o.wav"), 0, "human", "s3", "en", "studio", sha256="o"), wave * 0.7, (0, len(wave)))
    twin = LoadedClip(Clip(Path("t.flac"), 1, "twin-x", "s", "en", "phone", sha256="t", twin_of="h"), wave * 0.5,
                      (0, len(wave)))
    tts = LoadedClip(Clip(Path("a.wav"), 1, "tts", "s2", "en", "ttspage"), wave * 0.3, (0, len(wave)))
    sampler = BalancedSampler([human, other, twin, tts], np.random.default_rng(0))
    assert sampler.chains == ["phone", "studio"], "the chains are the human clips' sources"
    _, ai, _, _, chain = make_batch(sampler, params, ["en"], np.random.default_rng(1))
    # every human and every twin row names its source; AI speech of a generator's own page names none
    assert set(chain[ai == 0].tolist()) <= {0, 1} and len(set(chain[ai == 0].tolist())) == 2
    twin_rows = [i for i in range(0, len(ai), 2) if chain[i + 1] != NOT_A_CHAIN]
    tts_rows = (ai == 1) & (chain == NOT_A_CHAIN)
    assert twin_rows and tts_rows.any(), "the batch holds both twins and real AI"
    assert all(chain[i + 1] == 0 for i in twin_rows), "a twin carries its original's chain (phone)"


@pytest.mark.parametrize("human_sources, expected", [(["phone"], "off (the training split holds humans of one source"),
                                                     (["phone", "studio"], "2 human sources, strength 0.5")])
def test_training_says_whether_the_adversary_runs(human_sources, expected, caplog):
    from pipeline.training.train import train_model

    params = load_params("/nonexistent", overrides={
        "model.base_width": 4, "train.epochs": 1, "train.steps_per_epoch": 1, "train.batch_size": 4,
        "train.chain_adversary": 0.5, "compute.batch_workers": 0, "features.kind": "mel"})

    def clip(name, label, source, seed):
        wave = make_speech_like(3.5, 24000, seed=seed)
        return LoadedClip(Clip(Path(f"{name}.wav"), label, "human" if label == 0 else "tts", name, "en", source,
                               sha256=name), wave, (0, len(wave)))

    humans = [clip(f"h{i}", 0, src, i) for i, src in enumerate(human_sources * 2)]
    train = humans + [clip("a0", 1, "ttspage", 10), clip("a1", 1, "ttspage", 11)]
    val = [clip("vh", 0, "other", 20), clip("va", 1, "ttspage2", 21)]
    with caplog.at_level("INFO", logger="pipeline.training.train"):
        model, history = train_model(train, val, params)
    assert model is not None and len(history) == 1
    assert any(r.message.startswith("chain adversary: ") and expected in r.message for r in caplog.records)
