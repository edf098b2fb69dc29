"""CPU inference paths of the scoring model, the model alone (log-mel batches in, the three heads out):
eager (the layout training uses), channels_last (what `detect` and `serve` use), torch.compile, and, where
`onnx` and `onnxruntime` are importable, ONNX Runtime fp32 and int8 (dynamic quantisation); with
--ai-branch, channels_last again for the same model with its ai head's own layer4 (what a `last_block`
retrain serves: layer4 runs twice). Windows/s per path and the largest AI-score difference from eager,
all in one process, interleaved rounds, median.

    python bench/inference_paths.py --model models/production.pt --batch 16 --threads 1

(onnxruntime comes with the demo extra (piper-tts); the exporter needs `pip install onnx`.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, md_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint file (default: an untrained model of params model.base_width)")
    ap.add_argument("--batch", type=int, default=16, help="windows per batch (detect.batch_windows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first call compiles for ~1 min)")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--ai-branch", action="store_true", help="also the model with an ai branch (Detector.with_ai_branch)")
    ap.add_argument("--out", type=Path, default=RESULTS / "inference_paths.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from pipeline.config import load_params
    from pipeline.core.features import FrontEnd
    from pipeline.core.model import load_checkpoint, new_model

    torch.set_num_threads(args.threads)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    fresh = lambda: (load_checkpoint(args.model) if args.model else
                     new_model(["en"], params.audio, params.features, params.model.base_width, 0.0)).eval()
    torch.manual_seed(0)
    base = fresh()
    state = base.state_dict()

    def ai_prob(model):   # the AI head's probability, as Scorer.heads computes it
        class AI(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, x):
                return self.m(x)["ai"].softmax(-1)[:, 1]
        return AI().eval()

    front_end = FrontEnd(params.audio, base.meta.feature_config())
    with torch.no_grad():   # real log-mel of noise windows: the shapes and ranges the model sees
        x = front_end(torch.randn(args.batch, round(params.audio.segment_s * params.audio.sample_rate)) * 0.1)
        xcl = x.contiguous(memory_format=torch.channels_last)
    paths = {}
    eager = ai_prob(base)
    cl_model = fresh()
    cl_model.load_state_dict(state)
    cl = ai_prob(cl_model.to(memory_format=torch.channels_last))
    paths["eager"] = lambda: eager(x)
    paths["channels_last"] = lambda: cl(xcl)
    with torch.inference_mode():
        ref = eager(x).numpy()
        notes, diffs = {}, {"eager": 0.0, "channels_last": float(np.abs(cl(xcl).numpy() - ref).max())}
    if args.ai_branch:   # same weights in the branch: same scores, the cost of running layer4 twice
        branch = ai_prob(base.with_ai_branch().eval().to(memory_format=torch.channels_last))
        with torch.inference_mode():
            diffs["channels_last + ai branch"] = float(np.abs(branch(xcl).numpy() - ref).max())
        paths["channels_last + ai branch"] = lambda: branch(xcl)
    if not args.no_compile:
        t = time.perf_counter()
        compiled = torch.compile(ai_prob(base))
        with torch.inference_mode():
            diffs["torch.compile"] = float(np.abs(compiled(x).numpy() - ref).max())
        notes["torch.compile"] = f"first call (compiling) {time.perf_counter() - t:.0f} s"
        paths["torch.compile"] = lambda: compiled(x)
    try:
        if args.no_onnx:
            raise ImportError("--no-onnx")
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime as ort
    except ImportError as exc:
        notes["onnxruntime"] = f"not measured: {exc}"
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        folder = Path(tempfile.mkdtemp(prefix="onnx_"))
        torch.onnx.export(ai_prob(base), (x,), folder / "m.onnx", input_names=["x"], output_names=["p"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        quantize_dynamic(str(folder / "m.onnx"), str(folder / "m8.onnx"), weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        xn = x.numpy()
        for name, file in (("onnxruntime fp32", "m.onnx"), ("onnxruntime int8 (dynamic)", "m8.onnx")):
            session = ort.InferenceSession(str(folder / file), opts, providers=["CPUExecutionProvider"])
            diffs[name] = float(np.abs(session.run(None, {"x": xn})[0] - ref).max())
            paths[name] = (lambda s: lambda: s.run(None, {"x": xn}))(session)
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        for fn in paths.values():   # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    rows = [{"path": k, "windows_per_s": round(rate[k], 1), "vs_eager": round(rate[k] / rate["eager"], 2),
             "max_ai_score_diff": f"{diffs[k]:.1e}", "note": notes.get(k, "")} for k in paths]
    print(md_table(rows))
    for k, v in notes.items():
        if k not in paths:
            print(f"{k}: {v}")
    write_json(args.out, {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "rows": rows, "notes": notes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
