"""Small neural mel-to-waveform decoders, trained by the pipeline on the store's own human speech.

Modern TTS systems end in a neural vocoder (HiFi-GAN in VITS, piper and XTTS; Vocos in F5-TTS and
MaskGCT; iSTFTNet in StyleTTS 2). Twins made by such decoders carry their family's artefacts:
- `istft` (Vocos-style): a ConvNeXt stack on log-mel frames predicts magnitude and phase of every
  STFT bin, and an inverse STFT makes the waveform (no upsampling layers);
- `hifigan` (NSF-HiFiGAN-style, as in RVC and DiffSinger): transposed convolutions upsample the frame
  rate 240x to samples, with dilated residual blocks, ending in tanh: the periodic upsampling
  artefacts of that family. A neural-source-filter excitation (sine harmonics at the clip's F0, from
  WORLD's DIO) is added at every upsampling stage: without a discriminator, a plain upsampler trained
  for minutes on a CPU makes no harmonics at all.

Both are trained with multi-resolution STFT and mel losses only (no discriminator: a bounded CPU
budget), on random crops of human clips resampled to 24 kHz. Training is step-bounded (reproducible)
with a wall-clock cap; the checkpoint (weights + config + what it was trained on) is a plain dict
that loads with `weights_only=True`, versioned with the twins output it made.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from pipeline.core.model import write_torch
from pipeline.core.audio import resample
from pipeline.synthesis.vocoders import fit, match_level

log = logging.getLogger(__name__)

SR, N_FFT, HOP, N_MELS = 24000, 1024, 240, 80
CHECKPOINT_FORMAT = "aivoice-decoder/1"
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))


class MelInput(nn.Module):
    """(B, samples) -> (B, 80, frames) log-mel (not mean-normalised: level carries information here)."""

    def __init__(self) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, f_min=0.0,
                                                        f_max=SR / 2, power=1.0, center=True)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.mel(wave).clamp_min(1e-5).log()


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        y = self.norm(self.dw(x).transpose(1, 2))
        return x + self.pw2(F.gelu(self.pw1(y))).transpose(1, 2)


class ISTFTDecoder(nn.Module):
    """Vocos-style: log-mel (B, 80, T) -> ConvNeXt -> per-bin log-magnitude and phase -> iSTFT (B, T*240)."""

    needs_f0 = False

    def __init__(self, dim: int = 192, blocks: int = 5) -> None:
        super().__init__()
        self.inp = nn.Conv1d(N_MELS, dim, 7, padding=3)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 2 * (N_FFT // 2 + 1))
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, mel: torch.Tensor, f0: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.blocks(self.inp(mel)).transpose(1, 2))
        log_mag, phase = self.out(h).transpose(1, 2).chunk(2, dim=1)  # (B, n_bins, T) each
        spec = torch.polar(log_mag.clamp(max=8).exp(), phase)
        return torch.istft(spec, N_FFT, HOP, window=self.window, center=True)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(ch, ch, 3, dilation=d, padding=d) for d in (1, 3, 9)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, 0.1))
        return x


N_HARMONICS = 8


def harmonic_source(f0: torch.Tensor, n: int) -> torch.Tensor:
    """(B, frames) F0 in Hz (0 = unvoiced) -> (B, N_HARMONICS, n) sines at its harmonics below Nyquist,
    silent where unvoiced: the excitation of a neural source-filter vocoder."""
    f = F.interpolate(f0[:, None], size=n, mode="linear", align_corners=False)  # (B, 1, n)
    phase = 2 * torch.pi * torch.cumsum(f / SR, dim=-1)
    k = torch.arange(1, N_HARMONICS + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
    return torch.sin(k * phase) * ((k * f) < SR / 2) * (f > 0)


class HiFiGANDecoder(nn.Module):
    """NSF-HiFiGAN-style: log-mel (B, 80, T) and F0 (B, T) -> transposed convolutions x5 x4 x4 x3 (= 240),
    the harmonic excitation added at every stage -> (B, T*240)."""

    RATES = (5, 4, 4, 3)
    needs_f0 = True

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.inp = nn.Conv1d(N_MELS, channels, 7, padding=3)
        ups, res, src = [], [], []
        ch = channels
        for i, r in enumerate(self.RATES):
            ups.append(nn.ConvTranspose1d(ch, ch // 2, 2 * r, r, padding=r // 2 + r % 2, output_padding=r % 2))
            ch //= 2
            res.append(ResBlock(ch))
            down = int(np.prod(self.RATES[i + 1:]))  # from the sample rate down to this stage's rate
            src.append(nn.Conv1d(N_HARMONICS, ch, 2 * down, down, padding=(down + 1) // 2) if down > 1
                       else nn.Conv1d(N_HARMONICS, ch, 1))
        self.ups, self.res, self.src = nn.ModuleList(ups), nn.ModuleList(res), nn.ModuleList(src)
        self.out = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, mel: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        x = self.inp(mel)
        source = harmonic_source(f0, mel.shape[-1] * HOP)
        for up, res, src in zip(self.ups, self.res, self.src):
            x = up(F.leaky_relu(x, 0.1))
            x = res(x + src(source))
        return torch.tanh(self.out(F.leaky_relu(x, 0.1))).squeeze(1)


def frame_f0(wave: np.ndarray) -> np.ndarray:
    """F0 per 10 ms frame of a 24 kHz clip (DIO + StoneMask), len(wave) // HOP + 1 frames as the mel has."""
    from pipeline.synthesis.vocoders import _pyworld

    pyworld = _pyworld()
    x = wave.astype(np.float64)
    f0, t = pyworld.dio(x, SR, frame_period=HOP / SR * 1000)
    f0 = pyworld.stonemask(x, f0, t, SR)
    n = len(wave) // HOP + 1
    return np.pad(f0, (0, max(0, n - len(f0))))[:n].astype(np.float32)


