"""Base training (bootstrap): trunk and all three heads from scratch on a labelled corpus.

What keeps the model off the recording chain (docs/architecture.md, "Decisions"):
- validation holds out whole sources (`train.split_by`), so the reported EER (and the epoch kept under
  `train.select: best`) is about recording chains the model has never heard, and the threshold is
  calibrated on those sources' humans; the default keeps the schedule's last epoch, because a few held-out
  sources make a noisy epoch choice (docs/benchmarks.md, 5c);
- half of every batch's human/AI pairs (`train.twin_fraction`) are a human clip and its vocoded twin
  (pipeline.synthesis), cropped at the same place and put through the same channel augmentation: the
  pair differs only in how the waveform was made;
- the other pairs draw a human and an AI clip, each class balanced over its sources; optionally
  (`train.matched_fraction`) some of them come from one training source that holds both labels (a page's
  human and its AI), through one channel;
- crops stay inside each clip's voiced region (`train.trim_silence_db`), so leading and trailing
  silence cannot be a cue; the augmentation (gain, codecs, band limits, noise; low-pass, mu-law and
  RawBoost as options) is drawn from one distribution for both labels;
- a share of two-talker mixtures (human/AI pairs only) teaches the `speakers` head;
- optionally (`train.chain_adversary`), a classifier of the training sources behind a gradient reversal
  pushes the trunk to drop what tells one recording chain from another (pipeline.training.chain_adversary).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import atomic
from pipeline.config import Params, batch_workers, params_hash
from pipeline.core.augment import apply_wave, augment_spec, augment_wave, draw_wave_params
from pipeline.core.data import (CorpusError, LoadedClip, check_two_classes, data_hash, is_placeholder_speaker, load_clips,
                                read_corpus, source_groups, split_groups)
from pipeline.core.features import FrontEnd, crop_at, draw_start, resolve_kind
from pipeline.core.metrics import compute_eer
from pipeline.core.model import Detector, new_model, save_checkpoint
from pipeline.core.scoring import native_bf16, pick_device, score_model, scoring_settings
from pipeline.progress import progress
from pipeline.synthesis.twins import with_twins
from pipeline.training.calibration import calibrate
from pipeline.training.distributed import broadcast_flag, init_from_env, local_device
from pipeline.training.evaluate import evaluate
from pipeline.training.chain_adversary import NOT_A_CHAIN, ramp
from pipeline.training.net import TrainingNet
from pipeline.training.one_class import one_class_meta

log = logging.getLogger(__name__)


class BalancedSampler:
    """Draws clips with equal weight per class, then per source within the class; and (human, twin)
    pairs, equal weight per source among the humans that have twins. `chains` lists the sources of its
    human clips: the classes of the recording-chain adversary."""

    def __init__(self, items: list[LoadedClip], rng: np.random.Generator) -> None:
        self.rng = rng
        real = [it for it in items if not it.clip.twin_of]
        self.chains = sorted({it.clip.source for it in real if it.clip.label == 0})
        check_two_classes([it.clip for it in items], "the training split")
        self.by_label: dict[int, dict[str, list[LoadedClip]]] = defaultdict(lambda: defaultdict(list))
        for it in real:
            self.by_label[it.clip.label][it.clip.source].append(it)
        twins: dict[str, list[LoadedClip]] = defaultdict(list)
        for it in items:
            if it.clip.twin_of:
                twins[it.clip.twin_of].append(it)
        if 1 not in self.by_label:   # no real AI speech: twins stand in for it
            for group in twins.values():
                for it in group:
                    self.by_label[1][it.clip.source].append(it)
        self.twins = {it.clip.sha256: twins[it.clip.sha256] for it in real if twins.get(it.clip.sha256)}
        self.twinned: dict[str, list[LoadedClip]] = defaultdict(list)
        for it in real:
            if it.clip.sha256 in self.twins:
                self.twinned[it.clip.source].append(it)
        ai_sources = {it.clip.source for it in real if it.clip.label == 1}
        self.matched = sorted(src for src in self.by_label[0] if src in ai_sources)   # twins aside

    def _pick(self, pools: dict[str, list[LoadedClip]]) -> LoadedClip:
        src = sorted(pools)[int(self.rng.integers(len(pools)))]
        return pools[src][int(self.rng.integers(len(pools[src])))]

    def draw(self, label: int) -> LoadedClip:
        return self._pick(self.by_label[label])

    def draw_pair(self) -> tuple[LoadedClip, LoadedClip]:
        human = self._pick(self.twinned)
        twins = self.twins[human.clip.sha256]
        return human, twins[int(self.rng.integers(len(twins)))]

    def draw_matched(self) -> tuple[LoadedClip, LoadedClip]:
        """A human and an AI clip of one source that holds both labels, sources equally weighted."""
        src = self.matched[int(self.rng.integers(len(self.matched)))]
        pick = lambda pool: pool[int(self.rng.integers(len(pool)))]
        return pick(self.by_label[0][src]), pick(self.by_label[1][src])

    def partner(self, first: LoadedClip) -> LoadedClip | None:
        """Another clip of the same class by a different talker, for a two-talker mixture."""
        for _ in range(8):
            other = self.draw(first.clip.label)
            same = other.clip.path == first.clip.path or (
                not is_placeholder_speaker(first.clip.speaker) and other.clip.speaker == first.clip.speaker)
            if not same:
                return other
        return None


def voiced_crop(item: LoadedClip, seg: int, rng: np.random.Generator, region: tuple[int, int] | None = None,
                start: int | None = None) -> tuple[np.ndarray, int]:
    """A seg-sample crop inside the clip's voiced region (or `region`), at `start` when given; returns it and
    the start, so a twin can be cropped at the same place."""
    lo, hi = region or item.voiced
    voiced = item.wave[lo:hi]
    start = draw_start(len(voiced), seg, rng) if start is None else min(start, max(len(voiced) - 1, 0))
    return crop_at(voiced, start, seg), start


def _pair_rows(sampler: BalancedSampler, params: Params, rng: np.random.Generator) -> list[tuple[np.ndarray, LoadedClip, bool]]:
    """One human/AI pair of a batch: (wave, clip, several talkers) for each of its two rows."""
    cfg, seg, sr = params.train, params.audio.segment_samples, params.audio.sample_rate
    sampler.rng = rng
    if sampler.twins and rng.random() < cfg.twin_fraction:
        human, twin = sampler.draw_pair()
        x, start = voiced_crop(human, seg, rng)
        y, _ = voiced_crop(twin, seg, rng, region=human.voiced, start=start)   # same words, same place
        channel = draw_wave_params(cfg.augment, rng)                         # same channel for both
        return [(apply_wave(x, sr, channel), human, False), (apply_wave(y, sr, channel), twin, False)]
    if cfg.matched_fraction and sampler.matched and rng.random() < cfg.matched_fraction:
        human, ai = sampler.draw_matched()
        channel = draw_wave_params(cfg.augment, rng)                         # one channel for the pair
        return [(apply_wave(voiced_crop(it, seg, rng)[0], sr, channel), it, it.clip.n_speakers > 1)
                for it in (human, ai)]
    rows = []
    for label in (0, 1):
        item = sampler.draw(label)
        x, _ = voiced_crop(item, seg, rng)
        several = item.clip.n_speakers > 1
        if rng.random() < cfg.mixture_fraction and (other := sampler.partner(item)) is not None:
            y, _ = voiced_crop(other, seg, rng)
            gain = 10 ** (rng.uniform(-6, 6) / 20) * (np.std(x) + 1e-8) / (np.std(y) + 1e-8)
            x, several = x + gain * y, True
        rows.append((augment_wave(x, sr, cfg.augment, rng), item, several))
    return rows


def _chain(item: LoadedClip, several: bool, chains: list[str]) -> int:
    """The row's recording chain for the adversary: a human clip's or its twin's source, else NOT_A_CHAIN."""
    human_chain = item.clip.label == 0 or item.clip.twin_of
    return chains.index(item.clip.source) if human_chain and not several and item.clip.source in chains else NOT_A_CHAIN


