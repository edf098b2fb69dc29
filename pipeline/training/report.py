"""The model report of one validated version: a self-contained HTML page and its PNGs, and the one-line
descriptions a person reads in the registry.

A version's evidence is spread over what validate writes (verdict.json: gates, operating points,
before/after; metrics.json; tables.json; held_out_scores.json: every held-out score of both models) and
over its lineage (registry tags, run tags). `build_report` turns those inputs into one page a person can
open offline (images embedded as base64, no external asset) plus the same pictures as PNGs for
`dvc plots`. It reads no store: pipeline.io.version_report gathers the inputs from MLflow.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

from pipeline.core.metrics import EARLIER_GATE, det_points, wilson  # noqa: E402

MODELS = ("candidate", "production")
COLOURS = {"candidate": "tab:blue", "production": "tab:orange"}
PLOTS = {"det": "report_det.png", "sources": "report_scores_by_source.png"}
_DET_TICKS = [0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95]


# --- the one-line descriptions of registry versions ---

def describe_candidate(verdict: dict, metrics: dict, *, base_version: int | None, data_hash: str,
                       trigger: str) -> str:
    """What triggered the candidate, on which data, its verdict and the two or three figures that decided it."""
    gens = sorted({r["generator"] for r in verdict.get("before_after", [])}) or ["?"]
    ev = verdict.get("evidence", {})
    head = (f"{trigger}: {verdict.get('recipe') or 'fine-tuned'} candidate for {', '.join(gens)} "
            f"({ev.get('new_files', '?')} new files held out, data {data_hash[:8] or '?'}), "
            f"judged against v{base_version if base_version is not None else '?'}")
    status = verdict["status"]
    if status == "insufficient evidence":
        return f"{head}: INSUFFICIENT EVIDENCE - " + "; ".join(m.split(" (")[0] for m in verdict["missing_evidence"])
    gates = verdict["gates"]
    failed = [n for n, g in gates.items() if not g["passed"]]
    earlier = [n for n in gates if n.startswith(EARLIER_GATE)][:1]   # the first operating point: the served 1 % by default
    shown = failed[:3] if failed else [n for n in ("new_generator_recall", "human_fpr", *earlier) if n in gates]
    figures = [_figure(n, gates[n], metrics) for n in shown]
    return f"{head}: {status.upper()} - " + "; ".join(figures)


def _figure(name: str, gate: dict, metrics: dict) -> str:
    """One gate as a short phrase: value, count or interval, and what it was held to."""
    label = {"new_generator_recall": "new-generator recall (held out)", "human_fpr": "human FPR",
             "eer_vs_production": "EER"}.get(name, name.replace("_", " "))
    if name.startswith(EARLIER_GATE):   # + "_at_1pct_fpr" (metrics.at_fpr); a verdict before 2026-11-28 has no suffix
        at = name[len(EARLIER_GATE) + 1:]
        ref = metrics.get("production", {}).get(f"earlier_ai_recall_{at}") if at else None
        label = "earlier-AI recall at equal FPR" + (f" ({at.removeprefix('at_').replace('pct_fpr', ' %')})" if at else "")
        return f"{label} {gate['value']:.2f} (rule {gate['rule']}" + (f", champion {ref:.2f})" if ref is not None else ")")
    if name == "frozen_weights_unchanged":
        return "frozen weights changed: " + ", ".join(k for k, same in gate["value"].items() if not same)
    count = f" {gate['count']}" if "count" in gate else ""
    ends = f", 95 % upper {gate['interval'][1]:.3f}" if name == "human_fpr" and "interval" in gate else ""
    return f"{label} {gate.get('estimate', gate['value']):.3f}{count}{ends} (rule {gate['rule']})"


def describe_base(how: str, *, data_hash: str, figures: list[str]) -> str:
    """A base model (bootstrap, imported checkpoint): how it was made, on which data, what it measured."""
    return f"Base model {how}, data {data_hash[:8] or 'unknown'}, not judged by gates" + \
        (": " + "; ".join(figures) if figures else "")


# --- the report ---

def build_report(inputs: dict, html_path: Path, plots_dir: Path) -> dict[str, Path]:
    """Write the PNGs into plots_dir and the self-contained page to html_path; returns what was written.

    inputs: verdict, metrics, tables, scores (held_out_scores.json), lineage (flat dict), description."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    pngs = {"det": det_figure(inputs["scores"], plots_dir / PLOTS["det"]),
            "sources": source_histograms(inputs["scores"], plots_dir / PLOTS["sources"])}
    html_path.write_text(render_html(inputs, {k: p.read_bytes() for k, p in pngs.items()}), encoding="utf-8")
    return {"html": html_path} | pngs


def _probit(x) -> np.ndarray:
    """Normal deviates, clipped to the plotted range so that a rate of 0 or 1 shows on the border."""
    return norm.ppf(np.clip(np.asarray(x, float), _DET_TICKS[0], _DET_TICKS[-1]))


