"""A recording-chain adversary for base training (`train.chain_adversary`; Ganin and Lempitsky, ICML 2015).

Base models learn *where* a clip was recorded (leave-sources-out EER far above in-corpus EER,
docs/benchmarks.md section 5). This small classifier learns to tell the training sources apart from the
trunk's embedding of every clip that carries a human recording's chain (the humans and their vocoded
twins, which keep their original's source); a gradient-reversal layer hands the trunk the opposite of its
gradient, so the trunk is pushed to drop what distinguishes one recording chain from another. Only chain
information is targeted: the classifier never sees a label, and each source holds both labels through
its twins. Training-only: it is not saved in the checkpoint and costs nothing at scoring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NOT_A_CHAIN = -100   # rows the adversary ignores: AI speech from a generator's own source, two-talker mixtures
HIDDEN = 128


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Identity forward; the gradient times -strength backward."""
    return _Reverse.apply(x, strength)


def ramp(progress: float, strength: float) -> float:
    """DANN's schedule: 0 at the start, rising smoothly to `strength`, so the adversary first learns what the
    chains look like before the trunk is pushed away from them."""
    return strength * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class ChainAdversary(nn.Module):
    """Two-layer classifier of the training sources from the embedding, behind a gradient reversal."""

    def __init__(self, dim: int, n_sources: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_sources))

    def loss(self, emb: torch.Tensor, source: torch.Tensor, strength: float) -> torch.Tensor:
        """Its cross-entropy on the rows that carry a human chain (0 when a batch has none)."""
        keep = source != NOT_A_CHAIN
        if not keep.any():   # still a graph through every parameter: DistributedDataParallel expects their gradients
            return sum(p.sum() for p in self.parameters()) * 0.0 + emb.sum() * 0.0
        return F.cross_entropy(self.net(reverse_gradient(emb[keep].float(), strength)), source[keep])