def _tensors(rows: list[tuple[np.ndarray, LoadedClip, bool]], languages: list[str], chains: list[str]):
    waves = np.stack([w.astype(np.float32) for w, _, _ in rows])
    ai = [it.clip.label for _, it, _ in rows]
    lang = [languages.index(it.clip.language) if it.clip.language in languages else -100 for _, it, _ in rows]
    spk = [int(several or it.clip.n_speakers > 1) for _, it, several in rows]
    chain = [_chain(it, several, chains) for _, it, several in rows]
    t = torch.tensor
    return torch.from_numpy(waves), t(ai), t(lang), t(spk), t(chain)


def make_batch(sampler: BalancedSampler, params: Params, languages: list[str], rng: np.random.Generator):
    """(waves (B, seg), ai labels, language labels (-100 = unknown), speakers labels, chain labels
    (NOT_A_CHAIN = none)), all pairs from one rng."""
    rows = [row for _ in range(max(params.train.batch_size // 2, 1)) for row in _pair_rows(sampler, params, rng)]
    return _tensors(rows, languages, sampler.chains)


def make_shard(sampler: BalancedSampler, params: Params, languages: list[str], step: int, rank: int = 0,
               world: int = 1, front_end: FrontEnd | None = None):
    """This rank's share of step `step`'s global batch of train.batch_size rows: the pairs k with
    k % world == rank, pair k drawn (clips, crops, augmentation, then its rows' SpecAugment) from its
    own generator seeded (train.seed, step, k). So every process count draws the same global batch,
    and N ranks train on the schedule of one. Returns make_batch's tensors and one generator per row;
    with a (CPU) `front_end`, the waves are already its training features and the generators None."""
    pairs = [k for k in range(max(params.train.batch_size // 2, 1)) if k % world == rank]
    rows, rngs = [], []
    for k in pairs:
        rng = np.random.default_rng((params.train.seed, step, k))
        got = _pair_rows(sampler, params, rng)
        rows += got
        rngs += [rng] * len(got)
    waves, *labels = _tensors(rows, languages, sampler.chains)
    if front_end is None:
        return waves, *labels, rngs
    with one_thread():   # the same bits in a batch worker (one thread) and here
        return training_features(front_end, waves, rngs, params), *labels, None


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (a reduction's bits can depend on the thread count), as before after."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class _Shards(torch.utils.data.Dataset):
    """Step s's shard (make_shard) as item s: a function of the step alone, so worker processes can make
    the next ones while the model trains on this one, and the batches are the same with or without them."""

    def __init__(self, sampler: BalancedSampler, params: Params, languages: list[str], rank: int, world: int,
                 total: int, front_end: FrontEnd | None) -> None:
        self.sampler, self.params, self.languages, self.rank, self.world, self.total, self.front_end = \
            sampler, params, languages, rank, world, total, front_end

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int):
        return make_shard(self.sampler, self.params, self.languages, step, self.rank, self.world, self.front_end)


def _as_is(item):
    return item


def shard_stream(sampler: BalancedSampler, params: Params, languages: list[str], total: int, rank: int = 0,
                 world: int = 1, workers: int = 0, front_end: FrontEnd | None = None):
    """make_shard's output for steps 0..total-1 in order, made `workers` processes ahead (forked: they
    share the decoded clips) or, with 0, in this process when asked for."""
    if workers == 0:
        return (make_shard(sampler, params, languages, step, rank, world, front_end) for step in range(total))
    loader = torch.utils.data.DataLoader(_Shards(sampler, params, languages, rank, world, total, front_end), batch_size=None,
                                         shuffle=False, num_workers=workers, collate_fn=_as_is, prefetch_factor=2,
                                         multiprocessing_context="fork",
                                         generator=torch.Generator())   # not torch's global one: dropout draws from it
    return iter(loader)


def multitask_loss(net: TrainingNet, out: dict[str, torch.Tensor], emb: torch.Tensor, ai, lang, spk, chain=None,
                   reversal: float = 0.0) -> torch.Tensor:
    """The ai head's loss (train.ai_loss) + half the speakers' and the language's cross-entropy + the chain
    adversary's cross-entropy (its gradient into the trunk reversed, times `reversal`), when there is one."""
    loss = net.ai_loss(out, emb, ai) + 0.5 * F.cross_entropy(out["speakers"], spk)
    if chain is not None and net.adversary is not None:
        loss = loss + net.adversary.loss(emb, chain, reversal)
    if (lang >= 0).any():
        loss = loss + 0.5 * F.cross_entropy(out["language"], lang, ignore_index=-100)
    return loss


def validation_scores(model: Detector, items: list[LoadedClip], params: Params, device: str) -> list[float]:
    scores = [s.ai_score for s in score_model(model, [it.wave for it in items], params, device)]
    model.train()
    return scores


class WeightAverage:
    """Running mean of a model's parameters over training steps (stochastic weight averaging, taken every
    step as SWAD does): the mean of the weights a schedule passes through sits in a flatter region of
    the loss, which transfers better to domains the training never saw (Izmailov et al. 2018; Cha et al.,
    NeurIPS 2021). Batch-norm statistics do not average; `into` recomputes them on training batches."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.mean = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.count = 1

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        self.count += 1
        for n, p in model.named_parameters():
            self.mean[n].lerp_(p.detach(), 1.0 / self.count)

    @torch.no_grad()
    def into(self, model: torch.nn.Module, batches) -> torch.nn.Module:
        """Load the mean into `model` and recompute its batch-norm statistics on `batches` (inputs)."""
        for n, p in model.named_parameters():
            p.copy_(self.mean[n])
        torch.optim.swa_utils.update_bn(batches, model)
        return model


class EarlyStopping:
    """train.select best: the epoch of lowest validation EER, stopping after `patience` epochs without a
    better one (bench/select_eer.py replays the same rule on recorded EERs)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_eer, self.stale = patience, float("inf"), 0

    def improved(self, eer: float) -> bool:
        """Record one epoch's EER; True when it is the best so far."""
        if eer < self.best_eer:
            self.best_eer, self.stale = eer, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.stale >= self.patience


def choose_front_end(params: Params, train: list[LoadedClip], log_choice: bool = True) -> tuple[Params, dict]:
    """Params with `features.kind: auto` made concrete from the human training clips (resolve_kind), and
    what was measured; other kinds come back unchanged."""
    humans = [it.wave for it in train if it.clip.label == 0 and not it.clip.twin_of]
    feats, choice = resolve_kind(params.features, humans, params.audio.sample_rate)
    if log_choice and "human_edge_khz" in choice:
        log.info("front end: %s (features.kind auto: the median human training clip ends at %.1f kHz; "
                 "linear_bands from %.0f kHz)", choice["kind"], choice["human_edge_khz"], choice["wideband_from_khz"])
    return params.model_copy(update={"features": feats}), choice


def train_model(train: list[LoadedClip], val: list[LoadedClip], params: Params) -> tuple[Detector | None, list[dict]]:
    """Train from scratch; return the best-on-validation-EER model (train.select best), the last epoch's
    (select last) or the mean of the weights over the schedule's tail (select swa, WeightAverage), and the
    per-epoch history (with swa, the last row also holds the averaged model's `swa_val_eer`).

    Under torchrun (pipeline.training.distributed) every rank trains a DistributedDataParallel replica
    on its share of each global batch (make_shard); rank 0 alone validates, decides early stopping for
    all, and gets the model back; the other ranks get (None, [])."""
    cfg = params.train
    rank, world = init_from_env()
    params, _ = choose_front_end(params, train, log_choice=rank == 0)
    torch.manual_seed(cfg.seed)
    device = local_device(pick_device(cfg.device))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    languages = sorted({it.clip.language for it in train} - {"unknown"}) or ["unknown"]
    one_class = cfg.ai_loss == "ocsoftmax"
    model = new_model(languages, params.audio, params.features, params.model.base_width, params.model.dropout,
                      cosine_head=one_class_meta() if one_class else None)
    sampler = BalancedSampler(train, np.random.default_rng(cfg.seed))
    adversary = cfg.chain_adversary > 0 and len(sampler.chains) > 1
    net = TrainingNet(model, one_class, len(sampler.chains) if adversary else 0).to(device)
    if cfg.chain_adversary > 0 and rank == 0:
        log.info("chain adversary: %s", f"{len(sampler.chains)} human sources, strength {cfg.chain_adversary}"
                 if adversary else "off (the training split holds humans of one source only)")
    if rank:
        torch.manual_seed(cfg.seed + 1000 * rank)   # dropout masks of its own (the weights are rank 0's)
    use_amp = (cfg.amp if device.type == "cuda" else cfg.cpu_amp) and native_bf16(device)   # benchmarks 5n
    channels_last = cfg.channels_last or use_amp or device.type == "cuda"   # the convolution kernels' fast layout
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        params = params.model_copy(update={"train": cfg.model_copy(update={"batch_size": cfg.gpu_batch_size})})
    step_model = net if world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        step_model = torch.compile(step_model)
    front_end = FrontEnd(params.audio, params.features).to(device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch)
    val_labels = [it.clip.label for it in val]
    if rank == 0:
        log.info("training arithmetic: %s%s", "bf16 autocast" if use_amp else "float32",
                 ", channels_last" if channels_last else "")
    best, history, early = None, [], EarlyStopping(cfg.patience)
    average, average_from = None, int(cfg.swa_start * cfg.epochs * cfg.steps_per_epoch)
    workers = batch_workers(params, world, auto=2)   # making a batch takes longer than the model's step (5n)
    if rank == 0:
        log.info("batch workers: %d per training process (compute.batch_workers: %s)", workers,
                 params.compute.batch_workers)
    # on a CPU the spectrograms are made with the batch, ahead, by the batch workers; on a GPU here, on it
    shards = shard_stream(sampler, params, languages, cfg.epochs * cfg.steps_per_epoch, rank, world, workers,
                          front_end if device.type == "cpu" else None)
    started = time.monotonic()
    epochs = progress(range(1, cfg.epochs + 1), desc="train", unit="epoch", leave=True, when=rank == 0)
    for epoch in epochs:
        model.train()
        losses, epoch_started = [], time.monotonic()
        bar = progress(range(cfg.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", when=rank == 0)
        for i in bar:
            step = (epoch - 1) * cfg.steps_per_epoch + i
            *batch, rngs = next(shards)   # this step's shard
            x, ai, lang, spk, chain = (t.to(device) for t in batch)
            feats = x if rngs is None else training_features(front_end, x, rngs, params)
            if channels_last:
                feats = feats.contiguous(memory_format=torch.channels_last)
            reversal = ramp(step / (cfg.epochs * cfg.steps_per_epoch), cfg.chain_adversary)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = multitask_loss(net, *step_model(feats), ai, lang, spk, chain, reversal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if cfg.select == "swa" and rank == 0 and step >= average_from:
                if average is None:
                    average = WeightAverage(net)
                else:
                    average.add(net)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        stop, train_s = False, time.monotonic() - epoch_started
        if rank == 0:
            net.sync()
            eer, _ = compute_eer(validation_scores(model, val, params, str(device)), val_labels)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_eer": eer,
                            "wall_s": round(time.monotonic() - started, 1), "train_s": round(train_s, 2),
                            "segments_per_s": round(cfg.steps_per_epoch * params.train.batch_size / train_s, 2),
                            "processes": world})
            log.info("epoch %d: train loss %.4f (rank 0 of %d), validation EER %.4f", epoch, np.mean(losses), world, eer)
            epochs.set_postfix(loss=f"{np.mean(losses):.3f}", val_eer=f"{eer:.3f}")
            if cfg.select == "last" and epoch == cfg.epochs:   # OneCycle ends at a small learning rate
                best = copy.deepcopy(model.state_dict())
            elif cfg.select == "best" and early.improved(eer):
                best = copy.deepcopy(model.state_dict())
            elif cfg.select == "best" and early.stop:
                log.info("early stop: no better validation EER for %d epochs", early.stale)
                stop = True
        if broadcast_flag(stop):
            break
    epochs.close()
    del shards   # stops the batch workers (an early stop leaves batches unmade)
    if rank:
        return None, []
    if cfg.select == "swa":
        total = cfg.epochs * cfg.steps_per_epoch   # batch-norm statistics on fresh training batches
        shards = (make_shard(sampler, params, languages, total + i) for i in range(SWA_BN_BATCHES))
        batches = [training_features(front_end, waves.to(device), rngs, params) for waves, *_, rngs in shards]
        average.into(net, batches)
        net.sync()
        eer, _ = compute_eer(validation_scores(model, val, params, str(device)), val_labels)
        history[-1] |= {"swa_val_eer": eer, "swa_steps": average.count}
        log.info("weights averaged over the last %d steps: validation EER %.4f", average.count, eer)
    else:
        model.load_state_dict(best)
    return model.to("cpu", memory_format=torch.contiguous_format).eval(), history


def selected_val_eer(history: list[dict], select: str) -> float:
    """The validation EER of the model train_model kept under `train.select`."""
    if select == "swa":
        return history[-1]["swa_val_eer"]
    return history[-1]["val_eer"] if select == "last" else min(h["val_eer"] for h in history)


SWA_BN_BATCHES = 16   # batches that re-estimate the averaged model's batch-norm statistics


def training_features(front_end: FrontEnd, waves: torch.Tensor, rngs: list, params: Params) -> torch.Tensor:
    """Waves as the model sees them in training: log-mel, then each row's SpecAugment from its own
    generator; (B, 1, bins, T)."""
    return torch.stack([augment_spec(f, params.train.augment, r) for f, r in zip(front_end(waves), rngs)])


def training_clips(corpus: str | Path, params: Params, twins: str | Path | None = None) -> list:
    """The corpus's clips outside its test split, plus the vocoded twins of its humans (train.twins, or
    `twins`), if that folder exists."""
    clips = [c for c in read_corpus(corpus) if c.split != "test"]   # a store's test split is never trained on
    clips = with_twins(clips, params.train.twins if twins is None else twins)
    check_two_classes([c for c in clips if not c.twin_of], f"corpus {corpus}")
    return clips


def split_for_training(clips: list, params: Params) -> tuple[list, list, str]:
    """(train, validation, how it was split) by `train.split_by`; validation keeps real clips only (twins
    are training data), unless that would leave it without AI speech. When whole sources cannot give
    validation both classes (one AI source, say), it falls back to speakers, then files, and says so."""
    cfg = params.train
    order: list[str] = ["source", "speaker", "file"]
    for how in order[order.index(cfg.split_by):]:
        try:
            train, val = split_groups(clips, cfg.val_fraction, cfg.seed, how, source_groups(cfg.linked_sources))
            break
        except CorpusError as err:
            if how == "file":
                raise
            log.warning("%s; validating on held-out %ss instead (the validation EER then says less about unheard "
                        "recording chains)", err, order[order.index(how) + 1])
    real = [c for c in val if not c.twin_of]
    return train, (real if {c.label for c in real} == {0, 1} else val), how


def bootstrap(corpus: str | Path, params: Params, out: str | Path | None = None, report: str | Path | None = None,
              twins: str | Path | None = None) -> dict:
    """Train a base model on a corpus folder, calibrate its threshold on the validation humans, save the
    checkpoint and a JSON report; return the report."""
    out, report = Path(out or params.train.out), Path(report or params.train.report)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose another --out (models are never overwritten)")
    started = time.time()
    clips = training_clips(corpus, params, twins)
    train_clips, val_clips, split_by = split_for_training(clips, params)
    loaded = load_clips(train_clips + val_clips, params)
    in_val = {c.path for c in val_clips}
    train = [it for it in loaded if it.clip.path not in in_val]
    val = [it for it in loaded if it.clip.path in in_val]
    check_two_classes([it.clip for it in val], "the validation split")
    n_twins = sum(1 for it in train if it.clip.twin_of)
    log.info("training on %d clips (%d of them vocoded twins), validating on %d (split by %s)", len(train), n_twins,
             len(val), split_by)
    trained_with, front_end = choose_front_end(params, train, log_choice=not init_from_env()[0])
    model, history = train_model(train, val, trained_with)
    if model is None:   # a rank other than 0 under torchrun: rank 0 calibrates, saves and reports
        return {}
    scores = validation_scores(model, val, params, "cpu")
    calibration = calibrate([s for s, it in zip(scores, val) if it.clip.label == 0], params.calibration,
                            {it.clip.source for it in val if it.clip.label == 0})
    metrics = evaluate([it.clip for it in val], scores, calibration["threshold"])
    dhash = data_hash([it.clip for it in loaded])
    save_checkpoint(model, out, threshold=calibration["threshold"], threshold_scoring=scoring_settings(params), data_hash=dhash, params_hash=params_hash(params),
                    notes={"corpus": str(corpus), "val_eer": metrics["overall"]["eer"], "trained_clips": len(train),
                           "twins": n_twins, "split_by": split_by, "calibration": calibration, "front_end": front_end,
                           "ai_loss": params.train.ai_loss, "chain_adversary": params.train.chain_adversary,
                           "val_sources": sorted({it.clip.source for it in val})})
    result = {
        "checkpoint": str(out), "corpus": str(corpus), "data_hash": dhash, "params_hash": params_hash(params),
        "n_train": len(train), "n_twins": n_twins, "n_val": len(val), "split_by": split_by, "front_end": front_end,
        "ai_loss": params.train.ai_loss, "chain_adversary": params.train.chain_adversary, "val_sources": sorted({it.clip.source for it in val}),
        "skipped": sorted(str(c.path) for c in train_clips + val_clips if c.path not in {it.clip.path for it in loaded}),
        "languages": list(model.meta.languages), "history": history, "calibration": calibration, "validation": metrics,
        "val_scores": [{"path": str(it.clip.path), "label": it.clip.label_name, "generator": it.clip.generator,
                        "source": it.clip.source, "ai_score": round(s, 6)} for it, s in zip(val, scores)],
        "wall_s": round(time.time() - started, 1),
    }
    atomic.write_text(report, json.dumps(result, indent=2, default=float))
    return result
