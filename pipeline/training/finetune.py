"""Fine-tuning: a candidate that catches a new generator from a few clips without flagging humans.

Data. The new samples' augmented copies (augment stage), and a replay set of stored speech from every
source (train split only, source-balanced random crops, augmented the same way, so that "augmented"
cannot become an AI cue): humans and earlier AI generators, with the vocoded twins of those humans
counted as earlier AI (`replay_twins`), as the base saw them. The train split's humans are split by
speaker into replay and early stopping. The threshold is calibrated on humans that neither production
nor the candidate ever trained on, the test split's: on all of them, and the validate stage judges the
human FPR this calibration gives cross-fitted by speaker (`calibration_folds`: each part judged at a
threshold calibrated on the others); or (`calibration_folds` 0) on a speaker-disjoint part
(`calibration_fraction`), and validate judges on the rest. (A threshold set on humans the trunk was
trained on is too low for new speakers.) The loss is class-balanced, and within the AI class the new
samples carry `new_share`.

Recipes (`finetune.recipe`; bench/finetune_recipes.py compares them):
- `prototype`: no gradient step. Each new generator becomes a prototype, the mean direction of its
  copies' trunk embeddings; a clip's evidence is its cosine to the nearest prototype minus its cosine
  to the human replay's centroid, mapped to a probability by a two-parameter logistic fit. The
  candidate serves the larger of that and production's `ai` head (pipeline.core.model.CosineHead).
- `ocsoftmax`: a learned human direction with the one-class softmax loss (Zhang et al. 2021) on
  frozen embeddings, served the same way.
- `head`: the `ai` head retrained on frozen-trunk embeddings (the original production recipe).
- `last_block` (the default): a copy of layer4 for the `ai` head alone (the model's ai branch) and the
  `ai` head, on cached layer3 outputs. The `language` and `speakers` heads keep reading production's
  layer4, so their outputs are production's, bit for bit. A distillation loss keeps the branch's
  embedding readable by those heads as production's was (a regulariser towards production's features).
- `input_layers`: the stem and layer1 ("freeze and learn"), everything after them frozen, with the
  same distillation; every step runs the whole network, so it is the slowest.

Evidence for the gates. Recall on the new generator is estimated leave-one-file-out: for each new
file, a candidate made by the same recipe WITHOUT that file (neither its copies in training nor in
early stopping) scores the whole file at its own threshold, calibrated on the calibration humans.
With one new file there is no such estimate, and the report says so.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Params
from pipeline.core.audio import AudioError, load_audio
from pipeline.core.augment import WaveParams, apply_wave, augment_spec, draw_wave_params
from pipeline.core.data import Clip, CorpusError, check_labels, load_clips, read_corpus, speaker_parts
from pipeline.core.features import FrontEnd, random_crop, windows
from pipeline.core.metrics import compute_eer
from pipeline.core.model import AI_LABEL, CosineHead, Detector
from pipeline.core.scoring import Scorer, pick_device, score_model, score_streams, scoring_settings, window_sizes
from pipeline.synthesis.twins import with_twins
from pipeline.training.calibration import calibrate
from pipeline.training.forked import fork_map, forked_workers
from pipeline.training.one_class import oc_loss

log = logging.getLogger(__name__)

RECIPES = ("prototype", "ocsoftmax", "head", "last_block", "input_layers")
TRAINED = {"prototype": "cosine head (prototypes)", "ocsoftmax": "cosine head (one-class softmax)", "head": "ai head",
           "last_block": "ai head + its own layer4", "input_layers": "stem + layer1"}


@dataclass
class Segments:
    """Training segments: 3 s waves, labels, the file each came from, and the early-stopping mask."""

    waves: np.ndarray      # (N, seg)
    labels: np.ndarray     # (N,)
    files: np.ndarray      # (N,) sha256 of a new file, or path of a replay clip
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


@dataclass
class ReplayDraw:
    """One replay segment, drawn but not yet augmented: its crop, its augmentation's parameters, its file."""

    crop: np.ndarray
    augment: WaveParams
    file: str