def det_figure(scores: dict, out: Path) -> Path:
    """DET curves (probit axes) of both models on the held-out test split (earlier AI vs test humans,
    solid) and on the new generator's files vs the same humans (dashed), each model's threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name in MODELS:
        m = scores.get(name)
        if not m:
            continue
        s, y = np.asarray(m["scores"], float), np.asarray(m["labels"], int)
        humans = s[y == 0]
        curves = (("earlier AI", s, y, "-"),
                  ("new generator", np.r_[humans, m["new_scores"]], np.r_[np.zeros(len(humans), int), np.ones(len(m["new_scores"]), int)], "--"))
        for what, ss, yy, style in curves:
            if yy.min() == yy.max():
                continue
            fpr, fnr, _ = det_points(ss, yy)
            ax.plot(_probit(fpr), _probit(fnr), style, color=COLOURS[name], label=f"{name}: {what}")
        if len(humans) and (y == 1).any():
            at = m["threshold"]
            fp, fn = float((humans >= at).mean()), float((s[y == 1] < at).mean())
            ax.plot(_probit(fp), _probit(fn), "o", color=COLOURS[name], label=f"{name} at its threshold {at:.3f}")
    ticks = _probit(_DET_TICKS)
    ax.set_xticks(ticks, [f"{t:g}" for t in _DET_TICKS])
    ax.set_yticks(ticks, [f"{t:g}" for t in _DET_TICKS])
    ax.plot(ticks[[0, -1]], ticks[[0, -1]], color="grey", linewidth=0.5)
    ax.set(xlim=ticks[[0, -1]], ylim=ticks[[0, -1]], xlabel="false-positive rate (test humans)",
           ylabel="false-negative rate (AI)", title="DET: candidate vs production, same held-out clips")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def source_histograms(scores: dict, out: Path) -> Path:
    """One panel per held-out source (and one for the new generator's files): both models' AI scores,
    both thresholds."""
    cand = scores["candidate"]
    panels = {}
    for src, label in zip(cand["sources"], cand["labels"]):
        panels.setdefault(src, "AI" if label else "human")
    names = sorted(panels) + ["new generator"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, src in zip(axes.flat, names):
        for name in MODELS:
            m = scores.get(name)
            if not m:
                continue
            if src == "new generator":
                values = m["new_scores"]
            else:
                values = [s for s, so in zip(m["scores"], m["sources"]) if so == src]
            kw = {"alpha": 0.5} if name == "candidate" else {"histtype": "step", "linewidth": 1.5}
            ax.hist(values, bins=bins, color=COLOURS[name], label=name, **kw)
            ax.axvline(min(m["threshold"], 1.0), color=COLOURS[name], linestyle="--", linewidth=1)
        kind = "AI, held out" if src == "new generator" else panels[src]
        ax.set_title(f"{src} ({kind})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("AI scores per source (dashed: each model's threshold)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _esc(value) -> str:
    return html.escape("-" if value is None else str(value))


def _num(value, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return _esc(value)
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return _esc(value)


def _rate_cell(value: float, n: int) -> str:
    """A rate with its count and 95 % Wilson interval, from the rate and its denominator."""
    if not n or value != value:
        return "-"
    k = int(round(value * n))
    lo, hi = wilson(k, n)
    return f"{value:.3f} ({k}/{n}) [{lo:.2f}, {hi:.2f}]"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def gates_table(verdict: dict) -> str:
    rows = []
    for name, g in verdict.get("gates", {}).items():
        value = ", ".join(f"{k}: {'same' if v else 'CHANGED'}" for k, v in g["value"].items()) \
            if isinstance(g["value"], dict) else _num(g["value"], 4)
        est = f"{g['estimate']} [{g['interval'][0]}, {g['interval'][1]}] ({g['count']}, gated on {g['gated_on']})" \
            if "estimate" in g else ""
        ok = '<span class="pass">passed</span>' if g["passed"] else '<span class="fail">FAILED</span>'
        rows.append([_esc(name), _esc(value), _esc(est), _esc(g["rule"]), ok])
    return _table(["gate", "value", "estimate [95 % interval] (count)", "rule", "outcome"], rows, "gates")


def summary_table(metrics: dict) -> str:
    keys = [k for k in metrics.get("candidate", {}) if not k.endswith(("_low", "_high"))]
    rows = []
    for k in keys:
        cells = []
        for name in MODELS:
            m = metrics.get(name, {})
            v = m.get(k)
            if f"{k}_low" in m:
                cells.append(f"{_num(v)} [{_num(m[f'{k}_low'], 2)}, {_num(m[f'{k}_high'], 2)}]")
            else:
                cells.append(_num(v))
        rows.append([_esc(k), *cells])
    return _table(["metric (same held-out clips)", "candidate", "production"], rows)


def operating_points_table(verdict: dict) -> str:
    points = verdict.get("operating_points") or {}
    rows = [[f"{c['human_fpr']:.0%}", _num(c["new_recall"]), _num(p["new_recall"]), _num(c["earlier_ai_recall"]),
             _num(p["earlier_ai_recall"])] for c, p in zip(points.get("candidate", []), points.get("production", []))]
    return _table(["human FPR", "candidate: new generator (held out)", "production: new generator",
                   "candidate: earlier AI", "production: earlier AI"], rows)


def generator_table(tables: dict) -> str:
    """Each generator's AI clips against all test humans: recall at each model's own threshold, EER, AUC."""
    gens = sorted(set().union(*[tables.get(n, {}).get("per_generator", {}) for n in MODELS]))
    rows = []
    for g in gens:
        row = [_esc(g)]
        for name in MODELS:
            r = tables.get(name, {}).get("per_generator", {}).get(g)
            row += [_rate_cell(r["recall"], r["n_ai"]), _num(r["eer"]), _num(r["auc"])] if r else ["-", "-", "-"]
        rows.append(row)
    return _table(["generator", "candidate recall [95 %]", "EER", "AUC", "production recall [95 %]", "EER", "AUC"], rows)


def source_table(tables: dict) -> str:
    """Each held-out source alone: human FPR for human sources, recall for AI ones, at each model's threshold."""
    srcs = sorted(set().union(*[tables.get(n, {}).get("per_source", {}) for n in MODELS]))
    rows = []
    for src in srcs:
        row = [_esc(src)]
        for name in MODELS:
            r = tables.get(name, {}).get("per_source", {}).get(src)
            if not r:
                row += ["-", "-"]
                continue
            cells = []
            if r["n_human"]:
                cells.append("FPR " + _rate_cell(r["fpr"], r["n_human"]))
            if r["n_ai"]:
                cells.append("recall " + _rate_cell(r["recall"], r["n_ai"]))
            row += ["<br>".join(cells), _num(r["eer"])]
        rows.append(row)
    return _table(["source", "candidate at its threshold [95 %]", "EER", "production at its threshold [95 %]", "EER"], rows)


def before_after_table(verdict: dict) -> str:
    rows = []
    for r in verdict.get("before_after", []):
        trained = r.get("trained_on_it", True)   # verdicts before 2026-11-27 name the key candidate_trained_on_it
        rows.append([_esc(r["file"]), _esc(r["generator"]), _num(r["production"]),
                     _num(r["candidate"] if "candidate" in r else r["candidate_trained_on_it"]),
                     "yes" if trained else "no (test split)", _num(r["candidate_held_out"])])
    return _table(["file (sha256)", "generator", "production", "candidate", "candidate trained on it",
                   "candidate (held out)"], rows)


def lineage_table(lineage: dict) -> str:
    return _table(["", ""], [[_esc(k), f"<code>{_esc(v)}</code>"] for k, v in lineage.items() if v not in (None, "")])


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f0f0f0}.pass{color:#080}.fail{color:#b00;font-weight:bold}img{max-width:100%}
.status{font-size:1.3em;font-weight:bold}.passed{color:#080}.failed,.insufficient-evidence{color:#b00}"""


def render_html(inputs: dict, images: dict[str, bytes]) -> str:
    """The page: verdict and description, gates, both models, pictures (embedded), tables, lineage."""
    v, lin = inputs["verdict"], inputs["lineage"]
    title = f"{lin.get('model', 'model')} v{lin.get('version', '?')}: {v['status']}"
    img = lambda key, alt: f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(images[key]).decode()}">'
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in v.get("reasons", []))
    ev = v.get("evidence", {})
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(lin.get('model'))} v{_esc(lin.get('version'))}</h1>",
        f"<p class='status {_esc(v['status'].replace(' ', '-'))}'>{_esc(v['status'].upper())}</p>",
        f"<p>{_esc(inputs.get('description', ''))}</p>",
        f"<ul>{reasons}</ul>" if reasons else "",
        f"<p>Recipe {_esc(v.get('recipe'))}; served threshold {_num(v.get('threshold'))}; new-generator recall "
        f"measured {_esc(v.get('lofo_method'))}; evidence: {_esc(', '.join(f'{k} {x}' for k, x in ev.items()))}; "
        f"candidate {_esc(v.get('tries_on_gate_data'))} judged on gate data <code>{_esc(v.get('gate_data'))}</code>.</p>",
        "<h2>Gates</h2>", gates_table(v),
        "<h2>Candidate vs production</h2>", summary_table(inputs["metrics"]),
        "<h3>At the same human false-positive rate (test humans)</h3>", operating_points_table(v),
        "<h2>DET curves</h2>", img("det", "DET curves of candidate and production"),
        "<h2>Scores per source</h2>", img("sources", "score histograms per source"),
        "<h2>Per generator</h2><p>Each generator's AI clips against all test humans; recall at each model's own "
        "threshold with its count and 95 % Wilson interval.</p>", generator_table(inputs["tables"]),
        "<h2>Per source</h2>", source_table(inputs["tables"]),
        "<h2>Before / after on the new samples</h2>", before_after_table(v),
        "<h2>Lineage</h2>", lineage_table(lin),
        "</body></html>",
    ]
    return "\n".join(parts)
