"""Helpers for training tests: a tiny learnable image set, preprocessed once per session."""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image

from components.config import load_config, to_yaml

SHARED_WEIGHTS = os.environ.get("FINETUNE_WEIGHTS") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "weights"
)
MOBILENET_V2_035 = os.path.join(
    SHARED_WEIGHTS, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
# Three classes told apart by colour, so a head on random features can still learn them.
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}
TINY_SIZE = 32


def make_colour_images(root: str, per_class: int = 30, size: int = 48, seed: int = 0) -> int:
    """Writes ``per_class`` noisy JPEGs per colour class under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for label, colour in COLOURS.items():
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, label, f"{i:03d}.jpg"), quality=90)
    return per_class * len(COLOURS)


def train_config(run_dir: str, *overrides: str):
    """A fast training config: MobileNetV2 0.35 from random weights at 32 px, tiny batches."""
    return load_config(
        None,
        [
            "data.source=unused-by-training",
            f"run_dir={run_dir}",
            f"model.image_size={TINY_SIZE}",
            "model.alpha=0.35",
            "model.weights=none",
            "train.batch_size=8",
            "train.baseline_epochs=2",
            "train.finetune_epochs=1",
            "train.baseline_learning_rate=0.01",
            *overrides,
        ],
    )


def copy_prepared(prepared: str, run_dir: str) -> str:
    """Copies a preprocessed run (its ``preprocess/`` folder) into a fresh ``run_dir``."""
    shutil.copytree(os.path.join(prepared, "preprocess"), os.path.join(run_dir, "preprocess"))
    return run_dir


def copy_trained(trained: str, run_dir: str) -> str:
    """Copies a run trained with ``train_config`` and no overrides (its ``preprocess/`` and
    ``train/`` folders) into a fresh ``run_dir``, as if it had been trained there: the copy's
    ``train/config.yaml`` names ``run_dir``, as the stage writes it."""
    for part in ("preprocess", "train"):
        shutil.copytree(os.path.join(trained, part), os.path.join(run_dir, part))
    config_path = os.path.join(run_dir, "train", "config.yaml")
    assert open(config_path).read() == to_yaml(train_config(trained))  # what the copy stands for
    with open(config_path, "w") as f:
        f.write(to_yaml(train_config(run_dir)))
    return run_dir