def replay_draws(clips: list[Clip], n: int, params: Params, rng: np.random.Generator) -> list[ReplayDraw]:
    """n random crops from these clips, each source equally likely, with their augmentation drawn."""
    by_source = defaultdict(list)
    for c in clips:
        by_source[c.source].append(c)
    sources = sorted(by_source)
    cache: dict[Path, np.ndarray] = {}
    draws: list[ReplayDraw] = []
    seg = params.audio.segment_samples
    while len(draws) < n:
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
        crop = random_crop(cache[clip.path], seg, rng)
        draws.append(ReplayDraw(crop, draw_wave_params(params.augment, rng), str(clip.path)))
    return draws


def replay_segments(parts: list[tuple[list[ReplayDraw], int, bool]], params: Params, workers: int) -> list[Segments]:
    """Each part's draws (with its label and early-stopping flag) augmented, the work shared with `workers`
    forked processes (codec round trips take most of fine-tuning's preparation)."""
    sr = params.audio.sample_rate
    flat = [d for draws, _, _ in parts for d in draws]
    waves = fork_map(lambda d: apply_wave(d.crop, sr, d.augment), flat, workers)
    out, start = [], 0
    for draws, label, is_val in parts:
        n = len(draws)
        out.append(Segments(np.stack(waves[start:start + n]), np.full(n, label), np.array([d.file for d in draws]),
                            np.full(n, is_val)))
        start += n
    return out


def concat(parts: list[Segments]) -> Segments:
    return Segments(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("waves", "labels", "files", "is_val")))


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


# ------------------------------------------------------------------------------------------ data

@dataclass
class Data:
    """Everything a recipe trains on, and what the gates' estimates need."""

    seg: Segments
    is_new: np.ndarray                  # (N,) copies of a new file
    generators: dict[str, str]          # new file sha256 -> generator
    new_clips: dict[str, np.ndarray]    # new file sha256 -> whole clip (for leave-one-file-out scoring)
    calibration: list                   # LoadedClip of the calibration humans (never trained or stopped on)
    counts: dict


def prepare(params: Params) -> Data:
    cfg = params.finetune
    rng = np.random.default_rng(cfg.seed)
    store, augmented = Path(params.ingest.store), Path(params.augment_stage.out)
    new, generators = load_new_copies(augmented, cfg.val_fraction)
    stored = read_corpus(store)
    humans, earlier_ai = replay_clips(store, stored, set(generators), params.twins.out if cfg.replay_twins else None)
    h_train, h_stop = speaker_parts(humans, (cfg.val_fraction,), cfg.seed)
    h_cal = calibration_humans(stored, cfg.calibration_fraction if cfg.calibration_folds == 0 else 1.0, cfg.seed)
    if not h_cal:
        log.warning("the store's test split holds no humans: calibrating on held-out speakers of the train split, "
                    "which the production trunk was trained on (the threshold may be too low for new speakers)")
        h_train, h_stop, h_cal = speaker_parts(humans, (cfg.val_fraction, cfg.calibration_fraction), cfg.seed)
    n_new = int((~new.is_val).sum())
    n_h = max(cfg.replay_per_class, n_new)
    n_ai_replay = max(cfg.replay_per_class - n_new, 0) if earlier_ai else 0
    draws = [(replay_draws(h_train, n_h, params, rng), h_train[0].label, False),
             (replay_draws(h_stop, max(int(n_h * cfg.val_fraction), 8), params, rng), h_stop[0].label, True)]
    if n_ai_replay:
        a_train, a_stop = speaker_parts(earlier_ai, (cfg.val_fraction,), cfg.seed)
        draws += [(replay_draws(a_train, n_ai_replay, params, rng), AI_LABEL, False),
                  (replay_draws(a_stop, max(int(n_ai_replay * cfg.val_fraction), 4), params, rng), AI_LABEL, True)]
    parts = [new] + replay_segments(draws, params, forked_workers(params, pick_device(cfg.device)))
    seg = concat(parts)
    rows = {c.sha256: c for c in stored}
    new_clips = {f: load_audio(rows[f].path, params.audio) for f in sorted(generators)}
    counts = {"new_copies": n_new, "new_files": len(generators), "human_replay": n_h, "ai_replay": n_ai_replay,
              "early_stopping": int(seg.is_val.sum()), "calibration_humans": len(h_cal),
              "calibration_sources": len({c.source for c in h_cal}),
              "calibration_from": "test split" if all(c.split == "test" for c in h_cal) else "train split"}
    log.info("fine-tuning on %d segments (%d new-sample copies of %d files, %d human, %d earlier AI replay); "
             "%d humans for calibration", int((~seg.is_val).sum()), n_new, len(generators), n_h, n_ai_replay, len(h_cal))
    return Data(seg, np.isin(seg.files, list(generators)), generators, new_clips, load_clips(h_cal, params), counts)


