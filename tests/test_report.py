"""The run report: rendered HTML (pure) and the page as headless Chromium shows it."""

from __future__ import annotations

import copy
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from components.evaluate.report import render_report, write_report
from tests.browser import CHROMIUM_AVAILABLE, CHROMIUM_MISSING, open_in_chromium

CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
EVIL_URI = "gs://bucket/test/<script>alert(1)</script>&x.jpg"
PLOTS = 3  # training curves, confusion matrices, per-class bars
needs_chromium = pytest.mark.skipif(not CHROMIUM_AVAILABLE, reason=CHROMIUM_MISSING)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").resize((96, 96), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _metrics(matrix: list[list[int]], log_loss: float, ece: float) -> dict:
    m = np.asarray(matrix)
    tp, predicted, support = np.diag(m), m.sum(axis=0), m.sum(axis=1)
    precision, recall = tp / predicted, tp / support
    f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": float(tp.sum() / m.sum()),
        "top_k_accuracy": 0.9922,
        "top_k": 2,
        "macro_f1": float(f1.mean()),
        "log_loss": log_loss,
        "ece": ece,
        "examples": int(m.sum()),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(CLASSES)
        },
        "confusion_matrix": matrix,
    }


def _history(epochs: int, start: float) -> dict:
    loss = [round(start * 0.8**e, 4) for e in range(epochs)]
    return {
        "loss": loss,
        "accuracy": [round(1 - x / 2, 4) for x in loss],
        "val_loss": [round(x * 1.1, 4) for x in loss],
        "val_accuracy": [round(1 - x / 1.8, 4) for x in loss],
    }


def _data(blessed: bool = True) -> dict:
    """A full run: blessed against a champion, 6 misclassified images (one with an evil uri)."""
    misclassified = [
        {"uri": f"gs://bucket/beans/test/{CLASSES[i % 3]}/{i}.jpg", "true": CLASSES[i % 3],
         "predicted": CLASSES[(i + 1) % 3], "confidence": 0.55 + i / 20, "jpeg": _jpeg(i)}
        for i in range(6)
    ]  # fmt: skip
    misclassified[0]["uri"] = EVIL_URI
    champion = {"version": 3, "value": 0.8672, "delta": 0.0234, "confidence_interval": [0.0078, 0.0391],
                "passed": True, "reason": "candidate beats champion v3"}  # fmt: skip
    return {
        "name": "beans",
        "run_dir": "gs://bucket/runs/beans",
        "created": "2025-11-26T05:50:12+00:00",
        "backbone": "mobilenet_v2_035",
        "image_size": 128,
        "classes": CLASSES,
        "preprocess": {
            "source": "../shared/datasets/beans",
            "records": {"train": 1028, "eval": 139, "test": 128},
            "per_class": {
                "train": {"angular_leaf_spot": 341, "bean_rust": 342, "healthy": 345},
                "eval": {"angular_leaf_spot": 48, "bean_rust": 51, "healthy": 40},
                "test": {"angular_leaf_spot": 43, "bean_rust": 43, "healthy": 42},
            },
            "dead_letter": {"count": 3, "by_reason": {"undecodable": 2, "too_small": 1}},
            "duplicates": {"count": 5, "cross_split": 2, "conflicting_label": 1},
            "leakage": {"count": 2, "examples": []},
            "seconds": 12.7,
        },
        "histories": {"baseline": _history(5, 1.1), "candidate": _history(3, 0.5)},
        "metrics": {
            "baseline": _metrics([[36, 5, 2], [6, 34, 3], [2, 4, 36]], 0.4811, 0.0612),
            "candidate": _metrics([[38, 3, 2], [2, 39, 2], [2, 3, 37]], 0.2533, 0.0321),
            "champion": _metrics([[37, 4, 2], [3, 38, 2], [2, 4, 36]], 0.3012, 0.0402),
        },
        "verdict": {
            "blessed": blessed,
            "reason": "accuracy improved by +0.0625 (95% CI [+0.0234, +0.1016]) >= 0.0100"
            if blessed
            else "accuracy improvement +0.0625 is below the required 0.1000",
            "metric": "accuracy",
            "baseline": 0.8281,
            "candidate": 0.8906,
            "delta": 0.0625,
            "confidence_interval": [0.0234, 0.1016],
            "confidence": 0.95,
            "min_improvement": 0.01 if blessed else 0.1,
            "test_examples": 128,
            "champion": champion,
        },
        "misclassified": misclassified,
        "models": {
            "baseline": {"size_bytes": 1_912_345, "latency_ms": 3.21},
            "candidate": {"size_bytes": 5_433_210, "latency_ms": 4.87},
            "saved_model": {
                "path": "gs://bucket/registry/beans/4",
                "size_bytes": 6_120_000,
                "latency_ms": 5.5,
            },
            "tflite": {
                "path": "gs://bucket/registry/beans/4/model.tflite",
                "size_bytes": 612_345,
                "accuracy": 0.8828,
                "saved_model_accuracy": 0.8906,
                "quantization": "dynamic",
                "latency_ms": 1.92,
            },  # fmt: skip
        },
    }


