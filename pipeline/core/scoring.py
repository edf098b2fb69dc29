"""Model inference on fixed 3 s windows, and aggregation of window scores into clip scores."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.audio import AudioError
from pipeline.config import AudioConfig, DetectConfig
from pipeline.core.features import FrontEnd, windows
from pipeline.core.model import AI_LABEL, SPEAKER_CLASSES, Detector


def scoring_settings(params) -> dict:
    """The settings a clip score depends on besides the model: a threshold calibrated under them holds its
    false-positive rate only under them (recorded as the checkpoint's `threshold_scoring`)."""
    d = params.detect
    return {"hop_s": d.hop_s, "aggregate": d.aggregate, "silent_window_db": d.silent_window_db,
            "segment_s": params.audio.segment_s}


def threshold_mismatch(meta, params) -> str | None:
    """How params' scoring settings differ from those the model's threshold was calibrated with (one line),
    or None (same settings, or a checkpoint that does not record them)."""
    calibrated = meta.threshold_scoring or {}
    now = scoring_settings(params)
    diff = [f"{'audio' if k == 'segment_s' else 'detect'}.{k} {now[k]!r} (calibrated with {calibrated[k]!r})"
            for k in now if k in calibrated and calibrated[k] != now[k]]
    return ", ".join(diff) or None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether bf16 arithmetic is native on `device`: a CUDA GPU, or a CPU whose flags list AVX512-BF16 or
    AMX-BF16 (elsewhere bf16 is emulated on a CPU and slower than float32)."""
    if device.type == "cuda":
        return True
    try:
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class WindowScores:
    """Per-window outputs of one batch: AI probability, language and speaker-count probabilities."""

    ai: np.ndarray         # (B,)
    language: np.ndarray   # (B, n_languages)
    speakers: np.ndarray   # (B, 2) single / several
    rms: np.ndarray        # (B,) level of each window, to leave near-silent ones out of the clip score


class Scorer:
    """Runs a detector on batches of raw windows (B, segment_samples) in eval mode without gradients,
    through the front end recorded in the model's checkpoint. The two halves (`features`, `heads`) can
    run in different processes: `aivoice detect --workers N` computes features where it decodes."""

    def __init__(self, model: Detector, audio: AudioConfig, device: str = "auto", channels_last: bool = False) -> None:
        """`channels_last`: for a model that only scores from now on (detect, serve): its convolution
        weights are laid out NHWC in place, 1.4x the windows/s of the default layout on CPU (docs/benchmarks.md
        section 8b) with scores equal within 1e-6. Off for models that training goes on with: their layout is
        left as it is (a bootstrap trains in channels_last and validates between epochs)."""
        self.device = pick_device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = (model.to(self.device, memory_format=self.memory_format) if channels_last
                      else model.to(self.device)).eval()
        self.front_end = FrontEnd(audio, model.meta.feature_config()).to(self.device)

    @torch.inference_mode()
    def features(self, batch: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(log-spectrograms (B, 1, bins, T) on the scorer's device, rms level of each window (B,))."""
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        return self.front_end(x), x.square().mean(-1).sqrt().cpu().numpy()

    @torch.inference_mode()
    def heads(self, feats: torch.Tensor, rms: np.ndarray) -> WindowScores:
        out = self.model(feats.to(self.device).contiguous(memory_format=self.memory_format))  # (B, classes) logits
        prob = {k: v.float().softmax(-1).cpu().numpy() for k, v in out.items()}
        return WindowScores(ai=prob["ai"][:, AI_LABEL], language=prob["language"], speakers=prob["speakers"], rms=rms)

    def __call__(self, batch: np.ndarray) -> WindowScores:
        return self.heads(*self.features(batch))


@dataclass
class ClipScore:
    """A clip's aggregated scores (windows kept for inspection)."""

    ai_score: float
    windows: list[float]
    language: str
    speakers: str


def aggregate(parts: list[WindowScores], how: str, languages: tuple[str, ...], silent_db: float = 0.0) -> ClipScore:
    """Clip score = mean (or max) of window AI scores; language and speakers by mean probability.
    With silent_db > 0, windows more than silent_db below the clip's loudest window (a pause, leading
    or trailing silence) are left out, so silence cannot move the verdict; all windows are still listed."""
    ai = np.concatenate([p.ai for p in parts])
    rms = np.concatenate([p.rms for p in parts])
    lang = np.concatenate([p.language for p in parts]).mean(0)
    spk = np.concatenate([p.speakers for p in parts]).mean(0)
    voiced = rms >= rms.max() * 10 ** (-silent_db / 20) if silent_db > 0 else np.ones(len(ai), bool)
    score = float(ai[voiced].max() if how == "max" else ai[voiced].mean())
    return ClipScore(ai_score=score, windows=[round(float(a), 6) for a in ai],
                     language=languages[int(lang.argmax())] if languages else "unknown",
                     speakers=SPEAKER_CLASSES[int(spk.argmax())])


def score_streams(scorer: Scorer, streams: Iterable[Iterable], detect: DetectConfig,
                  featurized: bool = False) -> Iterator[ClipScore | AudioError]:
    """Score clips given as lazy streams of fixed windows, batching windows across clips.

    Yields one result per stream, in order: its ClipScore, or the AudioError it raised (the other
    clips are still scored). With `featurized`, stream items are already (log-spectrogram (1, bins, T),
    rms) pairs from `Scorer.features`, and only the model runs here.
    """
    languages = scorer.model.meta.languages
    batch: list[np.ndarray] = []
    owners: list[int] = []
    parts: dict[int, list[WindowScores]] = defaultdict(list)
    finished: dict[int, int | AudioError] = {}   # clip -> window count, or its error

    def flush() -> None:
        if batch:
            if featurized:
                s = scorer.heads(torch.stack([f for f, _ in batch]), np.array([r for _, r in batch], np.float32))
            else:
                s = scorer(np.stack(batch))
            for idx in dict.fromkeys(owners):
                sel = np.array([o == idx for o in owners])
                parts[idx].append(WindowScores(s.ai[sel], s.language[sel], s.speakers[sel], s.rms[sel]))
            batch.clear()
            owners.clear()

    def ready(idx: int) -> bool:
        state = finished.get(idx)
        return isinstance(state, AudioError) or (state is not None and sum(len(p.ai) for p in parts[idx]) == state)

    def emit(idx: int) -> ClipScore | AudioError:
        state, got = finished.pop(idx), parts.pop(idx, [])
        return state if isinstance(state, AudioError) else aggregate(got, detect.aggregate, languages, detect.silent_window_db)

    next_out = 0
    for idx, stream in enumerate(streams):
        n = 0
        try:
            for w in stream:
                batch.append(w)
                owners.append(idx)
                n += 1
                if len(batch) >= detect.batch_windows:
                    flush()
            finished[idx] = n
        except AudioError as err:
            finished[idx] = err
            kept = [i for i, owner in enumerate(owners) if owner != idx]   # its windows are not scored
            batch[:], owners[:] = [batch[i] for i in kept], [owners[i] for i in kept]
        while ready(next_out):
            yield emit(next_out)
            next_out += 1
    flush()
    while next_out in finished:
        yield emit(next_out)
        next_out += 1


def window_sizes(audio: AudioConfig, detect: DetectConfig) -> tuple[int, int]:
    """(length, hop) of the scoring windows in samples at the model's rate."""
    return audio.segment_samples, round(detect.hop_s * audio.sample_rate)


def score_arrays(scorer: Scorer, clips: Iterable[np.ndarray], audio: AudioConfig, detect: DetectConfig) -> list[ClipScore]:
    """Score in-memory clips (already at the model's rate) with the same fixed windows as detection."""
    seg, hop = window_sizes(audio, detect)
    return list(score_streams(scorer, (windows(x, seg, hop) for x in clips), detect))


def score_model(model: Detector, waves: Iterable[np.ndarray], params, device: str = "cpu") -> list[ClipScore]:
    """Score in-memory clips with a model the way detection does (params: pipeline.config.Params)."""
    return score_arrays(Scorer(model, params.audio, device), waves, params.audio, params.detect)
