"""The detector: ResNet18 trunk on log-mel segments with heads `ai`, `language` and `speakers`.

Layer names follow torchvision's resnet18 (conv1, bn1, layer1..layer4), so production checkpoints
built on it map onto `trunk.*` directly. A checkpoint file is a plain dict
{"format", "state_dict", "meta"} that loads with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

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

    def check_compatible(self, audio: AudioConfig, feats: FeatureConfig, source: str) -> None:
        """Refuse a checkpoint trained on other audio/feature settings than the configured ones."""
        for name, theirs, ours in (("audio", self.audio, audio.model_dump()), ("features", self.features, feats.model_dump())):
            diff = {k: (theirs.get(k), v) for k, v in ours.items() if k in _MODEL_INPUT_KEYS and theirs.get(k) != v}
            if diff:
                detail = ", ".join(f"{name}.{k}: checkpoint {a!r} vs params {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"{source}: checkpoint was trained with other input settings ({detail})")


_MODEL_INPUT_KEYS = {"sample_rate", "segment_s", "n_mels", "n_fft", "win_length", "hop_length", "f_min", "f_max", "log_floor"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or does not fit the configuration."""


class Detector(nn.Module):
    """Trunk + three heads; forward returns logits per head."""

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

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return self.trunk(feats)  # (B, D)

    def heads_forward(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.dropout(emb)
        return {name: head(emb) for name, head in self.heads.items()}

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_forward(self.embed(feats))


def save_checkpoint(model: Detector, path: str | Path, **meta_updates) -> Path:
    """Write state_dict + metadata; existing files are never overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose another path (models are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = asdict(model.meta) | meta_updates
    meta["languages"] = list(meta["languages"])
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, audio: AudioConfig | None = None, feats: FeatureConfig | None = None,
                    map_location: str | torch.device = "cpu") -> Detector:
    """Load a checkpoint written by save_checkpoint (weights_only=True) and check it fits the config."""
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
    if audio is not None and feats is not None:
        meta.check_compatible(audio, feats, str(path))
    model = Detector(meta)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def new_model(languages: list[str], audio: AudioConfig, feats: FeatureConfig, base_width: int, dropout: float) -> Detector:
    """A freshly initialised detector for the given configuration."""
    meta = ModelMeta(languages=tuple(languages), audio=audio.model_dump(), features=feats.model_dump(),
                     base_width=base_width, dropout=dropout)
    return Detector(meta)