def _minimal() -> dict:
    """No champion, no misclassified images, no exports, no validation curves."""
    data = copy.deepcopy(_data(blessed=False))
    data["metrics"]["champion"] = None
    data["verdict"]["champion"] = None
    data["misclassified"] = []
    data["models"]["saved_model"] = None
    data["models"]["tflite"] = None
    for history in data["histories"].values():
        del history["val_loss"], history["val_accuracy"]
    return data


CASES = {
    "blessed": lambda: _data(blessed=True),
    "not_blessed": lambda: _data(blessed=False),
    "minimal": _minimal,
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each case written once with ``write_report`` (plots take about a second per page)."""
    root = tmp_path_factory.mktemp("reports")
    paths = {}
    for case, make in CASES.items():
        paths[case] = str(root / case / "report.html")
        write_report(paths[case], make())
    return paths


def _html(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_report_shows_decision_numbers_and_escapes_text(reports):
    html = _html(reports["blessed"])
    assert "BLESSED" in html and "NOT BLESSED" not in html
    assert "accuracy improved by +0.0625 (95% CI [+0.0234, +0.1016]) &gt;= 0.0100" in html
    assert "<script>" not in html
    assert "gs://bucket/test/&lt;script&gt;alert(1)&lt;/script&gt;&amp;x.jpg" in html
    for number in ("0.8906", "0.8281", "+0.0625", "[+0.0234, +0.1016]", "Champion v3", "0.8672", "-0.0078"):
        assert number in html
    for size in ("1.9 MB", "5.4 MB", "6.1 MB", "612.3 KB", "4.87 ms", "1.92 ms", "1,028", "1,295"):
        assert size in html
    assert "undecodable" in html and "too_small" in html
    assert "2025-11-26 05:50:12 UTC" in html
    assert html.count("data:image/png;base64,") == PLOTS
    assert html.count("data:image/jpeg;base64,") == 6


@pytest.mark.parametrize("case", CASES)
def test_report_references_no_external_resource(reports, case):
    html = _html(reports[case])
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?data:)""", html, flags=re.IGNORECASE)
    assert not re.search(r"@import|url\(|<script|<link", html, flags=re.IGNORECASE)


def test_minimal_report_says_what_is_missing(reports):
    html = _html(reports["minimal"])
    assert "NOT BLESSED" in html and "is below the required 0.1000" in html
    assert "Champion comparison: not available" in html
    assert "Misclassified examples: not available" in html
    assert html.count("not available") >= 4  # champion, misclassified, SavedModel, TFLite
    assert html.count("data:image/png;base64,") == PLOTS


def test_render_survives_missing_parts():
    html = render_report(
        {"name": "empty", "classes": CLASSES, "verdict": {"blessed": False, "reason": "no model"}}
    )
    assert "NOT BLESSED" in html and "no model" in html
    for part in (
        "Metrics",
        "Data summary",
        "Training curves",
        "Confusion matrices",
        "Misclassified examples",
    ):
        assert f"{part}: not available" in html


@needs_chromium
@pytest.mark.parametrize("case", ["blessed", "not_blessed"])
def test_page_in_chromium(reports, case):
    data = CASES[case]()
    page = open_in_chromium(reports[case])
    assert page["title"] == "beans — run report"
    assert page["images"] >= PLOTS + len(data["misclassified"])
    assert page["loaded"] == page["images"]
    assert "BLESSED" in page["text"] and ("NOT BLESSED" in page["text"]) is (case == "not_blessed")
    assert all(c in page["text"] for c in CLASSES)
    assert "<script>alert(1)</script>" in page["text"]  # shown as text, never run
    with open(page["screenshot"], "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
    assert Image.open(io.BytesIO(png)).size == (1280, page["scroll_height"])


@needs_chromium
def test_minimal_page_in_chromium(reports):
    page = open_in_chromium(reports["minimal"])
    assert page["images"] == PLOTS and page["loaded"] == PLOTS
    assert "NOT BLESSED" in page["text"] and "not available" in page["text"]
    assert os.path.getsize(page["screenshot"]) > 50_000


@pytest.mark.gcs
def test_write_report_to_gcs(gcs_prefix):
    from components.core import storage

    uri = f"{gcs_prefix}/run/report.html"
    write_report(uri, {"name": "remote", "classes": CLASSES, "verdict": {"blessed": True, "reason": "ok"}})
    assert storage.read_text(uri).startswith("<!doctype html>")
