"""The training input pipeline: the preprocessing stage's TFRecords as tf.data datasets.

Each worker reads its own shard: whole files when there are at least as many files as
workers (no worker reads bytes it then drops), records otherwise. Files are interleaved and
cached in memory, shuffled, decoded in parallel, batched per replica, augmented on the fly
and prefetched, so the accelerator never waits for input. The cache holds the decoded
pixels when the stage finds they fit its memory budget (then later epochs decode nothing),
the compact encoded records when those fit (decoded again every epoch), and nothing
otherwise: every epoch reads the files again, and memory no longer grows with the data.

Repeatable: for one seed the batches, their order and their augmentation are the same in
every run. Shuffles are seeded, parallel steps keep their order, and each batch's random
augmentation is drawn from stateless random ops keyed by (seed, batch number) rather than
from a random state that parallel calls would consume in whatever order they happen to run.

Runs on every worker, inside ``strategy.distribute_datasets_from_function``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf

from components.config import AugmentConfig, TrainConfig
from components.core import storage
from components.core.errors import StageError
from components.preprocess import schema

AUTOTUNE = tf.data.AUTOTUNE
# What a pipeline keeps in memory after its first pass (``stage.image_cache`` decides).
DECODED, ENCODED, NO_CACHE = "decoded", "encoded", "none"


def record_files(preprocess_dir: str, split: str) -> list[str]:
    """The split's TFRecord shards, sorted (every worker must see the same order).

    Raises:
        StageError: the split has no shards (preprocessing has not run, or wrote elsewhere).
    """
    directory = storage.join(preprocess_dir, split)
    # list_files is sorted, and empty for a missing directory.
    files = [f.uri for f in storage.list_files(directory) if f.uri.endswith(schema.TFRECORD_SUFFIX)]
    if not files:
        raise StageError(
            f"no {split} TFRecords under {directory}; run `finetune preprocess` with the same run_dir first"
        )
    return files


@dataclass(frozen=True)
class Shard:
    """Which part of the data this input pipeline reads: ``index`` of ``count``."""

    count: int = 1
    index: int = 0


def decode(serialized: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One record -> (uint8 RGB pixels, int64 label); batches become float32 in 0-255."""
    features = tf.io.parse_single_example(serialized, schema.RECORD_FEATURE_SPEC)
    image = tf.io.decode_jpeg(features["image"], channels=3)
    return tf.ensure_shape(image, [image_size, image_size, 3]), features["label"]


def decoded_mib(num_images: int, image_size: int) -> float:
    """MiB that ``num_images`` decoded RGB images take in memory (uint8, 3 bytes a pixel)."""
    return num_images * image_size * image_size * 3 / 2**20


