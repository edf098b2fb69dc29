"""Fine-tuning: adapt the production model to a new generator without forgetting human speech.

Training data = the new samples' augmented copies + a replay set of stored human speech and
earlier AI speech (train split only, source-balanced random crops, augmented the same way so
that "augmented" cannot become an AI cue). The loss is class-balanced, and within the AI class
the new samples carry `new_share` of the weight: a few dozen new copies are not drowned by the
replay of generators the model already knows. By default only the `ai` head trains: the frozen
trunk's embeddings are computed once per segment and the head is trained on them. With
`train_last_block`, layer3 outputs are cached instead and layer4 trains too; the `language` and
`speakers` heads then see a changed embedding, so a distillation loss (weight `distill_weight`)
keeps their outputs on the training segments as production's.

Early stopping uses held-out speakers of the replay set and held-out copies of the new samples.
The decision threshold is calibrated on held-out human clips to `finetune.target_fpr`.
Recall on the new generator is estimated leave-one-file-out (a head trained without file f scores
f); with a single new file, its held-out augmented copies are used instead.
"""
from __future__ import annotations

import copy
import csv
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.audio import AudioError, load_audio
from pipeline.core.augment import augment_spec, augment_wave
from pipeline.config import Params
from pipeline.core.data import UNKNOWN, Clip, CorpusError, check_labels, read_corpus
from pipeline.core.features import LogMel, random_crop
from pipeline.core.metrics import compute_eer, threshold_at_fpr
from pipeline.core.model import AI_LABEL, Detector
from pipeline.core.scoring import Scorer, pick_device, score_arrays
from pipeline.training.train import load_clips

log = logging.getLogger(__name__)


@dataclass
class Segments:
    """Training segments: 3 s waves, labels, and the file each came from (for leave-one-file-out)."""

    waves: np.ndarray      # (N, seg)
    labels: np.ndarray     # (N,)
    files: np.ndarray      # (N,) sha256 or path of the source clip
    is_val: np.ndarray     # (N,) bool: held out for early stopping


def load_new_copies(augmented: Path, val_fraction: float) -> tuple[Segments, dict[str, str]]:
    """The augment stage's copies; the last val_fraction of each clip's copies are held out."""
    with (augmented / "index.csv").open(newline="") as f:
        index = list(csv.DictReader(f))
    if not index:
        raise CorpusError(f"{augmented}: no augmented copies; run the augment stage first")
    per_clip = defaultdict(int)
    for r in index:
        per_clip[r["sha256"]] += 1
    waves = np.stack([sf.read(augmented / r["file"], dtype="float32")[0] for r in index])
    is_val = np.array([int(r["copy"]) >= per_clip[r["sha256"]] * (1 - val_fraction) for r in index])
    files = np.array([r["sha256"] for r in index])
    generators = {r["sha256"]: r["generator"] for r in index}
    return Segments(waves, np.full(len(index), AI_LABEL), files, is_val), generators


def replay_segments(clips: list[Clip], n: int, params: Params, rng: np.random.Generator, is_val: bool) -> Segments:
    """n augmented random crops from these clips, each source equally likely."""
    by_source = defaultdict(list)
    for c in clips:
        by_source[c.source].append(c)
    sources = sorted(by_source)
    cache: dict[Path, np.ndarray] = {}
    waves, files = [], []
    seg, sr = params.audio.segment_samples, params.audio.sample_rate
    while len(waves) < n:
        pool = by_source[sources[int(rng.integers(len(sources)))]]
        clip = pool[int(rng.integers(len(pool)))]
        if clip.path not in cache:
            try:
                cache[clip.path] = load_audio(clip.path, params.audio)
            except AudioError as err:
                log.warning("replay: skipped %s", err)
                pool.remove(clip)
                if not pool:
                    sources.remove(clip.source)
                if not sources:
                    raise CorpusError("no usable replay clips") from None
                continue
        waves.append(augment_wave(random_crop(cache[clip.path], seg, rng), sr, params.augment, rng))
        files.append(str(clip.path))
    label = clips[0].label
    return Segments(np.stack(waves), np.full(n, label), np.array(files), np.full(n, is_val))


