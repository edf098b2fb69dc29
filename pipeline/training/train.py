"""Base training (bootstrap): trunk and all three heads from scratch on a labelled corpus.

Batches are class-balanced and source-balanced (half human, half AI; within a class each source is
equally likely), built from random 3 s crops with channel augmentation and a share of synthesized
two-talker mixtures for the `speakers` head. The checkpoint kept is the one with the best
validation EER on a speaker- and file-disjoint split.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.audio import AudioError, load_audio
from pipeline.core.augment import augment_spec, augment_wave
from pipeline.config import Params, params_hash
from pipeline.core.data import UNKNOWN, Clip, check_two_classes, data_hash, read_corpus, split_by_speaker
from pipeline.training.evaluate import evaluate
from pipeline.core.features import LogMel, random_crop
from pipeline.core.metrics import compute_eer
from pipeline.core.model import Detector, new_model, save_checkpoint
from pipeline.core.scoring import Scorer, pick_device, score_arrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedClip:
    clip: Clip
    wave: np.ndarray  # mono float32 at the model's rate


def load_clips(clips: list[Clip], params: Params) -> list[LoadedClip]:
    """Decode every clip; a bad file is reported in one line and left out, the rest go on."""
    loaded = []
    for c in tqdm(clips, desc="decode", unit="clip", disable=None, leave=False):
        try:
            loaded.append(LoadedClip(c, load_audio(c.path, params.audio)))
        except AudioError as err:
            log.warning("skipped %s", err)
    return loaded


class BalancedSampler:
    """Draws clips with equal weight per class, then per source within the class."""

    def __init__(self, items: list[LoadedClip], rng: np.random.Generator) -> None:
        self.rng = rng
        self.by_label: dict[int, dict[str, list[LoadedClip]]] = defaultdict(lambda: defaultdict(list))
        for it in items:
            self.by_label[it.clip.label][it.clip.source].append(it)
        check_two_classes([it.clip for it in items], "the training split")

    def draw(self, label: int) -> LoadedClip:
        sources = self.by_label[label]
        src = sorted(sources)[int(self.rng.integers(len(sources)))]
        return sources[src][int(self.rng.integers(len(sources[src])))]

    def partner(self, first: LoadedClip) -> LoadedClip | None:
        """Another clip of the same class by a different talker, for a two-talker mixture."""
        for _ in range(8):
            other = self.draw(first.clip.label)
            same = other.clip.path == first.clip.path or (
                first.clip.speaker != UNKNOWN and other.clip.speaker == first.clip.speaker)
            if not same:
                return other
        return None


def make_batch(sampler: BalancedSampler, params: Params, languages: list[str], rng: np.random.Generator):
    """(waves (B, seg), ai labels, language labels (-100 = unknown), speakers labels)."""
    seg, sr = params.audio.segment_samples, params.audio.sample_rate
    waves, ai, lang, spk = [], [], [], []
    for i in range(params.train.batch_size):
        item = sampler.draw(i % 2)
        x = random_crop(item.wave, seg, rng)
        several = item.clip.n_speakers > 1
        if rng.random() < params.train.mixture_fraction and (other := sampler.partner(item)) is not None:
            y = random_crop(other.wave, seg, rng)
            gain = 10 ** (rng.uniform(-6, 6) / 20) * (np.std(x) + 1e-8) / (np.std(y) + 1e-8)
            x, several = x + gain * y, True
        x = augment_wave(x, sr, params.train.augment, rng)
        waves.append(x.astype(np.float32))
        ai.append(item.clip.label)
        lang.append(languages.index(item.clip.language) if item.clip.language in languages else -100)
        spk.append(int(several))
    t = torch.tensor
    return torch.from_numpy(np.stack(waves)), t(ai), t(lang), t(spk)


def multitask_loss(out: dict[str, torch.Tensor], ai, lang, spk) -> torch.Tensor:
    loss = F.cross_entropy(out["ai"], ai) + 0.5 * F.cross_entropy(out["speakers"], spk)
    if (lang >= 0).any():
        loss = loss + 0.5 * F.cross_entropy(out["language"], lang, ignore_index=-100)
    return loss


def validation_scores(model: Detector, items: list[LoadedClip], params: Params, device: str) -> list[float]:
    scorer = Scorer(model, params.audio, params.features, device)
    scores = [s.ai_score for s in score_arrays(scorer, (it.wave for it in items), params.audio, params.detect)]
    model.train()
    return scores


def train_model(train: list[LoadedClip], val: list[LoadedClip], params: Params) -> tuple[Detector, list[dict]]:
    """Train from scratch; return the best-on-validation-EER model and the per-epoch history."""
    cfg = params.train
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    languages = sorted({it.clip.language for it in train} - {UNKNOWN}) or [UNKNOWN]
    model = new_model(languages, params.audio, params.features, params.model.base_width, params.model.dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    logmel = LogMel(params.audio, params.features).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch)
    sampler = BalancedSampler(train, rng)
    val_labels = [it.clip.label for it in val]
    use_amp = cfg.amp and device.type == "cuda"
    best, best_eer, history, stale = None, float("inf"), [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        bar = tqdm(range(cfg.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=None, leave=False)
        for _ in bar:
            waves, ai, lang, spk = (t.to(device) for t in make_batch(sampler, params, languages, rng))
            feats = augment_spec(logmel(waves), params.train.augment, rng)  # (B, 1, n_mels, T)
            if device.type == "cuda":
                feats = feats.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = multitask_loss(model(feats), ai, lang, spk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        eer, _ = compute_eer(validation_scores(model, val, params, str(device)), val_labels)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_eer": eer})
        log.info("epoch %d: train loss %.4f, validation EER %.4f", epoch, np.mean(losses), eer)
        if eer < best_eer:
            best, best_eer, stale = copy.deepcopy(model.state_dict()), eer, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop: no better validation EER for %d epochs", stale)
                break
    model.load_state_dict(best)
    return model.to("cpu").eval(), history


def bootstrap(corpus: str | Path, params: Params, out: str | Path | None = None, report: str | Path | None = None) -> dict:
    """Train a base model on a corpus folder; save the checkpoint and a JSON report; return the report."""
    out, report = Path(out or params.train.out), Path(report or params.train.report)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose another --out (models are never overwritten)")
    started = time.time()
    clips = [c for c in read_corpus(corpus) if c.split != "test"]   # a store's test split is never trained on
    check_two_classes(clips, f"corpus {corpus}")
    train_clips, val_clips = split_by_speaker(clips, params.train.val_fraction, params.train.seed)
    loaded = load_clips(train_clips + val_clips, params)
    kept, in_train = {it.clip.path for it in loaded}, set(train_clips)
    train = [it for it in loaded if it.clip in in_train]
    val = [it for it in loaded if it.clip not in in_train]
    check_two_classes([it.clip for it in val], "the validation split")
    log.info("training on %d clips, validating on %d (speaker-disjoint)", len(train), len(val))
    model, history = train_model(train, val, params)
    scores = validation_scores(model, val, params, "cpu")
    metrics = evaluate([it.clip for it in val], scores, model.meta.threshold)
    dhash = data_hash([it.clip for it in loaded])
    save_checkpoint(model, out, data_hash=dhash, params_hash=params_hash(params),
                    notes={"corpus": str(corpus), "val_eer": metrics["overall"]["eer"], "trained_clips": len(train)})
    result = {
        "checkpoint": str(out), "corpus": str(corpus), "data_hash": dhash, "params_hash": params_hash(params),
        "n_train": len(train), "n_val": len(val), "skipped": sorted(str(c.path) for c in clips if c.path not in kept),
        "languages": list(model.meta.languages), "history": history, "validation": metrics,
        "val_scores": [{"path": str(it.clip.path), "label": it.clip.label_name, "generator": it.clip.generator,
                        "source": it.clip.source, "ai_score": round(s, 6)} for it, s in zip(val, scores)],
        "wall_s": round(time.time() - started, 1),
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2, default=float))
    return result
