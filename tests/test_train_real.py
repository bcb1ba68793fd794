"""Training on the real beans photos with the real ImageNet MobileNetV2 0.35 weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tf_keras

from components.train import data, stage
from components.train import model as _registers_custom_layers  # noqa: F401
from tests.preprocess_helpers import SHARED, run_stage
from tests.train_helpers import MOBILENET_V2_035, train_config

BEANS = os.path.join(SHARED, "beans")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.isdir(BEANS) and os.path.isfile(MOBILENET_V2_035)),
        reason=f"real data or weights not found ({BEANS}, {MOBILENET_V2_035})",
    ),
]


def _test_accuracy(run_dir: str, phase: str) -> float:
    """Accuracy of a saved model on the test split, which the trainer never reads."""
    keras_model = tf_keras.models.load_model(os.path.join(run_dir, "train", phase, "model.keras"))
    files = data.record_files(os.path.join(run_dir, "preprocess"), "test")
    correct = total = 0
    for images, labels in data.image_dataset(files, 96, 64):
        predicted = keras_model.predict(images, verbose=0).argmax(axis=1)
        correct += int(np.sum(predicted == labels.numpy()))
        total += len(labels)
    assert total == 128  # the beans test folder
    return correct / total


def test_baseline_on_real_weights_beats_075_on_the_test_split(tmp_path):
    run_dir = str(tmp_path)
    run_stage(BEANS, run_dir, "model.image_size=96")
    summary = stage.run(
        train_config(
            run_dir,
            "model.image_size=96",
            f"model.weights={MOBILENET_V2_035}",
            "train.batch_size=32",
            "train.baseline_epochs=5",
            "train.finetune_epochs=1",
            "train.baseline_learning_rate=0.001",
        )
    )
    assert summary["records"]["train"] + summary["records"]["eval"] == 1167  # train folder + validation
    baseline = _test_accuracy(run_dir, "baseline")
    candidate = _test_accuracy(run_dir, "candidate")
    print(f"beans test accuracy: baseline {baseline:.3f}, candidate {candidate:.3f}")
    assert baseline >= 0.75  # random weights give ~0.34: the ImageNet weights were loaded
    assert candidate >= 0.6  # one fine-tuning epoch at a tenth of the rate does not wreck it
