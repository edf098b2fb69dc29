"""train.select swa: the running mean of the weights, and batch-norm statistics re-estimated for it."""
import torch

from pipeline.config import load_params
from pipeline.core.model import new_model
from pipeline.training.train import WeightAverage, selected_val_eer


def _model(seed: int):
    params = load_params("/nonexistent/params.yaml")  # the defaults
    torch.manual_seed(seed)
    return new_model(["en"], params.audio, params.features, base_width=4, dropout=0.0)


def test_weight_average_is_the_mean_of_the_weights_it_saw():
    a, b, c = _model(0), _model(1), _model(2)
    average = WeightAverage(a)
    average.add(b)
    average.add(c)
    target = _model(3)
    batches = [torch.randn(4, 1, 80, 101) for _ in range(3)]
    average.into(target, batches)
    for (name, p), pa, pb, pc in zip(target.named_parameters(), a.parameters(), b.parameters(), c.parameters()):
        assert torch.allclose(p, (pa + pb + pc) / 3, atol=1e-6), f"{name}: the mean of the three models"
    assert average.count == 3


def test_batch_norm_statistics_are_those_of_the_given_batches():
    # given: an averaged model whose stem batch norm was never run on data
    model = _model(0)
    stem = model.trunk
    before = stem.bn1.running_mean.clone()
    batches = [torch.randn(4, 1, 80, 101) * 3 + 1 for _ in range(3)]
    WeightAverage(model).into(model, batches)
    # then: the stem's running mean is the per-channel mean of conv1's output over all batches
    with torch.no_grad():
        expected = torch.cat([stem.conv1(x) for x in batches]).mean(dim=(0, 2, 3))
    assert not torch.allclose(before, expected)
    assert torch.allclose(stem.bn1.running_mean, expected, atol=1e-4), "re-estimated on the batches given"


def test_selected_val_eer_follows_the_selection():
    history = [{"val_eer": 0.2}, {"val_eer": 0.1}, {"val_eer": 0.3, "swa_val_eer": 0.15}]
    assert selected_val_eer(history, "best") == 0.1
    assert selected_val_eer(history, "last") == 0.3
    assert selected_val_eer(history, "swa") == 0.15
