"""The training input pipeline on real TFRecords from the preprocessing stage."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from components.config import AugmentConfig
from components.core.errors import StageError
from components.train import data
from tests.train_helpers import TINY_SIZE


def _uris(files, shard, **kwargs):
    """(label, pixel digest) of every example one shard yields."""
    seen = []
    for images, labels in data.image_dataset(files, TINY_SIZE, 7, shard=shard, **kwargs):
        for image, label in zip(images.numpy(), labels.numpy(), strict=True):
            seen.append((int(label), hashlib.sha256(image.tobytes()).hexdigest()))
    return seen


def test_shards_cover_every_record_once_by_file_and_by_record(tiny_prepared):
    files = data.record_files(os.path.join(tiny_prepared, "preprocess"), "train")
    assert len(files) == 2
    everything = _uris(files, data.Shard())
    assert len(everything) == len(set(everything)) > 40
    for workers in (2, 3):  # 2 workers: one file each; 3 workers > 2 files: every third record
        parts = [_uris(files, data.Shard(workers, i)) for i in range(workers)]
        assert sorted(sum(parts, [])) == sorted(everything)
        assert all(parts)


def test_training_batches_are_full_shuffled_and_repeat(tiny_prepared):
    files = data.record_files(os.path.join(tiny_prepared, "preprocess"), "train")
    dataset = data.image_dataset(files, TINY_SIZE, 8, training=True, repeat=True, seed=1)
    batches = list(dataset.take(20))
    assert all(x.shape == (8, TINY_SIZE, TINY_SIZE, 3) and x.dtype == tf.float32 for x, _ in batches)
    pixels = np.concatenate([x.numpy() for x, _ in batches])
    assert 0.0 <= pixels.min() and pixels.max() <= 255.0 and pixels.std() > 10


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="run `finetune preprocess`"):
        data.record_files(str(tmp_path), "train")


def test_no_augmentation_is_the_identity_and_flip_only_mirrors():
    images = tf.random.uniform([6, 16, 16, 3], 0, 255, seed=3)
    same = data.augment_batch(images, AugmentConfig(flip=False, rotation=0.0, crop=0.0))
    np.testing.assert_array_equal(same.numpy(), images.numpy())
    flipped = data.augment_batch(images, AugmentConfig(flip=True, rotation=0.0, crop=0.0)).numpy()
    for out, original in zip(flipped, images.numpy(), strict=True):
        assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])


def test_rotation_and_crop_warp_each_image_but_keep_shape_and_range():
    images = tf.random.uniform([8, 24, 24, 3], 0, 255, seed=4)
    out = data.augment_batch(images, AugmentConfig(flip=False, rotation=0.1, crop=0.3)).numpy()
    assert out.shape == (8, 24, 24, 3)
    assert out.min() >= 0.0 and out.max() <= 255.0
    changed = [not np.allclose(a, b) for a, b in zip(out, images.numpy(), strict=True)]
    assert sum(changed) >= 7  # rotation and zoom are continuous: essentially never the identity
    # Zooming into a constant image leaves it constant (reflection fills the edges).
    flat = tf.fill([2, 24, 24, 3], 100.0)
    np.testing.assert_allclose(data.augment_batch(flat, AugmentConfig(rotation=0.1, crop=0.3)).numpy(), 100.0)


def test_one_seed_gives_the_same_augmented_batches_in_every_run(tiny_prepared):
    files = data.record_files(os.path.join(tiny_prepared, "preprocess"), "train")
    augment = AugmentConfig(flip=True, rotation=0.1, crop=0.2)

    def batches(seed):
        dataset = data.image_dataset(
            files, TINY_SIZE, 8, training=True, repeat=True, augment=augment, seed=seed
        )
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(12)]  # past one epoch (63 images)

    first, again, other = batches(5), batches(5), batches(6)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_a_seeded_augmentation_is_a_function_of_its_seed():
    images = tf.random.uniform([4, 16, 16, 3], 0, 255, seed=7)
    augment = AugmentConfig(flip=True, rotation=0.1, crop=0.3)
    seed = tf.constant([3, 9], tf.int64)
    np.testing.assert_array_equal(
        data.augment_batch(images, augment, seed).numpy(), data.augment_batch(images, augment, seed).numpy()
    )
    different = data.augment_batch(images, augment, tf.constant([3, 10], tf.int64)).numpy()
    assert not np.array_equal(different, data.augment_batch(images, augment, seed).numpy())


def test_every_cache_gives_the_same_batches(tiny_prepared):
    files = data.record_files(os.path.join(tiny_prepared, "preprocess"), "train")
    augment = AugmentConfig(flip=True, rotation=0.1, crop=0.2)

    def batches(cache):
        dataset = data.image_dataset(
            files,
            TINY_SIZE,
            8,
            training=True,
            repeat=True,
            augment=augment,
            seed=3,
            cache=cache,
        )
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(24)]  # three epochs of 63 images

    decoded, encoded, uncached = batches(data.DECODED), batches(data.ENCODED), batches(data.NO_CACHE)
    assert all(x.dtype == np.float32 and x.shape == (8, TINY_SIZE, TINY_SIZE, 3) for x, _ in decoded)
    for (x1, y1), (x2, y2) in zip(decoded, encoded, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Read from the files every epoch: the first epoch (7 full batches) is the same; later
    # ones reshuffle the files too, so they may differ, but the same way in every run.
    for (x1, y1), (x2, y2) in zip(encoded[:7], uncached[:7], strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(uncached, batches(data.NO_CACHE), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # So is evaluation's (no shuffle, the partial last batch kept).
    in_order = [
        data.image_dataset(files, TINY_SIZE, 8, cache=c) for c in (data.DECODED, data.ENCODED, data.NO_CACHE)
    ]
    for (x1, y1), *others in zip(*in_order, strict=True):
        for x2, y2 in others:
            np.testing.assert_array_equal(x1.numpy(), x2.numpy())
            np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    assert sum(len(y) for _, y in in_order[0]) == 63


def test_decoded_size_is_three_bytes_a_pixel():
    assert data.decoded_mib(1024, 224) == 147.0


def test_one_pass_datasets_are_not_autotuned_and_training_ones_are(tiny_prepared):
    files = data.record_files(os.path.join(tiny_prepared, "preprocess"), "train")
    one_pass = data.image_dataset(files, TINY_SIZE, 8)
    assert one_pass.options().autotune.enabled is False
    assert sum(len(y) for _, y in one_pass) == 63  # still every record, once
    for kwargs in ({"training": True, "repeat": True}, {"repeat": True}):
        assert data.image_dataset(files, TINY_SIZE, 8, **kwargs).options().autotune.enabled is not False