def calibration_humans(stored: list[Clip], fraction: float, seed: int) -> list[Clip]:
    """The test split's humans the threshold is calibrated on: all of them (fraction 1.0; the gates then
    cross-fit), or `fraction` of them, whole speakers. The report lists them (calibration.clips), so that
    in the second case the validate stage judges on the others only."""
    test_humans = [c for c in stored if c.split == "test" and c.label != AI_LABEL]
    if not test_humans or fraction >= 1.0:
        return test_humans
    return speaker_parts(test_humans, (fraction,), seed)[1]


def replay_clips(store: Path, stored: list[Clip], new_files: set[str],
                 twins: str | Path | None = None) -> tuple[list[Clip], list[Clip]]:
    """Train-split human and earlier-AI clips among `stored` (the store's clips; new samples excluded).
    With `twins` (the twins folder), the vocoded twins of those humans join the earlier AI: the base
    learnt them as AI, and a recipe that never sees them again drifts from that direction
    (docs/benchmarks.md, section 6)."""
    clips = [c for c in stored if c.split != "test" and c.sha256 not in new_files]
    humans = [c for c in clips if c.label != AI_LABEL]
    if not humans:
        raise CorpusError(f"{store}: no human speech in the store's train split: fine-tuning without human "
                          "replay is refused (it would flag every human as AI); ingest human speech first")
    earlier_ai = [c for c in clips if c.label == AI_LABEL]
    return humans, earlier_ai + [t for t in with_twins(humans, twins) if t.twin_of]


# ------------------------------------------------------------------------------ cached trunk outputs

@torch.no_grad()
def cache_inputs(model: Detector, waves: np.ndarray, params: Params, upto: str, device, seed: int) -> torch.Tensor:
    """Per segment, with the spectrogram part of the recipe: the front end's output (upto="input"),
    layer3's (upto="layer3") or the ai head's embedding (upto="embedding"), through production's frozen layers."""
    front_end = FrontEnd(params.audio, model.meta.feature_config()).to(device)  # production's own front end
    rng = np.random.default_rng(seed)
    model = model.to(device).eval()
    frozen = {"input": lambda x: x, "layer3": model.trunk.to_layer3, "embedding": model.embed}[upto]
    out = []
    for i in range(0, len(waves), 64):
        x = augment_spec(front_end(torch.from_numpy(waves[i:i + 64]).to(device)), params.augment, rng)  # (B, 1, bins, T)
        out.append(frozen(x).cpu())
    return torch.cat(out)


