"""The run report: one self-contained HTML page (``<run_dir>/report.html``) to read after a run.

``render_report`` is pure: a JSON-like dict in (run facts, the preprocessing summary, training
histories, metrics, the gate's verdict, misclassified examples, model sizes), the HTML text
out. Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``: no pyplot, no
global state, rendered by Agg) into PNGs embedded as ``data:`` URIs, thumbnails are embedded
the same way, and the page is filled from the autoescaped Jinja2 template ``report.html.j2``
beside this module, so it renders offline and holds no reference to any external resource. A
part the run did not produce (an optional or missing value) is shown as "not available"
instead of failing the whole report. ``write_report`` is the I/O edge, called by the
evaluation stage on the chief.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from components.core import storage

_TEMPLATE = "report.html.j2"
_COLORS = {"baseline": "#8c959f", "candidate": "#0969da", "champion": "#bf8700"}
_METRICS = (  # (key, label, higher is better)
    ("accuracy", "Accuracy", True),
    ("top_k_accuracy", "Top-{k} accuracy", True),
    ("macro_f1", "Macro F1", True),
    ("log_loss", "Log loss", False),
    ("ece", "Expected calibration error", False),
)
_SPLITS = ("train", "eval", "test")
_DPI = 110
_MAX_ANNOTATED = 20  # confusion-matrix cells carry their counts up to this many classes


def render_report(data: dict) -> str:
    """Renders the report page; pure (no I/O), runs wherever the evaluation stage runs.

    Args:
        data: the run's facts (name, classes, preprocessing summary, histories, metrics,
            verdict, misclassified examples, models), plain JSON-like values plus JPEG bytes.

    Returns:
        The HTML text of one self-contained page.
    """
    classes = list(data.get("classes") or [])
    metrics = data.get("metrics") or {}
    verdict = data.get("verdict") or {}
    context = {
        "title": f"{data.get('name', 'run')} — run report",
        "name": data.get("name", "run"),
        "run_dir": data.get("run_dir", ""),
        "meta": _meta(data),
        "decision": _decision(verdict),
        "metrics": _metric_table(metrics, verdict),
        "gate": _gate(verdict),
        "champion": _champion(verdict),
        "data": _data_summary(data.get("preprocess"), classes),
        "plots": [
            {"title": "Training curves", "uri": _curves(data.get("histories") or {})},
            {"title": "Confusion matrices", "uri": _confusions(metrics, classes)},
            {"title": "Per-class precision, recall and F1", "uri": _per_class(metrics, classes)},
        ],
        "errors": _errors(data.get("misclassified") or []),
        "models": _models(data.get("models") or {}, metrics),
    }
    return _template().render(**context)


def write_report(path: str, data: dict) -> None:
    """Renders the report and writes it atomically to ``path`` (local path or ``gs://`` URI).

    Args:
        path: where the page goes, normally ``<run_dir>/report.html``.
        data: see :func:`render_report`.
    """
    storage.write_text(path, render_report(data))


def _template() -> jinja2.Template:
    source = resources.files(__package__).joinpath(_TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(source)


# Formatting: every number on the page goes through one of these.


def _num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    """Fixed decimals (4 by default), "—" when missing."""
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _size(n: int | None) -> str:
    """Bytes in decimal units: ``12.3 MB``, ``456.7 KB``."""
    if n is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _latency(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def _interval(ci: list | None) -> str:
    return "—" if not ci or len(ci) != 2 else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction * 100:g}%"


def _time(iso: str | None) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS`` (+ zone), or the text as given if it is not ISO."""
    if not iso:
        return "time not available"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (f" {moment.tzname()}" if moment.tzinfo else "")


# Page parts: each turns one part of ``data`` into strings for the template (None: not available).


def _meta(data: dict) -> list[str]:
    classes = data.get("classes") or []
    return [
        f"backbone {data.get('backbone', '—')}",
        f"{data.get('image_size', '—')} px",
        f"{len(classes)} classes: {', '.join(classes)}",
        _time(data.get("created")),
    ]


def _decision(verdict: dict) -> dict:
    if "blessed" not in verdict:
        return {"css": "none", "word": "NO DECISION", "reason": "Verdict: not available."}
    word, css = ("BLESSED", "pass") if verdict["blessed"] else ("NOT BLESSED", "fail")
    return {"css": css, "word": word, "reason": verdict.get("reason", "")}


def _metric_table(metrics: dict, verdict: dict) -> dict | None:
    base, cand, champ = metrics.get("baseline"), metrics.get("candidate"), metrics.get("champion")
    if not base or not cand:
        return None
    models = [base, cand] + ([champ] if champ else [])
    version = (verdict.get("champion") or {}).get("version")
    champion_col = [f"Champion v{version}" if version is not None else "Champion"] if champ else []
    ci_col = f"{_percent(verdict.get('confidence'))} CI of Δ" if verdict.get("confidence") else "CI of Δ"
    rows = []
    for key, label, higher in _METRICS:
        if key not in cand:
            continue
        delta = cand[key] - base[key] if key in base else None
        better = delta is not None and delta != 0 and (delta > 0) == higher
        gate = key == verdict.get("metric")
        rows.append(
            {
                "label": label.format(k=cand.get("top_k", "k")),
                "cells": [_num(m.get(key)) for m in models],
                "delta": _num(delta, sign=True),
                "delta_css": "" if not delta else ("better" if better else "worse"),
                "ci": _interval(verdict.get("confidence_interval")) if gate else "—",
                "gate": gate,
            }
        )
    examples = [_count(m.get("examples")) for m in models]
    rows.append(
        {"label": "Test examples", "cells": examples, "delta": "", "delta_css": "", "ci": "", "gate": False}
    )
    return {"columns": ["Baseline", "Candidate", *champion_col, "Δ", ci_col], "rows": rows}


def _gate(verdict: dict) -> list[tuple[str, str]] | None:
    if "metric" not in verdict:
        return None
    return [
        ("Metric", verdict["metric"]),
        ("Baseline → candidate", f"{_num(verdict.get('baseline'))} → {_num(verdict.get('candidate'))}"),
        ("Δ", _num(verdict.get("delta"), sign=True)),
        (f"{_percent(verdict.get('confidence'))} CI of Δ", _interval(verdict.get("confidence_interval"))),
        ("Minimum improvement", _num(verdict.get("min_improvement"), sign=True)),
        *([("Minimum value", _num(verdict["min_value"]))] if verdict.get("min_value") is not None else []),
        ("Test examples", _count(verdict.get("test_examples"))),
    ]


def _champion(verdict: dict) -> list[tuple[str, str]] | None:
    champ = verdict.get("champion")
    if not champ:
        return None
    return [
        ("Version", f"v{champ.get('version')}"),
        ("Champion value", _num(champ.get("value"))),
        ("Δ (candidate − champion)", _num(champ.get("delta"), sign=True)),
        ("CI of Δ", _interval(champ.get("confidence_interval"))),
        ("Passed", "yes" if champ.get("passed") else "no"),
        ("Reason", champ.get("reason", "")),
    ]


def _data_summary(summary: dict | None, classes: list[str]) -> dict | None:
    if not summary:
        return None
    per_class = summary.get("per_class") or {}
    records = summary.get("records") or {}
    splits = [s for s in _SPLITS if s in per_class or s in records]
    splits += sorted(set(per_class) - set(splits))
    names = classes + sorted({c for counts in per_class.values() for c in counts} - set(classes))
    rows = []
    for name in names:
        counts = [per_class.get(s, {}).get(name, 0) for s in splits]
        rows.append([name, *map(_count, counts), _count(sum(counts))])
    totals = [records.get(s, sum(per_class.get(s, {}).values())) for s in splits]
    dead = summary.get("dead_letter") or {}
    dup = summary.get("duplicates") or {}
    return {
        "source": summary.get("source", "—"),
        "splits": splits,
        "rows": rows,
        "totals": ["total", *map(_count, totals), _count(sum(totals))],
        "dead_count": _count(dead.get("count", 0)),
        "dead_reasons": sorted((dead.get("by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0])),
        "quality": [
            ("Duplicate images", _count(dup.get("count"))),
            ("… across splits", _count(dup.get("cross_split"))),
            ("… with conflicting labels", _count(dup.get("conflicting_label"))),
            ("Leaking across splits", _count((summary.get("leakage") or {}).get("count"))),
        ],
    }


def _errors(misclassified: list[dict]) -> list[dict]:
    return [
        {
            "src": _data_uri("image/jpeg", e["jpeg"]) if e.get("jpeg") else None,
            "uri": e.get("uri", ""),
            "true": e.get("true", "—"),
            "predicted": e.get("predicted", "—"),
            "confidence": _num(e.get("confidence"), digits=2),
        }
        for e in misclassified
    ]


def _models(models: dict, metrics: dict) -> list[dict]:
    rows = [
        _model_row(name, models.get(key), (metrics.get(key) or {}).get("accuracy"), "")
        for key, name in (("baseline", "Baseline (Keras)"), ("candidate", "Candidate (Keras)"))
    ]
    lite = models.get("tflite") or {}
    saved_accuracy = lite.get("saved_model_accuracy")  # measured beside the TFLite model
    rows.append(_model_row("SavedModel (serving)", models.get("saved_model"), saved_accuracy, ""))
    notes = f"{lite.get('quantization', '—')} quantization"
    if lite.get("accuracy") is not None and saved_accuracy is not None:
        notes += f"; Δ accuracy vs SavedModel {_num(lite['accuracy'] - saved_accuracy, sign=True)}"
    rows.append(_model_row("TFLite", lite, lite.get("accuracy"), notes))
    return rows


def _model_row(name: str, model: dict | None, accuracy: float | None, notes: str) -> dict:
    if not model:
        return {"name": name, "available": False}
    return {
        "name": name,
        "available": True,
        "size": _size(model.get("size_bytes")),
        "latency": _latency(model.get("latency_ms")),
        "accuracy": _num(accuracy),
        "notes": notes,
        "path": model.get("path"),
    }


# Plots: matplotlib Figures (no pyplot) rendered to PNG data URIs; None when there is nothing to draw.


def _data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _png(fig: Figure) -> str:
    """Renders the figure with Agg (no software tag, so no URL in the PNG) and frees it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    finally:
        fig.clear()
    return _data_uri("image/png", buf.getvalue())


def _curves(histories: dict) -> str | None:
    """Loss and accuracy per epoch, train and val; the candidate's epochs continue the baseline's."""
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    phases = [(p, histories.get(p) or {}) for p in ("baseline", "candidate")]
    phases = [(p, h, max(len(h.get(k) or []) for k in keys)) for p, h in phases]
    if not any(n for _, _, n in phases):
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    start = 0
    for phase, history, n in phases:
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            for name, style in ((key, "-"), (f"val_{key}", "--")):
                values = history.get(name) or []
                epochs = range(start + 1, start + len(values) + 1)
                label = f"{phase} {'val' if name.startswith('val_') else 'train'}"
                if values:
                    ax.plot(epochs, values, style, marker="o", ms=3, label=label, color=_COLORS[phase])
            if start and n:
                ax.axvline(start + 0.5, color="#d1d9e0", lw=1)
        start += n
    for ax, title in zip(axes, ("Loss", "Accuracy"), strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8, frameon=False)
    return _png(fig)


def _class_ticks(ax: Any, classes: list[str], room: int) -> None:
    """Class names as x tick labels, slanted when ``room`` characters cannot hold them in a row."""
    crowded = max(map(len, classes)) * len(classes) > room
    rotation, align = (30, "right") if crowded else (0, "center")
    ax.set_xticks(range(len(classes)), classes, rotation=rotation, ha=align, rotation_mode="anchor")


def _confusions(metrics: dict, classes: list[str]) -> str | None:
    """Baseline and candidate confusion matrices side by side: counts, shaded by row share."""
    shown = [
        (m, metrics[m]) for m in ("baseline", "candidate") if (metrics.get(m) or {}).get("confusion_matrix")
    ]
    if not shown or not classes:
        return None
    n = len(classes)
    side = min(max(4.2, 0.4 * n + 3.0), 10.0)
    rows = len(shown) if n > 8 else 1  # many classes: one matrix above the other, each full width
    fig = Figure(figsize=(side * len(shown) / rows, side * rows), layout="constrained")
    for ax, (model, m) in zip(np.ravel(fig.subplots(rows, len(shown) // rows)), shown, strict=True):
        counts = np.asarray(m["confusion_matrix"], dtype=np.int64)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{model} (accuracy {_num(m.get('accuracy'))})", fontsize=11)
        _class_ticks(ax, classes, room=48)
        ax.set_yticks(range(n), classes)
        ax.set(xlabel="predicted", ylabel="true")
        if n <= _MAX_ANNOTATED:
            for (i, j), value in np.ndenumerate(counts):
                color = "white" if share[i, j] > 0.6 else "#1f2328"
                ax.text(
                    j, i, f"{value:,}", ha="center", va="center", color=color, fontsize=10 if n <= 10 else 8
                )
    return _png(fig)


def _per_class(metrics: dict, classes: list[str]) -> str | None:
    """Per-class precision, recall and F1, bars grouped by class, one colour per model."""
    shown = [(m, metrics[m]["per_class"]) for m in _COLORS if (metrics.get(m) or {}).get("per_class")]
    if not shown or not classes:
        return None
    x, width = np.arange(len(classes)), 0.8 / len(shown)
    wide = len(classes) > 8  # many classes: one full-width row per score instead of three panels
    fig = Figure(figsize=(10, 9.5 if wide else 3.8), layout="constrained")
    axes = fig.subplots(3 if wide else 1, 1 if wide else 3, sharey=True)
    for ax, key in zip(axes, ("precision", "recall", "f1"), strict=True):
        for k, (model, per_class) in enumerate(shown):
            values = [(per_class.get(c) or {}).get(key, 0.0) for c in classes]
            offset = (k - (len(shown) - 1) / 2) * width
            bars = ax.bar(x + offset, values, width, label=model, color=_COLORS[model])
            if len(shown) <= 2 and len(classes) <= 6:
                ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_title("F1" if key == "f1" else key.capitalize())
        _class_ticks(ax, classes, room=100 if wide else 30)
        ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8, frameon=False)
    return _png(fig)
