"""One-class softmax for the ai head (Zhang, Jiang and Li, IEEE SPL 2021; `train.ai_loss: ocsoftmax`).

Cross-entropy learns a boundary between the humans and the AI generators it was shown; an unseen generator
may fall on either side. The one-class loss instead pulls every human embedding towards one learned
direction (cosine above 0.9) and pushes every AI embedding away from it (below 0.2): what is scored is
"how far from human speech", not "how close to a known generator". The trained model keeps that
direction as its cosine head (pipeline.core.model.CosineHead, kind `ocsoftmax`, no prototypes) and its
linear ai head is switched off, so every scorer reads the one-class score through softmax(ai)[1]
unchanged (pipeline.training.net.TrainingNet sets that up). Fine-tuning's `ocsoftmax` recipe fits the same loss
on a frozen trunk's embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
