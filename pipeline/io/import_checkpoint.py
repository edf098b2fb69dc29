"""Adopt a foreign checkpoint of the production architecture (a plain ResNet18 multitask state_dict).

Trunk keys are matched by torchvision's resnet18 names after stripping wrapper prefixes
(`module.`, `model.`, `backbone.` ...); head keys by the head they name (`ai`/`spoof`/`fake`,
`lang`/`language`, `speaker`). Every key is accounted for: anything left over, missing or of the
wrong shape is reported and the import refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Params
from pipeline.core.model import CheckpointError, Detector, ModelMeta

WRAPPERS = ("module.", "model.", "net.", "backbone.", "encoder.", "resnet.", "trunk.")
TRUNK = re.compile(r"^(conv1|bn1|layer[1-4])\.")
HEAD_WORDS = {"ai": ("ai", "spoof", "fake", "synthetic"), "language": ("lang", "language"), "speakers": ("speaker", "speakers", "spk")}


@dataclass
class ImportReport:
    mapped: dict[str, str] = field(default_factory=dict)      # source key -> our key
    unexpected: list[str] = field(default_factory=list)       # source keys we could not place
    missing: list[str] = field(default_factory=list)          # our keys with no source
    shape_mismatch: list[str] = field(default_factory=list)   # "key: theirs vs ours"

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)

    def describe(self) -> str:
        lines = [f"mapped {len(self.mapped)} tensors"]
        for name in ("unexpected", "missing", "shape_mismatch"):
            items = getattr(self, name)
            if items:
                lines.append(f"{name.replace('_', ' ')} ({len(items)}): " + ", ".join(items))
        return "\n".join(lines)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a plain state_dict or one nested under a common key."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({str(exc).splitlines()[0][:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found")
    return blob


def _stored_languages(path: Path) -> list[str] | None:
    """The language names an aivoice checkpoint carries in its metadata (None for a plain state_dict)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta") if isinstance(blob, dict) else None
    return list(meta["languages"]) if isinstance(meta, dict) and "languages" in meta else None


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in WRAPPERS:
            if key.startswith(w):
                key, changed = key[len(w):], True
    return key


def _head_of(key: str) -> str | None:
    tokens = set(re.split(r"[._\-]", key.lower())[:-1])
    found = [h for h, words in HEAD_WORDS.items() if tokens & set(words)]
    return found[0] if len(found) == 1 else None


def map_keys(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Place each source tensor on one of our keys; report what does not fit."""
    rep, placed = ImportReport(), {}
    for key, tensor in source.items():
        bare = _strip(key)
        if TRUNK.match(bare):
            ours = f"trunk.{bare}"
        elif (head := _head_of(bare)) is not None and bare.rsplit(".", 1)[-1] in ("weight", "bias"):
            ours = f"heads.{head}.{bare.rsplit('.', 1)[-1]}"
        else:
            rep.unexpected.append(key)
            continue
        if ours not in target or ours in placed:
            rep.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target[ours].shape):
            rep.shape_mismatch.append(f"{key}: {tuple(tensor.shape)} vs {ours} {tuple(target[ours].shape)}")
        else:
            placed[ours] = tensor
            rep.mapped[key] = ours
    rep.missing = [k for k in target if k not in placed and not k.endswith("num_batches_tracked")]
    return placed, rep


def import_checkpoint(path: str | Path, params: Params, languages: list[str] | None = None) -> tuple[Detector, ImportReport]:
    """Build a Detector from a foreign state_dict; raise CheckpointError with the full report on any mismatch."""
    path = Path(path)
    source = read_state_dict(path)
    if languages is None:
        languages = _stored_languages(path)
    conv1 = next((v for k, v in source.items() if _strip(k) == "conv1.weight"), None)
    if conv1 is None or conv1.dim() != 4 or conv1.shape[1] != 1:
        raise CheckpointError(f"{path}: no 1-channel ResNet conv1.weight found; not this architecture")
    n_lang = next((v.shape[0] for k, v in source.items() if _head_of(_strip(k)) == "language" and k.endswith("weight")), 1)
    if languages is None:
        languages = ["en"] if n_lang == 1 else [f"lang{i}" for i in range(n_lang)]
    if len(languages) != n_lang:
        raise CheckpointError(f"{path}: language head has {n_lang} classes but {len(languages)} language names were given")
    meta = ModelMeta(languages=tuple(languages), audio=params.audio.model_dump(),
                     features=params.features.without_auto().model_dump(),
                     base_width=int(conv1.shape[0]), dropout=params.model.dropout, notes={"imported_from": str(path)})
    model = Detector(meta)
    placed, report = map_keys(source, model.state_dict())
    if not report.ok:
        raise CheckpointError(f"{path}: does not match the detector architecture\n{report.describe()}")
    model.load_state_dict(placed, strict=False)
    return model.eval(), report