@torch.no_grad()
def teacher_outputs(model: Detector, x: torch.Tensor, device, upto: str = "layer3") -> dict[str, torch.Tensor]:
    """Production's log-probabilities of every head on cached inputs. On layer3 outputs (last_block) every
    head reads production's ai-branch embedding, the one the trained copy of layer4 starts from; on
    front-end outputs (input_layers) each head reads the embedding it reads in production."""
    model = model.to(device).eval()
    parts = []
    for i in range(0, len(x), 64):
        xb = x[i:i + 64].to(device)
        shared, ai = model.embeddings_from_layer3(xb if upto == "layer3" else model.trunk.to_layer3(xb))
        emb = {"ai": ai} | ({} if upto == "input" else {k: ai for k in model.heads})
        parts.append({k: F.log_softmax(h(emb.get(k, shared)), -1).cpu() for k, h in model.heads.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------- recipes

class Adapter(nn.Module):
    """The trainable part of the gradient recipes, on cached inputs: the ai head (recipe head), a copy of
    the ai head's layer4 + the ai head (last_block), or the stem and layer1 in front of production's frozen
    rest (input_layers). Frozen copies of the other heads give the distillation loss."""

    def __init__(self, model: Detector, recipe: str) -> None:
        super().__init__()
        self.recipe = recipe
        self.layer4 = copy.deepcopy(model.ai_layer4_or_shared()) if recipe == "last_block" else None
        self.net = copy.deepcopy(model) if recipe == "input_layers" else None   # its stem and layer1 train
        if self.net is not None:
            self.net.requires_grad_(False)
            for part in (self.net.trunk.conv1, self.net.trunk.bn1, self.net.trunk.layer1):
                part.requires_grad_(True)
        self.dropout = copy.deepcopy(model.dropout)
        self.head = copy.deepcopy(model.heads["ai"])
        self.head.requires_grad_(recipe != "input_layers")
        self.other_heads = None
        if recipe in ("last_block", "input_layers"):
            self.other_heads = nn.ModuleDict({k: copy.deepcopy(h) for k, h in model.heads.items() if k != "ai"})
            self.other_heads.requires_grad_(False)

    def train(self, mode: bool = True) -> "Adapter":
        super().train(mode)
        if self.net is not None:
            self.net.eval()   # batch-norm statistics stay production's
        return self

    def embeddings(self, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding the other heads are distilled on, the ai head's embedding)."""
        if self.net is not None:   # cached: (B, 1, bins, T) front-end output
            return self.net.embeddings_from_layer3(self.net.trunk.to_layer3(cached))
        if self.layer4 is None:
            return cached, cached
        emb = torch.flatten(F.adaptive_avg_pool2d(self.layer4(cached), 1), 1)  # cached: (B, 4w, bins/16, T/16)
        return emb, emb

    def embed(self, cached: torch.Tensor) -> torch.Tensor:
        return self.embeddings(cached)[1]

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(cached)))  # (B, 2)


CACHE_FOR = {"head": "embedding", "last_block": "layer3", "input_layers": "input", "prototype": "embedding",
             "ocsoftmax": "embedding"}


def train_adapter(model: Detector, cached: torch.Tensor, data: Data, train_mask: np.ndarray, val_mask: np.ndarray,
                  params: Params, device) -> tuple[Adapter, list[dict]]:
    """Adam on the trainable part with the weighted loss (plus distillation when the trunk trains);
    best epoch by validation EER, then validation loss."""
    cfg = params.finetune
    torch.manual_seed(cfg.seed)
    seg, is_new = data.seg, data.is_new
    adapter = Adapter(model, cfg.recipe).to(device)
    opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=cfg.lr)
    y = torch.from_numpy(seg.labels).long()
    x_tr, y_tr = cached[train_mask], y[train_mask]
    x_va, y_va = cached[val_mask].to(device), y[val_mask].to(device)
    check_labels(set(y_tr.tolist()), "the fine-tuning set")
    w_tr = loss_weights(seg.labels[train_mask], is_new[train_mask], cfg.new_share)
    w_va = loss_weights(seg.labels[val_mask], is_new[val_mask], cfg.new_share).to(device)
    teacher = None
    if adapter.other_heads is not None and (cfg.distill_weight or cfg.distill_ai):
        teacher = teacher_outputs(model, x_tr, device, "input" if cfg.recipe == "input_layers" else "layer3")
    replay = torch.from_numpy(~is_new[train_mask])
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_key, history, stale = None, (float("inf"), float("inf")), [], 0
    for epoch in range(1, cfg.epochs + 1):
        adapter.train()
        order = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            shared, emb = adapter.embeddings(x_tr[idx].to(device))
            w = w_tr[idx].to(device)
            loss = (F.cross_entropy(adapter.head(adapter.dropout(emb)), y_tr[idx].to(device), reduction="none") * w).sum() / w.sum()
            if teacher is not None:
                loss = loss + cfg.distill_weight * sum(
                    F.kl_div(F.log_softmax(h(shared), -1), teacher[k][idx].to(device), reduction="batchmean", log_target=True)
                    for k, h in adapter.other_heads.items())
                old = replay[idx].to(device)
                if cfg.distill_ai and old.any():   # learning without forgetting: replay keeps production's ai output
                    loss = loss + cfg.distill_ai * F.kl_div(F.log_softmax(adapter.head(emb[old]), -1),
                                                            teacher["ai"][idx][old.cpu()].to(device),
                                                            reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        adapter.eval()
        with torch.no_grad():
            logits = torch.cat([adapter(x_va[i:i + 128]) for i in range(0, len(x_va), 128)])
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
    """A new detector: the production model with the adapter's trained weights (a trained layer4 becomes
    the ai branch's; the trunk's own layer4 stays production's)."""
    merged = (model.with_ai_branch() if adapter.layer4 is not None else copy.deepcopy(model)).cpu()
    merged.heads["ai"].load_state_dict(adapter.head.state_dict())
    if adapter.layer4 is not None:
        merged.ai_layer4.load_state_dict(adapter.layer4.state_dict())
    if adapter.net is not None:
        for name in ("conv1", "bn1", "layer1"):
            getattr(merged.trunk, name).load_state_dict(getattr(adapter.net.trunk, name).state_dict())
    return merged.eval()


def _logistic(evidence: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, bias) of a class-balanced logistic fit of labels on one evidence value."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(class_weight="balanced", C=10.0).fit(evidence[:, None], labels)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def cosine_candidate(model: Detector, emb: torch.Tensor, data: Data, train_mask: np.ndarray, params: Params) -> Detector:
    """Production plus a cosine head: prototypes of the new generators (recipe prototype) or a learned
    human direction (recipe ocsoftmax), its scale and bias fitted on the training embeddings."""
    recipe, seg = params.finetune.recipe, data.seg
    human = train_mask & (seg.labels != AI_LABEL)
    new = train_mask & data.is_new
    e = F.normalize(emb, dim=-1)
    gens = sorted({data.generators[f] for f in np.unique(seg.files[new])})
    old = model.cosine
    keep = [] if old is None else [(g, p) for g, p in zip(model.meta.cosine_head.get("generators", []), old.prototypes)
                                   if g not in gens]
    if recipe == "prototype":
        protos = [p for _, p in keep] + [F.normalize(e[torch.from_numpy(new & np.isin(seg.files, [f for f, g in
                  data.generators.items() if g == gen]))].mean(0), dim=0) for gen in gens]
        learnt = old is not None and model.meta.cosine_head.get("kind") == "ocsoftmax"
        # a one-class model's learnt human direction is its ai score: keep it as the human reference
        centre = F.normalize(old.human, dim=0) if learnt else F.normalize(e[torch.from_numpy(human)].mean(0), dim=0)
        names = [g for g, _ in keep] + gens
    else:
        protos, names = [], []
        centre = _oc_direction(e[torch.from_numpy(train_mask)], seg.labels[train_mask], params.finetune.seed)
    head = CosineHead(emb.shape[1], len(protos))
    head.prototypes.copy_(torch.stack(protos) if protos else head.prototypes)
    head.human.copy_(centre)
    fit = train_mask & (human | data.is_new if recipe == "prototype" else train_mask)
    with torch.no_grad():
        evidence = head.evidence(emb[torch.from_numpy(fit)]).numpy()
    scale, bias = _logistic(evidence, (seg.labels[fit] == AI_LABEL).astype(int))
    head.scale.fill_(scale)
    head.bias.fill_(bias)
    meta = dataclasses.replace(model.meta, cosine_head={"kind": recipe, "generators": names, "n_prototypes": len(protos)})
    candidate = Detector(meta)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cosine.")}
    candidate.load_state_dict(state | {f"cosine.{k}": v for k, v in head.state_dict().items()})
    return candidate.eval()


def _oc_direction(e: torch.Tensor, labels: np.ndarray, seed: int, steps: int = 300) -> torch.Tensor:
    """The human direction w of the one-class softmax loss on normalised embeddings: humans' cosine to w
    pushed above 0.9, AI's below 0.2."""
    torch.manual_seed(seed)
    y = torch.from_numpy(labels != AI_LABEL)
    w = torch.nn.Parameter(F.normalize(e[y].mean(0), dim=0).clone())
    opt = torch.optim.Adam([w], lr=0.01)
    weight = torch.where(y, 0.5 / y.sum(), 0.5 / (~y).sum())
    for _ in range(steps):
        loss = oc_loss(e @ F.normalize(w, dim=0), y, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.normalize(w.detach(), dim=0)


def fit_candidate(model: Detector, cached: torch.Tensor, data: Data, train_mask: np.ndarray, val_mask: np.ndarray,
                  params: Params, device) -> tuple[Detector, list[dict]]:
    """One candidate by the configured recipe, from the segments in train_mask (early stopping on val_mask)."""
    if params.finetune.recipe in ("prototype", "ocsoftmax"):
        return cosine_candidate(model, cached, data, train_mask, params), []
    adapter, history = train_adapter(model, cached, data, train_mask, val_mask, params, device)
    return merge(model, adapter), history


class _FromLayer3(nn.Module):
    """A detector that takes layer3's output as input, for windows whose frozen part was computed once."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model, self.meta = model, model.meta

    def forward(self, x3: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_from_layer3(x3)


@dataclass
class CalibrationWindows:
    """The calibration humans' scoring windows (detection's hop), through the part of production every
    candidate of the recipe shares: layer3 (all recipes but input_layers) or the front end. Each of the
    three candidates of a retrain is then calibrated without re-running that part (docs/benchmarks.md 6f).
    Held as one array, so that a forked worker sends it back in one piece."""

    upto: str              # "layer3" | "input"
    frozen: np.ndarray     # (windows, ...) every window's frozen output, clip after clip
    rms: np.ndarray        # (windows,) each window's rms
    bounds: list[int]      # clip i's windows are [bounds[i], bounds[i + 1])
    sources: set[str]

    @property
    def clips(self) -> list[list[tuple[torch.Tensor, float]]]:
        """Per clip: (window's frozen output, window rms)."""
        frozen = torch.from_numpy(self.frozen)
        return [list(zip(frozen[a:b], self.rms[a:b].tolist())) for a, b in zip(self.bounds[:-1], self.bounds[1:])]


@torch.no_grad()
def calibration_windows(model: Detector, data: Data, params: Params, device) -> CalibrationWindows:
    upto = "input" if params.finetune.recipe == "input_layers" else "layer3"
    scorer = Scorer(model, params.audio, str(device))
    seg, hop = window_sizes(params.audio, params.detect)
    per_clip = [windows(it.wave, seg, hop) for it in data.calibration]
    flat = np.concatenate(per_clip) if per_clip else np.zeros((0, seg), np.float32)
    feats, rms = [], []
    for i in range(0, len(flat), params.detect.batch_windows):
        f, r = scorer.features(flat[i:i + params.detect.batch_windows])
        feats.append((model.trunk.to_layer3(f) if upto == "layer3" else f).cpu().numpy())
        rms.append(r)
    return CalibrationWindows(upto, np.concatenate(feats) if feats else np.zeros((0,), np.float32),
                              np.concatenate(rms) if rms else np.zeros(0),
                              np.cumsum([0] + [len(w) for w in per_clip]).tolist(),
                              {it.clip.source for it in data.calibration})


def calibration_scores(candidate: Detector, cal: CalibrationWindows, params: Params, device) -> list[float]:
    """The candidate's score of each calibration human, as score_model gives it (the same windows and
    aggregation), from the cached frozen part."""
    model = _FromLayer3(candidate) if cal.upto == "layer3" else candidate
    return [s.ai_score for s in score_streams(Scorer(model, params.audio, str(device)), cal.clips, params.detect,
                                              featurized=True)]


def calibrated(candidate: Detector, cal: CalibrationWindows, params: Params, device) -> dict:
    """The candidate's threshold on the calibration humans (whole clips, scored like production traffic)."""
    return calibrate(calibration_scores(candidate, cal, params, device), params.calibration, cal.sources)


def finetune(model: Detector, params: Params) -> tuple[Detector, dict]:
    """Train a candidate from the production model; return it and the report."""
    # torch's optimizers import torch._dynamo when the first one is built (2-3 s): once here, before any
    # fork, so that the workers inherit it instead of importing it again
    import torch._dynamo  # noqa: F401
    cfg = params.finetune
    device = pick_device(cfg.device)
    data = prepare(params)
    seg = data.seg
    workers = forked_workers(params, device)

    def frozen(part: str):   # production's frozen part on the training segments / the calibration windows
        if part == "segments":
            return cache_inputs(model, seg.waves, params, CACHE_FOR[cfg.recipe], device, cfg.seed)
        return calibration_windows(model, data, params, device)

    cached, cal_windows = fork_map(frozen, ["segments", "calibration"], workers)
    held_out = sorted(data.generators) if len(data.generators) >= 2 else []

    def job(f: str | None):   # None: the candidate itself; f: the candidate made without new file f
        if f is not None:
            return held_out_estimate(model, cached, data, cal_windows, f, params, device)
        candidate, history = fit_candidate(model, cached, data, ~seg.is_val, seg.is_val, params, device)
        return candidate, history, calibrated(candidate, cal_windows, params, device)

    # independent trainings, each seeded alike: the same results with any number of workers
    (candidate, history, calibration), *estimates = fork_map(job, [None] + held_out, workers)
    candidate.meta = dataclasses.replace(candidate.meta, threshold=calibration["threshold"],
                                         threshold_scoring=scoring_settings(params))
    lofo = ({"method": "leave-one-file-out", "files": dict(zip(held_out, estimates))} if held_out else
            {"method": "none: one new file leaves nothing to hold out", "files": {}})
    calibration["clips"] = sorted(it.clip.sha256 for it in data.calibration)
    if cfg.calibration_folds and data.counts["calibration_from"] == "test split":   # the gates judge these humans
        calibration |= {"mode": "crossfit", "folds": cfg.calibration_folds, "seed": cfg.seed}
    else:
        calibration["mode"] = "holdout"
    report = {
        "recipe": cfg.recipe, "trained": TRAINED[cfg.recipe], "segments": data.counts,
        "new_generators": sorted(set(data.generators.values())), "history": history,
        "best_epoch": min(history, key=lambda h: (h["val_eer"] if h["val_eer"] == h["val_eer"] else 0.0,
                                                  h["val_loss"]))["epoch"] if history else None,
        "calibration": calibration, "lofo": lofo,
    }
    return candidate.cpu().eval(), report


def held_out_estimate(model: Detector, cached: torch.Tensor, data: Data, cal_windows: CalibrationWindows, f: str,
                      params: Params, device) -> dict:
    """Leave-one-file-out: a candidate made without new file f's copies (in training and early stopping)
    scores f at its own threshold, calibrated on the calibration humans."""
    keep = data.seg.files != f
    held_out, _ = fit_candidate(model, cached, data, ~data.seg.is_val & keep, data.seg.is_val & keep, params, device)
    threshold = calibrated(held_out, cal_windows, params, device)["threshold"]
    score = score_model(held_out, [data.new_clips[f]], params, str(device))[0].ai_score
    return {"score": score, "threshold": threshold, "caught": bool(score >= threshold)}
