"""The evaluation stage on a tiny trained run: verdict, markers, export, champion, errors."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from components import registry
from components.core import outputs
from components.core.errors import StageError
from components.evaluate import export, scoring
from components.evaluate import stage as evaluate_stage
from components.push import stage as push_stage
from components.train import data
from components.train import model as train_model
from pipeline.cli import main
from tests.train_helpers import TINY_SIZE, train_config


def _config(run_dir: str, *overrides: str):
    return train_config(run_dir, "evaluate.bootstrap_samples=500", *overrides)


def _copy(run_dir: str, tmp_path) -> str:
    target = str(tmp_path / "run")
    for part in ("preprocess", "train"):
        shutil.copytree(os.path.join(run_dir, part), os.path.join(target, part))
    return target


def _test_images(run_dir: str) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The stored JPEGs of the test split, their decoded pixels and labels, in file order."""
    files = data.record_files(os.path.join(run_dir, "preprocess"), "test")
    jpegs, pixels, labels = [], [], []
    for batch in scoring.batches(files, TINY_SIZE, 64):
        jpegs.extend(batch["image"].numpy())
        pixels.append(batch["pixels"].numpy())
        labels.append(batch["label"].numpy())
    return jpegs, np.concatenate(pixels), np.concatenate(labels)


@pytest.fixture(scope="module")
def blessed(tiny_trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A copy of the tiny run evaluated with gate.min_improvement=-1 (which blesses any
    candidate: how tests and dry runs force an export), with the TFLite model."""
    run_dir = _copy(tiny_trained, tmp_path_factory.mktemp("blessed"))
    return run_dir, evaluate_stage.run(_config(run_dir, "gate.min_improvement=-1", "export.tflite=true"))


def test_forced_bless_exports_a_model_that_serves_raw_bytes(blessed):
    run_dir, verdict = blessed
    assert verdict["blessed"] is True
    written = json.loads(open(os.path.join(run_dir, "evaluate", "verdict.json")).read())
    assert written == json.loads(json.dumps(verdict))
    for key in ("blessed", "reason", "metric", "baseline", "candidate", "delta", "confidence_interval"):
        assert key in written
    jpegs, pixels, labels = _test_images(run_dir)
    assert written["test_examples"] == len(labels) > 10
    assert os.path.exists(os.path.join(run_dir, "evaluate", "BLESSED"))
    assert not os.path.exists(os.path.join(run_dir, "evaluate", "NOT_BLESSED"))
    metrics = json.loads(open(os.path.join(run_dir, "evaluate", "metrics.json")).read())
    assert metrics["candidate"]["accuracy"] == pytest.approx(verdict["candidate"])
    assert sum(map(sum, metrics["candidate"]["confusion_matrix"])) == len(labels)

    saved = os.path.join(run_dir, "export", "saved_model")
    extra = set(os.listdir(os.path.join(saved, "assets.extra")))
    assert extra == {"config.yaml", "verdict.json", "labels.txt", "fingerprint.json"}
    classes = open(os.path.join(saved, "assets.extra", "labels.txt")).read().split()
    assert (
        len(json.loads(open(os.path.join(saved, "assets.extra", "fingerprint.json")).read())["sha256"]) == 64
    )
    assert verdict["export"]["max_difference_from_trained"] < 1e-5
    tflite = verdict["export"]["tflite"]
    assert tflite["quantization"] == "dynamic"  # int8 weights: about a quarter of the float size
    assert os.path.getsize(os.path.join(run_dir, "export", "model.tflite")) == tflite["size_bytes"]
    assert tflite["size_bytes"] < verdict["export"]["size_bytes"] / 3
    assert tflite["saved_model_accuracy"] == verdict["export"]["accuracy"]
    assert 0.0 <= tflite["accuracy"] <= 1.0 and tflite["latency_ms"] > 0

    served = tf.saved_model.load(saved)
    pngs = []
    for image in pixels.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    from_jpeg = served.signatures["serving_default"](images=tf.constant(jpegs))
    from_png = served.signatures["serving_default"](images=tf.constant(pngs))
    np.testing.assert_allclose(from_png["probabilities"], from_jpeg["probabilities"], atol=1e-6)
    ids = from_jpeg["class_ids"].numpy()
    assert ids.shape == (len(labels), 3)  # export.top_k 5, capped at the 3 classes
    assert [n.decode() for n in from_jpeg["class_names"].numpy()[0]] == [classes[i] for i in ids[0]]
    accuracy = float(np.mean(ids[:, 0] == labels))
    assert accuracy == pytest.approx(verdict["candidate"])
    report = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    assert "BLESSED" in report and classes[0] in report


def test_production_champion_is_compared_on_the_same_examples(tiny_trained, blessed, tmp_path):
    first_dir, first = blessed
    run_dir = _copy(tiny_trained, tmp_path)
    reg = str(tmp_path / "registry")
    # The push stage publishes the blessed export as version 1 and points production at it.
    pushed_run = shutil.copytree(first_dir, str(tmp_path / "pushed"))
    pushed = push_stage.run(_config(pushed_run, f"registry.uri={reg}", "registry.promote_to=production"))
    assert pushed["version"] == 1 and pushed["promoted"]["alias"] == "production"
    overrides = ["gate.min_improvement=-1", "export.tflite=false", "gate.compare_to_production=true"]
    verdict = evaluate_stage.run(_config(run_dir, *overrides, f"registry.uri={reg}"))
    champion = verdict["champion"]
    assert champion["version"] == 1
    assert champion["value"] == pytest.approx(first["candidate"])  # the same model, the same examples
    assert champion["delta"] == 0.0 and champion["passed"] is True
    assert verdict["blessed"] is True

    # A production model with other labels is not comparable: said, not silently skipped.
    with open(os.path.join(registry.version_uri(reg, "model", 1), "assets.extra", "labels.txt"), "w") as f:
        f.write("cat\ndog\n")
    config = _config(run_dir, *overrides, f"registry.uri={reg}")
    champion, note = evaluate_stage._find_champion(config, ["blue", "green", "red"])
    assert champion is None
    assert "not comparable" in note


def test_missing_model_and_empty_test_split_are_errors(tiny_trained, tiny_prepared, tmp_path):
    run_dir = _copy(tiny_trained, tmp_path)
    os.remove(os.path.join(run_dir, "train", "candidate", "model.keras"))
    with pytest.raises(StageError, match="candidate/model.keras not found; run `finetune train`"):
        evaluate_stage.run(_config(run_dir))
    assert not os.path.exists(os.path.join(run_dir, "evaluate", "verdict.json"))
    with pytest.raises(StageError, match="test split .* is empty"):
        evaluate_stage.run(_config(tiny_prepared))


def test_candidate_no_better_than_baseline_is_not_blessed_through_the_cli(tiny_trained, tmp_path, capsys):
    run_dir = _copy(tiny_trained, tmp_path)
    stale = os.path.join(run_dir, "export", "saved_model", "saved_model.pb")
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").close()
    outputs.mark_owned(os.path.join(run_dir, "export"), "export", sealed=True)  # an earlier run's export
    train = os.path.join(run_dir, "train")
    shutil.copy(
        os.path.join(train, "baseline", "model.keras"), os.path.join(train, "candidate", "model.keras")
    )
    args = ["evaluate", "--set", f"run_dir={run_dir}", "--set", "data.source=x"]
    for key, value in (("model.image_size", TINY_SIZE), ("model.alpha", 0.35), ("model.weights", "none")):
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0  # a losing candidate is a normal outcome
    assert "NOT BLESSED" in capsys.readouterr().out
    verdict = json.loads(open(os.path.join(run_dir, "evaluate", "verdict.json")).read())
    assert verdict["blessed"] is False
    assert verdict["delta"] == 0.0 and "within noise" in verdict["reason"]
    assert os.path.exists(os.path.join(run_dir, "evaluate", "NOT_BLESSED"))
    assert not os.path.exists(os.path.join(run_dir, "export"))  # the stale export is gone
    assert "NOT BLESSED" in open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    shutil.rmtree(train)
    assert main(args) == 1
    assert "run `finetune train`" in capsys.readouterr().err


def test_export_decodes_other_formats_and_sizes(tiny_trained, tmp_path):

    from components.train import model as _registers  # noqa: F401

    candidate = os.path.join(tiny_trained, "train", "candidate", "model.keras")
    keras_model = train_model.load_model(candidate, compile=True)
    with export.staged(keras_model, ["blue", "green", "red"], TINY_SIZE, 2) as local:
        served = tf.saved_model.load(local).signatures["serving_default"]
        rgb = np.zeros((80, 60, 3), np.uint8)
        rgb[..., 1] = 180  # green, larger than the trained size and not square
        encoded = []
        for mode, fmt in (("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("RGB", "BMP"), ("P", "GIF")):
            buffer = io.BytesIO()
            Image.fromarray(rgb).convert(mode).save(buffer, format=fmt)
            encoded.append(buffer.getvalue())
        out = served(images=tf.constant(encoded))
        assert out["probabilities"].shape == (5, 3)
        assert out["class_names"].shape == (5, 2)
        np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
        with pytest.raises(tf.errors.InvalidArgumentError):
            served(images=tf.constant([b"not an image"]))
