"""The baseline's cached features: in memory when they fit train.image_cache_mb, on the
worker's local disk beyond it, with the same features either way."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from components.train import data, features, stage
from components.train import model as train_model
from tests.train_helpers import TINY_SIZE, copy_prepared, train_config

WIDTH = 5


def _batches(n: int, size: int = 16):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, n, size)]


def _extract(images: np.ndarray) -> np.ndarray:
    """A stand-in backbone: any deterministic image -> feature map will do here."""
    return np.concatenate([images, images[:, :2] ** 2], axis=1)


@pytest.fixture
def both(tmp_path):
    kept = features.Features.extract(_extract, _batches(53), WIDTH)
    folder = tmp_path / "features"
    folder.mkdir()
    on_disk = features.Features.extract(_extract, _batches(53), WIDTH, str(folder))
    yield kept, on_disk, folder
    kept.close()
    on_disk.close()


def test_disk_and_memory_hold_the_same_features(both):
    kept, on_disk, folder = both
    assert (kept.where, on_disk.where) == (features.MEMORY, features.DISK)
    assert len(kept) == len(on_disk) == 53
    assert os.path.getsize(folder / "features.f32") == 53 * WIDTH * 4  # only labels stay in memory
    for (x1, y1), (x2, y2) in zip(kept.batches(10), on_disk.batches(10), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Evaluation order, every part of a multi-worker split the same on both.
    for part in ((0, 1), (0, 3), (2, 3)):
        a, b = (list(f.dataset(8, training=False, repeat=False, part=part)) for f in (kept, on_disk))
        assert sum(len(y) for _, y in a) == len(range(part[0], 53, part[1]))
        for (x1, y1), (x2, y2) in zip(a, b, strict=True):
            np.testing.assert_array_equal(x1.numpy(), x2.numpy())
            np.testing.assert_array_equal(y1.numpy(), y2.numpy())


def test_training_from_disk_sees_every_feature_once_an_epoch_shuffled(both):
    kept, on_disk, _ = both
    all_x = np.concatenate([x for x, _ in kept.batches()])
    all_y = np.concatenate([y for _, y in kept.batches()])
    rows = {tuple(x) + (y,) for x, y in zip(all_x, all_y, strict=True)}
    epoch = list(on_disk.dataset(53, training=True, repeat=False, seed=1, shuffle_buffer=16))
    assert len(epoch) == 1  # 53 a batch, drop_remainder: one full batch
    x, y = epoch[0][0].numpy(), epoch[0][1].numpy()
    assert {tuple(a) + (b,) for a, b in zip(x, y, strict=True)} == rows
    assert not np.array_equal(x, np.concatenate([b for b, _ in on_disk.batches()]))  # shuffled


def test_close_removes_the_file(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    on_disk = features.Features.extract(_extract, _batches(20), WIDTH, str(folder))
    on_disk.close()
    assert not folder.exists()


def test_placement_follows_the_budget():
    assert features.placement(1_000, 1280, 5) == (False, "in memory: 5 MiB per worker")
    on_disk, words = features.placement(1_000_000, 1280, 1024)
    assert on_disk and words == "on local disk: 4883 MiB per worker is over train.image_cache_mb=1024"


def test_a_stage_over_its_memory_budget_keeps_features_on_disk_and_streams_images(
    tiny_prepared, tmp_path, capsys
):
    run_dir = copy_prepared(tiny_prepared, str(tmp_path / "run"))
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "finetune-features-*")))
    summary = stage.run(train_config(run_dir, "train.image_cache_mb=0"))
    printed = capsys.readouterr().out
    assert "features once (kept on local disk: 0 MiB per worker is over train.image_cache_mb=0)" in printed
    assert "input: TFRecords read from storage every epoch" in printed
    assert summary["baseline"]["features"] == "disk" and summary["image_cache"] == data.NO_CACHE
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "finetune-features-*"))) == before  # removed
    # The head's exact eval metrics came from the features on disk; the saved, assembled model
    # gives the same on the images.
    baseline = train_model.load_model(os.path.join(run_dir, "train", "baseline", "model.keras"))
    files = data.record_files(os.path.join(run_dir, "preprocess"), "eval")
    batches = list(data.image_dataset(files, TINY_SIZE, 64))
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    probs = baseline.predict(tf.constant(images), verbose=0)
    assert float((probs.argmax(axis=1) == labels).mean()) == pytest.approx(
        summary["baseline"]["eval"]["accuracy"], abs=1e-6
    )
    assert summary["baseline"]["eval"]["examples"] == len(labels) == summary["records"]["eval"]
