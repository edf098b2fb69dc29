"""Streamed decode + resample of a long file: soxr's ResampleStream (pipeline/core/audio.py now) against
the block resampler over torchaudio it replaced (pipeline/core/audio.py at commit 0f1402f, read from git).

Both run in this process with 1 torch thread, interleaved, best of `--repeats`; a synthetic noise file
per input rate (16-bit WAV) is written to a temp folder. Only the ratio within one run means much on a
shared machine.

    python bench/resample_stream.py                 # 10 minutes at 44.1, 16 and 8 kHz
    python bench/resample_stream.py --minutes 30 --rates 48000
    python bench/resample_stream.py --resample-only  # the resamplers alone, on 60 s blocks in memory
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import AudioConfig  # noqa: E402
from pipeline.core import audio as soxr_audio  # noqa: E402

OLD_COMMIT = "0f1402f"


def old_module(tmp: Path):
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipeline/core/audio.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = tmp / "torchaudio_blocks_audio.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("torchaudio_blocks_audio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rates", type=int, nargs="+", default=[44100, 16000, 8000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--resample-only", action="store_true", help="time the resamplers alone, no decoding")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, rng = AudioConfig(), np.random.default_rng(0)
    what = "resampling only" if args.resample_only else "decode + resample"
    print(f"{what}, 1 torch thread; load average {os.getloadavg()[0]:.1f}; {args.minutes:g} min per file, "
          f"best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        old = old_module(Path(tmp))
        for rate in args.rates:
            path = Path(tmp) / f"noise_{rate}.wav"
            sf.write(path, (rng.standard_normal(int(args.minutes * 60 * rate)) * 0.1).astype(np.float32), rate,
                     subtype="PCM_16")
            x = sf.read(path, dtype="float32")[0]
            blocks = [x[i:i + 60 * rate] for i in range(0, len(x), 60 * rate)]
            runs = {"torchaudio blocks": lambda: old._BlockResampler(rate, cfg.sample_rate)(iter(blocks)),
                    "soxr stream": lambda: soxr_audio.resample_stream(iter(blocks), rate, cfg.sample_rate)}
            if not args.resample_only:
                runs = {"torchaudio blocks": lambda: old.stream_audio(path, cfg),
                        "soxr stream": lambda: soxr_audio.stream_audio(path, cfg)}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.repeats):
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    for _block in run():
                        pass
                    best[name] = min(best[name], time.perf_counter() - t0)
            audio_s = args.minutes * 60
            print(f"{rate:>6} Hz: " + ", ".join(f"{k} {v:.2f} s ({audio_s / v:,.0f}x realtime)" for k, v in best.items())
                  + f"; soxr/old {best['soxr stream'] / best['torchaudio blocks']:.2f}", flush=True)


if __name__ == "__main__":
    main()
