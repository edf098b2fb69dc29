"""The module base training steps: the detector plus what only training needs (the one-class loss's
learned human direction, the recording-chain adversary). One module, so DistributedDataParallel averages
every gradient and the weight average sees every parameter; the checkpoint keeps the detector alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.model import AI_LABEL, Detector
from pipeline.training.chain_adversary import ChainAdversary
from pipeline.training.one_class import LINEAR_OFF, OC_MARGINS, SERVE_SCALE, oc_loss


class TrainingNet(nn.Module):
    """Forward returns the heads' logits and the ai embedding.

    one_class: the ai head's loss is the one-class softmax on a learned human direction (which `sync` copies
    into the model's cosine head; the linear ai head is switched off). chain_sources > 0: a ChainAdversary
    over that many training sources is trained beside the heads, its gradient reversed into the trunk."""

    def __init__(self, model: Detector, one_class: bool, chain_sources: int = 0) -> None:
        super().__init__()
        self.model = model
        self.direction = None
        self.adversary = ChainAdversary(model.trunk.out_dim, chain_sources) if chain_sources else None
        if one_class:
            if model.cosine is None or model.meta.cosine_head.get("kind") != "ocsoftmax":
                raise ValueError("the one-class loss needs a model made with one_class_meta()")
            self.direction = nn.Parameter(F.normalize(torch.randn(model.trunk.out_dim), dim=0))
            ai = model.heads["ai"]
            with torch.no_grad():
                ai.weight.zero_()
                ai.bias.copy_(torch.tensor([LINEAR_OFF, 0.0] if AI_LABEL == 1 else [0.0, LINEAR_OFF]))
            ai.requires_grad_(False)
            model.cosine.scale.fill_(SERVE_SCALE)
            model.cosine.bias.fill_(SERVE_SCALE * sum(OC_MARGINS) / 2)   # evidence is -cosine
            self.sync()

    def forward(self, feats: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        emb = self.model.trunk(feats)   # a model in training has no ai branch
        return self.model.heads_forward(emb), emb

    def ai_loss(self, out: dict[str, torch.Tensor], emb: torch.Tensor, ai: torch.Tensor) -> torch.Tensor:
        if self.direction is None:
            return F.cross_entropy(out["ai"], ai)
        cos = F.normalize(emb.float(), dim=-1) @ F.normalize(self.direction, dim=0)
        return oc_loss(cos, ai != AI_LABEL)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the learned direction into the model's cosine head (before it scores or is saved)."""
        if self.direction is not None:
            self.model.cosine.human.copy_(F.normalize(self.direction.detach(), dim=0))
