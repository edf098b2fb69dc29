"""Does a frozen, pretrained speech encoder generalise across recording chains better than our trained trunk?

The only pretrained speech encoder a PyPI wheel ships with its weights here is Resemblyzer's speaker
encoder (GE2E, a 3-layer LSTM on 40-mel at 16 kHz, trained for speaker verification; install it with
`pip install --no-deps resemblyzer`: this script reads its `pretrained.pt` with `weights_only=True` and
does not import the package, which needs librosa and webrtcvad). Each clip gets two fixed vectors:
the speaker embedding (L2-normed mean over 1.6 s partials, as Resemblyzer computes it) and the mean of
the top LSTM layer's states. A logistic regression on them is trained and judged under the same
leave-sources-out folds as `bench/base_eer.py` (pooled EER, matched-pair within-source EER), with or
without the twins of `--twins-dir`; `--fuse` adds the mean logit of this regression and of the trunk's
held-out scores from `base_eer.py` result files (same folds and clips).

    pip install --no-deps resemblyzer
    python bench/pretrained_lso.py --twins-dir data/twins --fuse bench/results/base_eer_all.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from _common import DEFAULT_CORPUS, REPO, RESULTS, logit, machine, md_table, write_json

PARTIAL, STEP = 160, 77     # frames (10 ms) per partial, and between partials (Resemblyzer's rate 1.3/s)


def encoder(weights: Path) -> tuple[torch.nn.LSTM, torch.nn.Linear]:
    state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
    lstm, linear = torch.nn.LSTM(40, 256, 3, batch_first=True), torch.nn.Linear(256, 256)
    lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
    linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
    return lstm.eval(), linear.eval()


def embed(x: np.ndarray, lstm, linear, mel) -> np.ndarray:
    """[speaker embedding (256), mean top-layer state (256)] of a 16 kHz clip."""
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) + 1e-9
    x = x * max(1.0, 10 ** (-30 / 20) / rms)          # Resemblyzer's volume normalisation (-30 dBFS, up only)
    m = mel(torch.from_numpy(x.astype(np.float32))).T  # frames x 40, power (Resemblyzer feeds no log)
    starts = range(0, max(1, m.shape[0] - PARTIAL + STEP + 1), STEP)
    parts = torch.stack([torch.nn.functional.pad(m[s:s + PARTIAL], (0, 0, 0, PARTIAL - len(m[s:s + PARTIAL])))
                         for s in starts])
    with torch.no_grad():
        states, (hidden, _) = lstm(parts)
        e = torch.relu(linear(hidden[-1]))
        e = (e / e.norm(dim=1, keepdim=True).clamp_min(1e-9)).mean(0)
    return np.concatenate([(e / e.norm()).numpy(), states.mean((0, 1)).numpy()])


def features(clips, params, weights: Path) -> dict[str, np.ndarray]:
    import torchaudio

    from pipeline.core.audio import load_audio

    cfg = params.audio.model_copy(update={"sample_rate": 16000})
    lstm, linear = encoder(weights)
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=40, norm="slaney",
                                               mel_scale="slaney", pad_mode="constant")
    out = {}
    for c in clips:
        try:
            out[str(c.path)] = embed(load_audio(c.path, cfg), lstm, linear, mel)
        except Exception as exc:  # noqa: BLE001 - one bad clip is reported, the batch goes on
            print(f"{c.path}: skipped ({exc})")
    return out


def lso_scores(real, extra, feats, folds, C: float) -> np.ndarray:
    """Each clip's held-out score from a regression trained on the other folds' train-split clips (+ twins)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    fold_of = {s: f for f, ss in enumerate(folds) for s in ss}
    scores = np.zeros(len(real))
    for f in range(len(folds)):
        tr = [c for c in real + extra if fold_of[c.source] != f and c.split != "test"]
        te = [i for i, c in enumerate(real) if fold_of[c.source] == f]
        X = np.array([feats[str(c.path)] for c in tr])
        scale = StandardScaler().fit(X)
        lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000).fit(scale.transform(X), [c.label for c in tr])
        scores[te] = lr.predict_proba(scale.transform(np.array([feats[str(real[i].path)] for i in te])))[:, 1]
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--twins-dir", type=Path, help="twins made by `aivoice twins` for this corpus (also judged without)")
    ap.add_argument("--weights", type=Path, help="Resemblyzer's pretrained.pt (default: the installed package's)")
    ap.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="inverse L2 strengths")
    ap.add_argument("--fuse", type=Path, nargs="*", default=[], help="base_eer.py result files to fuse with")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "pretrained_lso.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.config import load_params
    from pipeline.core.data import read_corpus, source_groups
    from pipeline.synthesis.twins import with_twins
    from pipeline.training.lso import source_folds, summarise_seed

    weights = args.weights or Path(importlib.util.find_spec("resemblyzer").origin).parent / "pretrained.pt"
    params = load_params(REPO / "params.yaml")   # the checkout's, wherever it runs from: its linked sources make the folds
    real = read_corpus(args.corpus)
    twins = [c for c in with_twins(real, args.twins_dir) if c.twin_of] if args.twins_dir else []
    folds = source_folds(real, args.folds, params.train.seed, source_groups(params.train.linked_sources))
    feats = features(real + twins, params, weights)
    real = [c for c in real if str(c.path) in feats]
    twins = [c for c in twins if str(c.path) in feats]
    fold_of = np.array([next(f for f, ss in enumerate(folds) if c.source in ss) for c in real])
    rows, best = [], None

    def row(name: str, scores: np.ndarray, clips=real, fo=fold_of) -> dict:
        s = summarise_seed(clips, scores, fo, np.full(len(clips), 0.5), params.train.seed)
        r = {"configuration": name, "pooled_eer": s["pooled_eer"], "ci": "%.3f-%.3f" % tuple(s["pooled_eer_ci"]),
             "per_fold": ", ".join(f"{e:.3f}" for e in s["fold_eers"]), "matched_pair": s["matched_pair_eer"],
             "matched_weighted": s["matched_pair_eer_weighted"]}
        rows.append(r)
        return r

    for with_tw in ([False, True] if twins else [False]):
        for C in args.C:
            scores = lso_scores(real, twins if with_tw else [], feats, folds, C)
            r = row(f"speaker encoder + LR, C={C:g}" + (f", + {len(twins)} twins" if with_tw else ""), scores)
            if not with_tw and (best is None or r["pooled_eer"] < best[0]):
                best = (r["pooled_eer"], C, scores)
    for path in args.fuse:
        ps = json.loads(path.read_text())["per_seed"][0]
        trunk = {r["path"]: r["ai_score"] for r in ps["scores"]}
        keep = [i for i, c in enumerate(real) if str(c.path) in trunk]
        t = np.array([trunk[str(real[i].path)] for i in keep])
        clips, fo = [real[i] for i in keep], fold_of[keep]
        row(f"trunk ({path.name})", t, clips, fo)
        row(f"trunk ({path.name}) + speaker encoder (C={best[1]:g}), mean logit", (logit(t) + logit(best[2][keep])) / 2, clips, fo)
    table = md_table(rows)
    print(table)
    write_json(args.out, {"machine": machine(), "weights": str(weights), "n_clips": len(real), "n_twins": len(twins),
                          "folds": folds, "rows": rows})
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
