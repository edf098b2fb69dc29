"""The one-class softmax ai loss of base training (train.ai_loss: ocsoftmax): what it pulls and pushes, and
that the model scores by the direction it learnt, through the same softmax(ai)[1] as every other model."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AudioConfig, FeatureConfig
from pipeline.core.model import AI_LABEL, load_checkpoint, new_model, save_checkpoint
from pipeline.training.net import TrainingNet
from pipeline.training.one_class import OC_MARGINS, one_class_meta, oc_loss


def _model(one_class: bool = True):
    torch.manual_seed(0)
    return new_model(["en"], AudioConfig(), FeatureConfig(n_mels=16), base_width=4, dropout=0.0,
                     cosine_head=one_class_meta() if one_class else None)


def test_oc_loss_is_small_inside_the_margins_and_large_outside():
    humans = torch.tensor([True, True, False, False])
    inside = torch.tensor([0.95, 0.97, 0.05, -0.3])    # humans above 0.9, AI below 0.2
    outside = torch.tensor([0.05, -0.3, 0.95, 0.97])   # the same cosines, labels swapped
    assert oc_loss(inside, humans) < 0.2
    assert oc_loss(outside, humans) > 10
    # weights: only the weighted samples count
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert oc_loss(outside, humans, w) == pytest.approx(F.softplus(torch.tensor(20 * (OC_MARGINS[0] - 0.05))).item())


def test_one_class_model_scores_by_its_learnt_direction_and_its_linear_ai_head_is_off():
    model = _model()
    net = TrainingNet(model, one_class=True)
    assert not any(p.requires_grad for p in model.heads["ai"].parameters()), "the linear ai head does not train"
    feats = torch.randn(6, 1, 16, 40)
    out, emb = net(feats)
    cos = F.normalize(emb, dim=-1) @ F.normalize(net.direction, dim=0)
    expected = torch.sigmoid(model.cosine.scale * -cos + model.cosine.bias)
    assert torch.allclose(out["ai"].softmax(-1)[:, AI_LABEL], expected, atol=1e-5), \
        "softmax(ai)[1] is the one-class score (the switched-off linear head never wins the max)"
    mid = sum(OC_MARGINS) / 2
    assert torch.sigmoid(model.cosine.scale * -mid + model.cosine.bias).item() == pytest.approx(0.5), \
        "0.5 sits midway between the human and AI margins"
    # a gradient step moves the direction and the trunk, and the model only sees the direction on sync
    before = model.cosine.human.clone()
    loss = net.ai_loss(out, emb, torch.tensor([0, 0, 0, 1, 1, 1]))
    loss.backward()
    assert net.direction.grad is not None and model.trunk.conv1.weight.grad is not None
    with torch.no_grad():
        net.direction.add_(torch.randn_like(net.direction))
    assert torch.equal(model.cosine.human, before)
    net.sync()
    assert torch.allclose(model.cosine.human, F.normalize(net.direction.detach(), dim=0))


def test_training_with_the_one_class_loss_separates_and_survives_a_checkpoint(tmp_path):
    # given: two kinds of input that differ in their spectra (a stand-in for human and AI segments)
    torch.manual_seed(1)
    model = _model()
    net = TrainingNet(model, one_class=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    human = torch.randn(16, 1, 16, 40)
    ai = torch.randn(16, 1, 16, 40) + torch.linspace(-1, 1, 16).view(1, 1, 16, 1)
    feats, labels = torch.cat([human, ai]), torch.tensor([0] * 16 + [1] * 16)
    first = None
    for _ in range(60):
        out, emb = net(feats)
        loss = net.ai_loss(out, emb, labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2, f"the one-class loss falls ({first:.2f} -> {loss.item():.2f})"
    net.sync()
    model.eval()
    with torch.no_grad():
        p = model(feats)["ai"].softmax(-1)[:, AI_LABEL]
    assert p[16:].min() > p[:16].max(), "after training every AI input scores above every human one"
    # when: saved and loaded the way every scorer loads a model
    save_checkpoint(model, tmp_path / "oc.pt")
    loaded = load_checkpoint(tmp_path / "oc.pt")
    assert loaded.meta.cosine_head["kind"] == "ocsoftmax"
    with torch.no_grad():
        q = loaded(feats)["ai"].softmax(-1)[:, AI_LABEL]
    assert torch.allclose(p, q, atol=1e-6), "the checkpoint carries the direction, scale and bias"


def test_cross_entropy_training_net_is_the_plain_detector():
    model = _model(one_class=False)
    net = TrainingNet(model, one_class=False)
    assert net.direction is None and model.cosine is None
    assert all(p.requires_grad for p in model.heads["ai"].parameters())
    feats, labels = torch.randn(4, 1, 16, 40), torch.tensor([0, 1, 0, 1])
    out, emb = net(feats)
    assert torch.equal(net.ai_loss(out, emb, labels), F.cross_entropy(out["ai"], labels))
    with pytest.raises(ValueError, match="one_class_meta"):
        TrainingNet(model, one_class=True)