def _to_float(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(images, tf.float32), labels


def image_dataset(
    files: list[str],
    image_size: int,
    batch_size: int,
    *,
    shard: Shard = Shard(),
    training: bool = False,
    repeat: bool = False,
    augment: AugmentConfig | None = None,
    shuffle_buffer: int = 2048,
    seed: int = 0,
    cache: str = ENCODED,
) -> tf.data.Dataset:
    """Batches of ``(images, labels)`` from TFRecord ``files``.

    Args:
        files: Every shard of the split (the same list on every worker).
        image_size: The stored image size (the preprocessing stage's ``image_size``).
        batch_size: Per-replica batch size.
        shard: This input pipeline's part of the data.
        training: Shuffle (files and records, reshuffled each epoch) and drop the last
            partial batch.
        repeat: Repeat forever (training, and validation across several workers, which must
            all run the same number of steps).
        augment: Random flip / rotation / crop of each batch, or None.
        seed: Seeds the shuffles and the augmentation.
        cache: What stays in memory after the first pass: :data:`DECODED` pixels (uint8;
            later epochs decode nothing), :data:`ENCODED` records (decoded every epoch) or
            nothing (:data:`NO_CACHE`: every epoch reads the files again). The first
            epoch's batches are the same in all three.
    """
    by_file = len(files) >= shard.count
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shard.count > 1 and by_file:
        dataset = dataset.shard(shard.count, shard.index)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed)
    dataset = dataset.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE
    )
    if shard.count > 1 and not by_file:
        dataset = dataset.shard(shard.count, shard.index)

    def pixels(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode(serialized, image_size)

    if cache == DECODED:  # 3 bytes a pixel: 150 KB per 224-px image
        dataset = dataset.map(pixels, num_parallel_calls=AUTOTUNE)
    if cache != NO_CACHE:
        dataset = dataset.cache()  # else the encoded records: ~28 KB per 224-px image
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        dataset = dataset.repeat()
    if cache != DECODED:
        dataset = dataset.map(pixels, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=training).map(_to_float)
    if augment is not None and (augment.flip or augment.rotation or augment.crop):
        dataset = dataset.enumerate().map(
            lambda i, xy: (augment_batch(xy[0], augment, tf.stack([tf.cast(seed, tf.int64), i])), xy[1]),
            num_parallel_calls=AUTOTUNE,
        )
    dataset = unsharded(dataset.prefetch(AUTOTUNE))
    return dataset if training or repeat else _single_pass(dataset)


def training_input(
    files: list[str], image_size: int, global_batch: int, train: TrainConfig, cache: str, augment: bool = True
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The candidate phase's input, for ``strategy.distribute_datasets_from_function``: each
    input pipeline's shard of ``files``, shuffled and repeated, batched per replica from
    ``global_batch``, augmented as ``train.augment`` says (none without ``augment``), seeded
    from ``train.seed`` per pipeline, kept in memory as ``cache``. The stage and the
    benchmarks that measure it build it here, so they measure the same input."""

    def train_fn(ictx: tf.distribute.InputContext) -> tf.data.Dataset:
        return image_dataset(
            files,
            image_size,
            ictx.get_per_replica_batch_size(global_batch),
            shard=Shard(ictx.num_input_pipelines, ictx.input_pipeline_id),
            training=True,
            repeat=True,
            augment=train.augment if augment else None,
            shuffle_buffer=train.shuffle_buffer,
            seed=train.seed + ictx.input_pipeline_id,
            cache=cache,
        )

    return train_fn


def _single_pass(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Turns tf.data's autotuning off for a dataset read once (the baseline's feature pass,
    the exact evaluation). One pass leaves it little to tune, and its model thread holds up
    the iterator's deletion, in some passes for about as long as a small pass takes. Without
    autotuning, the parallel steps run one call per core."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def feature_dataset(
    features: tf.Tensor, labels: tf.Tensor, batch_size: int, *, training: bool, repeat: bool, seed: int = 0
) -> tf.data.Dataset:
    """Batches of cached backbone features (the baseline phase): already in memory."""
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    if training:
        dataset = dataset.shuffle(len(labels), seed=seed)
    if repeat:
        dataset = dataset.repeat()
    return unsharded(dataset.batch(batch_size, drop_remainder=training).prefetch(AUTOTUNE))


def unsharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Turns off tf.distribute's auto-sharding: each pipeline is sharded above already."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def augment_batch(images: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Random horizontal flip, then one projective warp per image that rotates by up to
    ``augment.rotation`` of a turn and zooms in on a random window up to ``augment.crop``
    smaller per side (a random crop resized back). Edges are filled by reflection.

    ``seed`` (two integers) fixes every draw: the same seed, the same augmentation (stateless
    random ops); None draws a fresh seed. Runs in the input pipeline (not in the model), so
    the exported model carries none of it.
    """
    if seed is None:
        seed = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    if augment.flip:
        images = tf.image.stateless_random_flip_left_right(images, seeds[0])
    if not (augment.rotation or augment.crop):
        return images
    shape = tf.shape(images)
    n = shape[0]
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    def uniform(i: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([n], seeds[i], low, high)

    angle = uniform(1, -1.0, 1.0) * (augment.rotation * 2.0 * math.pi)
    zoom = 1.0 - uniform(2, 0.0, augment.crop)  # fraction of the side kept
    # The kept window may sit anywhere inside the image.
    dx = uniform(3, -1.0, 1.0) * (1.0 - zoom) * width / 2.0
    dy = uniform(4, -1.0, 1.0) * (1.0 - zoom) * height / 2.0
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cos, sin = tf.cos(angle) * zoom, tf.sin(angle) * zoom
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2).
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = cx - a0 * cx - a1 * cy + dx
    b2 = cy - b0 * cx - b1 * cy + dy
    zeros = tf.zeros([n])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