def concat(parts: list[Segments]) -> Segments:
    return Segments(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("waves", "labels", "files", "is_val")))


class Adapter(nn.Module):
    """The trainable part: the ai head (and layer4 when train_last_block) on cached trunk outputs.
    With layer4 it also holds frozen copies of the other heads, for the distillation loss."""

    def __init__(self, model: Detector, train_last_block: bool) -> None:
        super().__init__()
        self.layer4 = copy.deepcopy(model.trunk.layer4) if train_last_block else None
        self.dropout = copy.deepcopy(model.dropout)
        self.head = copy.deepcopy(model.heads["ai"])
        self.other_heads = None
        if train_last_block:
            self.other_heads = nn.ModuleDict({k: copy.deepcopy(h) for k, h in model.heads.items() if k != "ai"})
            self.other_heads.requires_grad_(False)

    def embed(self, cached: torch.Tensor) -> torch.Tensor:
        if self.layer4 is None:
            return cached
        return torch.flatten(F.adaptive_avg_pool2d(self.layer4(cached), 1), 1)  # cached: (B, 4w, n_mels/16, T/16)

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(cached)))  # (B, 2)


def loss_weights(labels: np.ndarray, is_new: np.ndarray, new_share: float) -> torch.Tensor:
    """Per-segment loss weights, mean 1: each class half of the total; within the AI class the new
    samples carry `new_share` (all of it when there is no earlier AI, none when there are no new ones)."""
    human = labels != AI_LABEL
    new, old = ~human & is_new, ~human & ~is_new
    share = new_share if old.any() and new.any() else float(new.any())
    w = np.zeros(len(labels))
    for mask, total in ((human, 0.5), (new, 0.5 * share), (old, 0.5 * (1 - share))):
        if mask.any():
            w[mask] = total / mask.sum()
    return torch.from_numpy(w * len(w) / w.sum()).float()


