"""The detector: ResNet18 trunk on log-mel segments with heads `ai`, `language` and `speakers`.

Layer names follow torchvision's resnet18 (conv1, bn1, layer1..layer4), so production checkpoints
built on it map onto `trunk.*` directly. A checkpoint file is a plain dict
{"format", "state_dict", "meta"} that loads with `torch.load(..., weights_only=True)`.

A fine-tuned model may carry a `CosineHead` (meta.cosine_head): evidence from directions in the
embedding space (prototypes of generators learned from a few clips, or an OC-softmax human direction).
Its probability and the linear `ai` head's are combined by taking the larger, and returned as the
`ai` logits, so everything that scores a model (softmax(ai)[1]) works unchanged.

A model fine-tuned by the `last_block` recipe carries its own copy of layer4 for the `ai` head
(meta.ai_branch "layer4", weights `ai_layer4.*`): the `language` and `speakers` heads keep reading the
layer4 they were trained with, so a retrain for a new generator cannot change what they say.
"""
from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import atomic
from pipeline.config import AudioConfig, FeatureConfig

CHECKPOINT_FORMAT = "aivoice-checkpoint/1"
ARCHITECTURE = "resnet18-multitask"
AI_LABEL = 1          # index of "ai" in the ai head; 0 is human. Defined here only.
SPEAKER_CLASSES = ("single", "several")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Trunk(nn.Module):
    """(B, 1, n_mels, T) -> (B, 8 * width) embedding."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, width * 2, width * 4, width * 8]
        c_in = width
        for i, c in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)))
            c_in = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def to_layer3(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, n_mels/4, T/4)
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 4w, n_mels/16, T/16)

    def from_layer3(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.layer4(x)), 1)  # layer4: (B, 8w, n_mels/32, T/32) -> (B, 8w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_layer3(self.to_layer3(x))


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use a checkpoint correctly, saved inside it."""

    languages: tuple[str, ...]
    audio: dict
    features: dict
    base_width: int = 64
    dropout: float = 0.2
    threshold: float = 0.5
    architecture: str = ARCHITECTURE
    data_hash: str = ""
    params_hash: str = ""
    notes: dict = field(default_factory=dict)
    cosine_head: dict = field(default_factory=dict)   # {"kind", "generators", "n_prototypes"} when present
    threshold_scoring: dict = field(default_factory=dict)   # the scoring settings `threshold` was calibrated
    # with (pipeline.core.scoring.scoring_settings); empty for an uncalibrated or older checkpoint
    ai_branch: str = ""   # "layer4": the ai head (and cosine head) read their own layer4 (`ai_layer4`); "": shared

    def feature_config(self) -> FeatureConfig:
        """The front end this model was trained with (keys an older checkpoint lacks take the defaults,
        which are the production front end's behaviour)."""
        return FeatureConfig.model_validate({k: v for k, v in self.features.items() if k in FeatureConfig.model_fields})

    def check_compatible(self, audio: AudioConfig, source: str) -> None:
        """Refuse a checkpoint that expects audio decoded at another rate or cut into other segments.
        (Spectrogram settings need no check: scoring uses the model's own, `feature_config`.)"""
        theirs = self.audio
        diff = {k: (theirs.get(k), v) for k, v in audio.model_dump().items() if k in _DECODE_KEYS and theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"audio.{k}: checkpoint {a!r} vs params {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{source}: checkpoint was trained on other audio ({detail})")


