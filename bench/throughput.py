"""Detection throughput (x realtime), decode included, through the same path as `aivoice detect`.

Each measurement runs in a fresh Python process (so its peak RSS is its own): the model is loaded
with pipeline.io.registry.load_model (a checkpoint file, as `aivoice detect --model FILE`), a Scorer is
built, one warm-up batch is scored, then `pipeline.apps.detect.detect_files` scores the files (streamed
decode + resample + log-mel + model, windows batched across files) and the wall time is taken.
Reported per `detect.batch_windows` setting: audio seconds, wall seconds, x realtime (audio s / wall s),
windows/s, speed-up vs batch 1 measured in the same invocation, peak RSS.

Without --model, an untrained model of the configured width (params.yaml model.base_width, 64 =
production) is written to a temp checkpoint: throughput does not depend on the weights.
Optionally (--long-minutes) a synthetic speech-like file of that length is streamed, to show
that memory stays bounded (peak RSS vs. the size the decoded file would have in memory).

    python bench/throughput.py                      # 40 corpus files, batch 1/8/32 x threads 2/1, 30-min file
    python bench/throughput.py --files 120 --threads 2 --long-minutes 0 --batches 1 32
    python bench/throughput.py --device cuda        # where a GPU is present
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPUS, REPO, RESULTS, machine, md_table, peak_rss_mb, write_json  # noqa: E402


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    """One timed detection pass in this process (called with --worker)."""
    import numpy as np
    import soundfile as sf
    import torch

    from pipeline.io import registry
    from pipeline.config import load_params
    from pipeline.apps.detect import detect_files
    from pipeline.core.scoring import Scorer

    torch.set_num_threads(spec["threads"])
    params = load_params(spec["params"], overrides={"detect.batch_windows": spec["batch"]})
    model, _ = registry.load_model(spec["model"], params)
    scorer = Scorer(model, params.audio, spec["device"])
    warm = np.zeros((min(spec["batch"], 4), params.audio.segment_samples), np.float32)
    scorer(warm)  # first-call allocations and kernel selection are not part of steady-state throughput
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    paths = [Path(p) for p in spec["paths"]]
    audio_s = sum(sf.info(str(p)).duration for p in paths)
    rss_before = current_rss_mb()
    t = time.perf_counter()
    results = list(detect_files(paths, scorer, params, threshold=0.5, model_name="bench"))
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    n_windows = sum(len(r.windows) for r in results)
    return {"batch": spec["batch"], "files": len(paths), "errors": sum(1 for r in results if r.error),
            "audio_s": audio_s, "wall_s": wall, "x_realtime": audio_s / wall, "windows": n_windows,
            "windows_per_s": n_windows / wall, "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "device": str(scorer.device), "threads": torch.get_num_threads()}


def run_worker(spec: dict) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({spec['batch']=}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speech_like(seconds: float, sr: int, seed: int) -> "np.ndarray":
    """Voiced-speech-like float32 signal: harmonics of a gliding pitch under a ~4 Hz syllable envelope."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 21) if k * 200 < sr / 2)
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)))
    return (0.3 * x / np.abs(x).max() + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def make_long_file(path: Path, minutes: float, sr: int = 16000) -> Path:
    """A speech-like 16-bit WAV of `minutes`, written in 10 s chunks (never held whole in memory)."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", sr, 1, subtype="PCM_16") as f:
        for i in range(max(1, round(minutes * 6))):
            f.write(speech_like(10.0, sr, seed=i % 7))
    return path


def untrained_checkpoint(params_path: Path, out: Path, width: int | None) -> Path:
    from pipeline.config import load_params
    from pipeline.core.model import new_model, save_checkpoint

    params = load_params(params_path)
    model = new_model(["unknown"], params.audio, params.features, width or params.model.base_width, params.model.dropout)
    return save_checkpoint(model, out, notes={"bench": "untrained, for throughput only"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_CORPUS, help="audio folder, recursive (default: shared corpus)")
    ap.add_argument("--model", help="checkpoint file (default: an untrained model of the configured width)")
    ap.add_argument("--width", type=int, help="width of the untrained model (default: params model.base_width)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--files", type=int, default=40, help="how many files (seeded sample; 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="detect.batch_windows values")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all batch sizes; the fastest round per size is reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch.set_num_threads values (each measured)")
    ap.add_argument("--long-minutes", type=float, default=30.0, help="also stream a synthetic file this long (0 = skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from pipeline.core.audio import find_audio

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="aivoice-bench-"))
    model = args.model or str(untrained_checkpoint(args.params, tmp / "untrained.pt", args.width))
    paths = find_audio([args.folder])
    if args.files and len(paths) > args.files:
        paths = sorted(random.Random(args.seed).sample(paths, args.files))
    base = {"params": str(args.params), "model": model, "device": args.device, "paths": [str(p) for p in paths]}
    configs = [(th, b) for b in args.batches for th in args.threads]   # thread counts interleaved per batch size
    runs: dict[str, list[dict]] = {f"{th}x{b}": [] for th, b in configs}
    for r in range(args.repeats):
        for th, b in configs:
            res = run_worker(base | {"batch": b, "threads": th})
            runs[f"{th}x{b}"].append(res)
            print(f"round {r + 1} threads {th} batch {b}: {res['x_realtime']:.1f}x realtime, "
                  f"{res['windows_per_s']:.1f} windows/s", file=sys.stderr)
    best = {k: max(rs, key=lambda x: x["x_realtime"]) for k, rs in runs.items()}
    rows = []
    for th, b in sorted(configs, key=lambda c: (-c[0], c[1])):
        x = best[f"{th}x{b}"]
        ref = best.get(f"{th}x1") or best[f"{th}x{args.batches[0]}"]
        rows.append({"threads": th, "batch_windows": b, "files": x["files"], "errors": x["errors"], "audio_s": x["audio_s"],
                     "wall_s": x["wall_s"], "x_realtime": x["x_realtime"], "windows_per_s": x["windows_per_s"],
                     "speedup_vs_b1": x["x_realtime"] / ref["x_realtime"], "peak_rss_mb": round(x["peak_rss_mb"])})
    result = {"machine": machine(), "folder": str(args.folder), "model": args.model or f"untrained (width {args.width or 'params'})",
              "device": args.device, "runs": runs, "table": rows}
    md = [f"Throughput on {args.device}, {len(paths)} files of {args.folder} "
          f"(model: {result['model']}; `speedup_vs_b1` is against batch 1 at the same thread count, same invocation):",
          md_table(rows, ["threads", "batch_windows", "files", "errors", "audio_s", "wall_s", "x_realtime", "windows_per_s",
                          "speedup_vs_b1", "peak_rss_mb"], "{:.2f}")]
    if args.long_minutes:
        long = make_long_file(tmp / "long.wav", args.long_minutes)
        b = max(args.batches)
        th = max(rows, key=lambda x: x["x_realtime"])["threads"]
        res = run_worker(base | {"batch": b, "threads": th, "paths": [str(long)]})
        decoded_mb = args.long_minutes * 60 * 24000 * 4 / 2**20
        res |= {"minutes": args.long_minutes, "decoded_size_mb": decoded_mb, "file_mb": long.stat().st_size / 2**20}
        result["long_file"] = res
        md += ["", f"Streamed {args.long_minutes:g}-min synthetic file (16 kHz WAV, {res['file_mb']:.0f} MB; "
               f"{decoded_mb:.0f} MB if decoded whole at 24 kHz float32), batch {b}, {th} thread(s):",
               md_table([{k: res[k] for k in ("audio_s", "wall_s", "x_realtime", "windows_per_s", "rss_before_mb", "peak_rss_mb")}], floatfmt="{:.1f}")]
        long.unlink()
    result["wall_s"] = round(time.time() - t0, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, result)
    text = "\n".join(md) + f"\n\nbenchmark wall {result['wall_s']:.0f} s (load average at start {result['machine']['loadavg'][0]:.2f})\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