@torch.no_grad()
def teacher_outputs(model: Detector, cached: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Production's log-probabilities of the language and speakers heads on cached layer3 outputs."""
    model = model.to(device).eval()
    parts = []
    for i in range(0, len(cached), 64):
        emb = model.trunk.from_layer3(cached[i:i + 64].to(device))
        parts.append({k: F.log_softmax(h(emb), -1).cpu() for k, h in model.heads.items() if k != "ai"})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def cache_inputs(model: Detector, waves: np.ndarray, params: Params, train_last_block: bool, device, seed: int) -> torch.Tensor:
    """Frozen-trunk outputs per segment (embedding, or layer3 output), with the spectrogram part of the recipe."""
    logmel = LogMel(params.audio, params.features).to(device)
    rng = np.random.default_rng(seed)
    model = model.to(device).eval()
    frozen = model.trunk.to_layer3 if train_last_block else model.trunk
    out = []
    for i in range(0, len(waves), 64):
        x = augment_spec(logmel(torch.from_numpy(waves[i:i + 64]).to(device)), params.augment, rng)  # (B, 1, n_mels, T)
        out.append(frozen(x).cpu())
    return torch.cat(out)


def train_adapter(model: Detector, cached: torch.Tensor, seg: Segments, is_new: np.ndarray, train_mask: np.ndarray,
                  val_mask: np.ndarray, params: Params, device) -> tuple[Adapter, list[dict]]:
    """Adam on the trainable part with the weighted loss (plus distillation when layer4 trains);
    best epoch by validation EER, then validation loss."""
    cfg = params.finetune
    torch.manual_seed(cfg.seed)
    adapter = Adapter(model, cfg.train_last_block).to(device)
    opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=cfg.lr)
    y = torch.from_numpy(seg.labels).long()
    x_tr, y_tr = cached[train_mask], y[train_mask]
    x_va, y_va = cached[val_mask].to(device), y[val_mask].to(device)
    check_labels(set(y_tr.tolist()), "the fine-tuning set")
    w_tr = loss_weights(seg.labels[train_mask], is_new[train_mask], cfg.new_share)
    w_va = loss_weights(seg.labels[val_mask], is_new[val_mask], cfg.new_share).to(device)
    teacher = teacher_outputs(model, x_tr, device) if adapter.other_heads is not None and cfg.distill_weight else None
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_key, history, stale = None, (float("inf"), float("inf")), [], 0
    for epoch in range(1, cfg.epochs + 1):
        adapter.train()
        order = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            emb = adapter.embed(x_tr[idx].to(device))
            w = w_tr[idx].to(device)
            loss = (F.cross_entropy(adapter.head(adapter.dropout(emb)), y_tr[idx].to(device), reduction="none") * w).sum() / w.sum()
            if teacher is not None:
                loss = loss + cfg.distill_weight * sum(
                    F.kl_div(F.log_softmax(h(emb), -1), teacher[k][idx].to(device), reduction="batchmean", log_target=True)
                    for k, h in adapter.other_heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        adapter.eval()
        with torch.no_grad():
            logits = torch.cat([adapter(x_va[i:i + 256]) for i in range(0, len(x_va), 256)])
            val_loss = ((F.cross_entropy(logits, y_va, reduction="none") * w_va).sum() / w_va.sum()).item()
            scores = logits.softmax(-1)[:, AI_LABEL].cpu().numpy()
        eer = compute_eer(scores, y_va.cpu().numpy())[0] if len(set(y_va.tolist())) == 2 else float("nan")
        history.append({"epoch": epoch, "val_loss": val_loss, "val_eer": eer})
        key = (eer if eer == eer else 0.0, val_loss)
        if key < best_key:
            best, best_key, stale = copy.deepcopy(adapter.state_dict()), key, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    adapter.load_state_dict(best)
    return adapter.eval(), history


def merge(model: Detector, adapter: Adapter) -> Detector:
    """A new detector: the production model with the adapter's trained weights."""
    merged = copy.deepcopy(model).cpu()
    merged.heads["ai"].load_state_dict(adapter.head.state_dict())
    if adapter.layer4 is not None:
        merged.trunk.layer4.load_state_dict(adapter.layer4.state_dict())
    return merged.eval()


def replay_clips(store: Path, new_files: set[str]) -> tuple[list[Clip], list[Clip]]:
    """Train-split human and earlier-AI clips of the store (new samples excluded)."""
    clips = [c for c in read_corpus(store) if c.split != "test" and c.sha256 not in new_files]
    humans = [c for c in clips if c.label != AI_LABEL]
    if not humans:
        raise CorpusError(f"{store}: no human speech in the store's train split: fine-tuning without human "
                          "replay is refused (it would flag every human as AI); ingest human speech first")
    return humans, [c for c in clips if c.label == AI_LABEL]


def finetune(model: Detector, params: Params) -> tuple[Detector, dict]:
    """Train a candidate from the production model; return it and the report."""
    cfg = params.finetune
    device = pick_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    store, augmented = Path(params.ingest.store), Path(params.augment_stage.out)
    new, generators = load_new_copies(augmented, cfg.val_fraction)
    humans, earlier_ai = replay_clips(store, set(generators))
    h_train, h_val = _speaker_halves(humans, cfg.val_fraction, cfg.seed)
    n_h = max(cfg.replay_per_class, int((~new.is_val).sum()))
    n_ai_replay = max(cfg.replay_per_class - int((~new.is_val).sum()), 0) if earlier_ai else 0
    n_val = max(int(n_h * cfg.val_fraction), 8)
    parts = [new, replay_segments(h_train, n_h, params, rng, False), replay_segments(h_val, n_val, params, rng, True)]
    if n_ai_replay:
        a_train, a_val = _speaker_halves(earlier_ai, cfg.val_fraction, cfg.seed)
        parts += [replay_segments(a_train, n_ai_replay, params, rng, False),
                  replay_segments(a_val or a_train, max(int(n_ai_replay * cfg.val_fraction), 4), params, rng, True)]
    seg = concat(parts)
    log.info("fine-tuning on %d segments (%d new-sample copies, %d human, %d earlier AI replay)",
             int((~seg.is_val).sum()), int((~new.is_val).sum()), n_h, n_ai_replay)
    cached = cache_inputs(model, seg.waves, params, cfg.train_last_block, device, cfg.seed)
    is_new = np.isin(seg.files, list(generators))
    adapter, history = train_adapter(model, cached, seg, is_new, ~seg.is_val, seg.is_val, params, device)
    candidate = merge(model, adapter)
    lofo = _leave_one_file_out(model, cached, seg, is_new, generators, params, device)

    # calibrate on held-out humans' whole clips, scored like production traffic
    scorer = Scorer(candidate, params.audio, params.features, str(device))
    cal_waves = [it.wave for it in load_clips(h_val, params)]
    cal_scores = [s.ai_score for s in score_arrays(scorer, cal_waves, params.audio, params.detect)]
    threshold = threshold_at_fpr(cal_scores, cfg.target_fpr)
    candidate.to("cpu")
    report = {
        "segments": {"new_copies": int((~new.is_val).sum()), "human_replay": n_h, "ai_replay": n_ai_replay,
                     "validation": int(seg.is_val.sum())},
        "new_generators": sorted(set(generators.values())), "history": history,
        "best_epoch": min(history, key=lambda h: (h["val_eer"] if h["val_eer"] == h["val_eer"] else 0.0, h["val_loss"]))["epoch"],
        "calibration": {"target_fpr": cfg.target_fpr, "threshold": threshold, "n_human_clips": len(cal_scores)},
        "lofo": lofo, "trained": "ai head + layer4" if cfg.train_last_block else "ai head",
    }
    return candidate, report


def _speaker_halves(clips: list[Clip], val_fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Speaker-disjoint (train, validation) parts of one class; validation may be empty for one speaker."""
    key = lambda c: c.speaker if c.speaker != UNKNOWN else str(c.path)
    groups = sorted({key(c) for c in clips})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    n_val = int(round(len(groups) * val_fraction)) if len(groups) > 1 else 0
    val_groups = set(groups[:n_val])
    train = [c for c in clips if key(c) not in val_groups]
    val = [c for c in clips if key(c) in val_groups]
    return (train, val) if val else (clips, clips)


def _leave_one_file_out(model, cached, seg: Segments, is_new: np.ndarray, generators: dict[str, str], params: Params, device) -> dict:
    """Recall on the new generator from clips the head did not train on."""
    files = sorted(generators)
    store = Path(params.ingest.store)
    rows = {c.sha256: c for c in read_corpus(store)}
    if len(files) < 2:
        # one file: score its held-out augmented copies with the head trained on the others
        adapter, _ = train_adapter(model, cached, seg, is_new, ~seg.is_val, seg.is_val, params, device)
        mask = torch.from_numpy(seg.is_val & (seg.files == files[0]))
        with torch.no_grad():
            scores = adapter(cached[mask].to(device)).softmax(-1)[:, AI_LABEL].cpu().numpy()
        return {"method": "held-out augmented copies (only one new file)", "scores": {files[0]: float(scores.mean())}}
    scores = {}
    for f in files:
        keep = seg.files != f
        adapter, _ = train_adapter(model, cached, seg, is_new, ~seg.is_val & keep, seg.is_val & keep, params, device)
        held_out = merge(model, adapter)
        scorer = Scorer(held_out, params.audio, params.features, str(device))
        wave = load_audio(rows[f].path, params.audio)
        scores[f] = score_arrays(scorer, [wave], params.audio, params.detect)[0].ai_score
    return {"method": "leave-one-file-out", "scores": scores}