_DECODE_KEYS = {"sample_rate", "segment_s"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or does not fit the configuration."""


class CosineHead(nn.Module):
    """AI probability from the embedding's direction: evidence s = max_k cos(e, p_k) - cos(e, h) (prototypes
    p_k of generators; h the human centroid, or a learned human direction with no prototypes), mapped by
    sigmoid(scale * s + bias). Buffers only: it is set by fine-tuning, not by gradient steps of other heads."""

    def __init__(self, dim: int, n_prototypes: int) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(n_prototypes, dim))
        self.register_buffer("human", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def evidence(self, emb: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb, dim=-1)  # (B, D)
        s = -(e @ F.normalize(self.human, dim=0))
        if len(self.prototypes):
            s = s + (e @ F.normalize(self.prototypes, dim=-1).T).max(-1).values
        return s  # (B,)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * self.evidence(emb) + self.bias)


class Detector(nn.Module):
    """Trunk + three heads (+ an optional cosine head, + an optional ai branch); forward returns logits per head."""

    def __init__(self, meta: ModelMeta) -> None:
        super().__init__()
        self.meta = meta
        self.trunk = ResNet18Trunk(meta.base_width)
        self.dropout = nn.Dropout(meta.dropout)
        d = self.trunk.out_dim
        self.heads = nn.ModuleDict({
            "ai": nn.Linear(d, 2),
            "language": nn.Linear(d, max(1, len(meta.languages))),
            "speakers": nn.Linear(d, len(SPEAKER_CLASSES)),
        })
        self.cosine = CosineHead(d, meta.cosine_head.get("n_prototypes", 0)) if meta.cosine_head else None
        if meta.ai_branch not in ("", "layer4"):
            raise CheckpointError(f"unknown ai_branch {meta.ai_branch!r} (expected '' or 'layer4')")
        self.ai_layer4 = copy.deepcopy(self.trunk.layer4) if meta.ai_branch == "layer4" else None

    def ai_layer4_or_shared(self) -> nn.Module:
        """The layer4 the ai head reads: its own copy when the model has one, else the trunk's."""
        return self.trunk.layer4 if self.ai_layer4 is None else self.ai_layer4

    def embeddings_from_layer3(self, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared, ai) embeddings from layer3's output: what the language/speakers heads read and what the
        ai (and cosine) head reads; the same tensor when the model has no ai branch."""
        shared = self.trunk.from_layer3(x3)
        if self.ai_layer4 is None:
            return shared, shared
        return shared, torch.flatten(self.trunk.avgpool(self.ai_layer4(x3)), 1)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """The ai head's embedding (B, D): prototypes and cosine heads live in this space."""
        if self.ai_layer4 is None:
            return self.trunk(feats)
        return self.embeddings_from_layer3(self.trunk.to_layer3(feats))[1]

    def heads_forward(self, emb: torch.Tensor, ai_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dropped = self.dropout(emb)
        ai_dropped = dropped if ai_emb is None else self.dropout(ai_emb)
        ai_emb = emb if ai_emb is None else ai_emb
        out = {name: head(ai_dropped if name == "ai" else dropped) for name, head in self.heads.items()}
        if self.cosine is not None:
            p = torch.maximum(out["ai"].softmax(-1)[:, AI_LABEL], self.cosine(ai_emb)).clamp(1e-7, 1 - 1e-7)
            out["ai"] = torch.stack([torch.log1p(-p), torch.log(p)], -1) if AI_LABEL == 1 else \
                torch.stack([torch.log(p), torch.log1p(-p)], -1)
        return out

    def forward_from_layer3(self, x3: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's logits from layer3's output (windows whose frozen part was computed once)."""
        shared, ai = self.embeddings_from_layer3(x3)
        return self.heads_forward(shared, None if self.ai_layer4 is None else ai)   # no branch: one dropout draw

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_from_layer3(self.trunk.to_layer3(feats))

    def with_ai_branch(self) -> "Detector":
        """A copy whose ai head reads its own layer4, initialised as the shared one (itself if it has one)."""
        if self.ai_layer4 is not None:
            return copy.deepcopy(self)
        forked = Detector(dataclasses.replace(self.meta, ai_branch="layer4"))
        forked.load_state_dict(self.state_dict() | {f"ai_layer4.{k}": v for k, v in self.trunk.layer4.state_dict().items()})
        return forked.to(next(self.parameters()).device).train(self.training)


def save_checkpoint(model: Detector, path: str | Path, **meta_updates) -> Path:
    """Write state_dict + metadata; existing files are never overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose another path (models are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = asdict(model.meta) | meta_updates
    meta["languages"] = list(meta["languages"])
    return write_torch({"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "meta": meta}, path)


def write_torch(obj: dict, path: Path) -> Path:
    """torch.save `obj` to `path` atomically, with bytes that depend on the content only. (torch.save to a
    file names the archive's records after that file - here a random temporary name - so the same weights
    would hash differently on every write; a clone re-training the same candidate must get the same sha256.)"""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def load_checkpoint(path: str | Path, audio: AudioConfig | None = None,
                    map_location: str | torch.device = "cpu") -> Detector:
    """Load a checkpoint written by save_checkpoint (weights_only=True) and check it fits the audio config."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a loadable checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an aivoice checkpoint; adopt a foreign one with `aivoice import-checkpoint`")
    raw = dict(blob["meta"])
    raw["languages"] = tuple(raw["languages"])
    meta = ModelMeta(**raw)
    if audio is not None:
        meta.check_compatible(audio, str(path))
    model = Detector(meta)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def new_model(languages: list[str], audio: AudioConfig, feats: FeatureConfig, base_width: int, dropout: float,
              cosine_head: dict | None = None) -> Detector:
    """A freshly initialised detector for the given configuration (training resolves `features.kind: auto`
    from its audio first; here, with no audio, auto means the production mel); `cosine_head` for a model
    trained with the one-class loss (pipeline.training.one_class)."""
    meta = ModelMeta(languages=tuple(languages), audio=audio.model_dump(), features=feats.without_auto().model_dump(),
                     base_width=base_width, dropout=dropout, cosine_head=cosine_head or {})
    return Detector(meta)
