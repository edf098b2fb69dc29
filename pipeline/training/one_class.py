"""One-class softmax for the ai head (Zhang, Jiang and Li, IEEE SPL 2021; `train.ai_loss: ocsoftmax`).

Cross-entropy learns a boundary between the humans and the AI generators it was shown; an unseen generator
may fall on either side. The one-class loss instead pulls every human embedding towards one learned
direction (cosine above 0.9) and pushes every AI embedding away from it (below 0.2): what is scored is
"how far from human speech", not "how close to a known generator". The trained model keeps that
direction as its cosine head (pipeline.core.model.CosineHead, kind `ocsoftmax`, no prototypes) and its
linear ai head is switched off, so every scorer reads the one-class score through softmax(ai)[1]
unchanged. Fine-tuning's `ocsoftmax` recipe fits the same loss on a frozen trunk's embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.model import AI_LABEL, Detector

OC_MARGINS, OC_ALPHA = (0.9, 0.2), 20.0   # human cosine above 0.9, AI below 0.2 (Zhang et al. 2021)
SERVE_SCALE = 5.0   # the cosine head's sigmoid slope: 0.5 at the margins' midpoint, no saturation over [-1, 1]
LINEAR_OFF = 20.0   # the switched-off linear ai head's logit margin: its AI probability 2e-9 never wins the max


def oc_loss(cos: torch.Tensor, is_human: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The one-class softmax loss on cosines to the human direction (weighted sum, or mean without weights)."""
    margin = torch.where(is_human, OC_MARGINS[0] - cos, cos - OC_MARGINS[1])
    loss = F.softplus(OC_ALPHA * margin)
    return loss.mean() if weight is None else (loss * weight).sum()


def one_class_meta() -> dict:
    """ModelMeta.cosine_head of a model trained with the one-class loss."""
    return {"kind": "ocsoftmax", "generators": [], "n_prototypes": 0}


class TrainingNet(nn.Module):
    """The detector being trained plus, with the one-class loss, its learned human direction: one module,
    so DistributedDataParallel and the weight average see both. Forward returns the heads' logits and the
    ai embedding."""

    def __init__(self, model: Detector, one_class: bool) -> None:
        super().__init__()
        self.model = model
        self.direction = None
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