ARCHITECTURES = {"istft": ISTFTDecoder, "hifigan": HiFiGANDecoder}


@dataclass(frozen=True)
class DecoderTraining:
    """How a decoder was trained (saved in its checkpoint)."""

    kind: str
    steps: int
    batch_size: int = 8
    segment_s: float = 1.0
    lr: float = 5e-4
    seed: int = 0
    max_minutes: float = 10.0


def stft_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss: spectral convergence + log-magnitude L1, summed over resolutions."""
    loss = y.new_zeros(())
    for n_fft, hop in STFT_RESOLUTIONS:
        win = torch.hann_window(n_fft, device=y.device)
        sy = torch.stft(y, n_fft, hop, window=win, return_complex=True).abs().clamp_min(1e-7)
        sx = torch.stft(x, n_fft, hop, window=win, return_complex=True).abs().clamp_min(1e-7)
        loss = loss + torch.linalg.norm(sx - sy) / torch.linalg.norm(sx).clamp_min(1e-7) + F.l1_loss(sy.log(), sx.log())
    return loss


def train_decoder(waves: list[np.ndarray], cfg: DecoderTraining) -> tuple[nn.Module, dict]:
    """Train one decoder on 24 kHz human clips; returns the model and a small report (loss curve, time)."""
    if not waves:
        raise ValueError("no human clips to train a neural decoder on")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = ARCHITECTURES[cfg.kind]()
    mel = MelInput()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    seg = round(cfg.segment_s * SR) // HOP * HOP
    waves = [w for w in waves if len(w) > seg]
    if not waves:
        raise ValueError(f"no human clip longer than {cfg.segment_s} s to train a neural decoder on")
    f0s = [frame_f0(w) for w in waves] if model.needs_f0 else None
    started, curve, step = time.monotonic(), [], 0
    for step in range(1, cfg.steps + 1):
        picks = [(int(rng.integers(len(waves))), 0) for _ in range(cfg.batch_size)]
        picks = [(i, int(rng.integers((len(waves[i]) - seg) // HOP + 1)) * HOP) for i, _ in picks]  # frame-aligned
        batch = np.stack([waves[i][start:start + seg] for i, start in picks])
        x = torch.from_numpy(batch / np.maximum(np.abs(batch).max(1, keepdims=True), 1e-4) * 0.9).float()
        f0 = torch.from_numpy(np.stack([f0s[i][start // HOP:start // HOP + seg // HOP + 1] for i, start in picks])) \
            if f0s else None
        y = model(mel(x), f0)[:, :seg]
        loss = stft_loss(y, x) + F.l1_loss(mel(y), mel(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            curve.append({"step": step, "loss": round(loss.item(), 4)})
        if time.monotonic() - started > cfg.max_minutes * 60:
            log.warning("neural decoder %s: stopped at step %d of %d (max_minutes %.1f)", cfg.kind, step, cfg.steps,
                        cfg.max_minutes)
            break
    report = {"kind": cfg.kind, "steps_done": step, "wall_s": round(time.monotonic() - started, 1), "curve": curve,
              "n_clips": len(waves)}
    return model.eval(), report


def save_decoder(model: nn.Module, cfg: DecoderTraining, report: dict, path: Path) -> Path:
    return write_torch({"format": CHECKPOINT_FORMAT, "config": asdict(cfg), "report": report,
                        "state_dict": model.state_dict()}, path)


def read_decoder_config(path: Path) -> dict:
    """The DecoderTraining a checkpoint was made with (as a dict)."""
    return torch.load(path, map_location="cpu", weights_only=True)["config"]


def load_decoder(path: Path) -> nn.Module:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a decoder checkpoint")
    model = ARCHITECTURES[blob["config"]["kind"]]()
    model.load_state_dict(blob["state_dict"])
    return model.eval()


class NeuralVocoder:
    """A trained decoder as a vocoder: (clip, sr) -> its resynthesis at sr, same length and level."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.mel = model.eval(), MelInput()

    @torch.no_grad()
    def __call__(self, x: np.ndarray, sr: int) -> np.ndarray:
        y = resample(x, sr, SR)
        peak = max(float(np.abs(y).max()), 1e-4)
        f0 = torch.from_numpy(frame_f0(y))[None] if self.model.needs_f0 else None
        z = self.model(self.mel(torch.from_numpy(y / peak * 0.9).float()[None]), f0)[0].numpy()
        return match_level(fit(resample(fit(z, len(y)), SR, sr), len(x)), x)
