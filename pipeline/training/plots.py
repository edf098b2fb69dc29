"""ROC/DET data for `dvc plots` (CSV per model) and PNG pictures of the same, plus score histograms
and confusion matrices at each model's threshold."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import atomic  # noqa: E402
from pipeline.core.metrics import det_points, roc_points  # noqa: E402


def _savefig(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format=path.suffix.lstrip("."))


def write_plots(models: dict[str, dict], out: Path) -> list[Path]:
    """models: name -> {"scores", "labels", "threshold"}; writes roc_<name>.csv, roc.png, det.png, scores.png,
    confusion.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_det, ax_det = plt.subplots(figsize=(5, 5))
    fig_hist, axes = plt.subplots(len(models), 1, figsize=(6, 2.5 * len(models)), squeeze=False)
    fig_conf, conf_axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3), squeeze=False)
    for (name, m), ax_h, ax_c in zip(models.items(), axes[:, 0], conf_axes[0]):
        s, y = np.asarray(m["scores"]), np.asarray(m["labels"])
        fpr, tpr, _ = roc_points(s, y)
        path = out / f"roc_{name}.csv"
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(["fpr", "tpr", "fnr"])
        w.writerows(zip(np.round(fpr, 5), np.round(tpr, 5), np.round(1 - tpr, 5)))
        atomic.write_text(path, buf.getvalue())
        written.append(path)
        ax_roc.plot(fpr, tpr, label=name)
        if y.min() < y.max():   # a DET curve needs both classes
            det_fpr, det_fnr, _ = det_points(s, y)
            ax_det.plot(np.clip(det_fpr, 1e-3, 1), np.clip(det_fnr, 1e-3, 1), label=name)
        bins = np.linspace(0, 1, 41)
        ax_h.hist(s[y == 0], bins=bins, alpha=0.6, label="human")
        ax_h.hist(s[y == 1], bins=bins, alpha=0.6, label="ai")
        ax_h.axvline(m["threshold"], color="k", linestyle="--", label=f"threshold {m['threshold']:.3f}")
        ax_h.set_title(f"{name}: AI scores on held-out clips")
        ax_h.legend()
        _confusion(ax_c, y, s >= m["threshold"], name)
    ax_roc.set(xlabel="false-positive rate (human)", ylabel="true-positive rate (AI)", title="ROC")
    ax_det.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="false-negative rate", title="DET")
    figures = ((fig_roc, ax_roc, "roc.png"), (fig_det, ax_det, "det.png"), (fig_hist, None, "scores.png"),
               (fig_conf, None, "confusion.png"))
    for fig, ax, name in figures:
        if ax is not None:
            ax.legend()
        fig.tight_layout()
        _savefig(fig, out / name)
        plt.close(fig)
        written.append(out / name)
    return written


def _confusion(ax, labels: np.ndarray, called_ai: np.ndarray, title: str) -> None:
    """2x2 counts: rows true human/AI, columns called human/AI."""
    counts = np.array([[np.sum((labels == t) & (called_ai == c)) for c in (False, True)] for t in (0, 1)])
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["human", "AI"], yticklabels=["human", "AI"],
           xlabel="called", ylabel="true", title=title)


def write_lso_plots(result: dict, out: Path) -> list[Path]:
    """Leave-sources-out pictures: pooled DET curve per seed, and per held-out source the human FPR /
    AI recall at the fold model's calibrated threshold (first seed)."""
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    for seed in result["per_seed"]:
        rows = seed["scores"]
        fpr, fnr, _ = det_points([r["ai_score"] for r in rows], [int(r["label"] == "ai") for r in rows])
        ax.plot(np.clip(fpr, 1e-3, 1), np.clip(fnr, 1e-3, 1), label=f"seed {seed['seed']}: EER {seed['pooled_eer']:.3f}")
    ax.plot([1e-3, 1], [1e-3, 1], color="grey", linewidth=0.5)
    ax.set(xscale="log", yscale="log", xlabel="false-positive rate (human)", ylabel="false-negative rate (AI)",
           title="leave-sources-out, pooled")
    ax.legend()
    fig.tight_layout()
    _savefig(fig, out / "det.png")
    plt.close(fig)
    rows = result["per_seed"][0]["per_source"]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(rows))))
    names = [r["source"] for r in rows]
    ax.barh(names, [r["fpr"] if r["n_human"] else 0 for r in rows], color="tab:blue", label="human FPR")
    ax.barh(names, [-(r["recall"]) if r["n_ai"] else 0 for r in rows], color="tab:red", label="AI recall (left)")
    ax.axvline(0, color="k", linewidth=0.5)
    ax.set(xlim=(-1, 1), title="held-out sources at the calibrated threshold")
    ax.legend(loc="lower right", fontsize=7)
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    _savefig(fig, out / "per_source.png")
    plt.close(fig)
    return [out / "det.png", out / "per_source.png"]
