"""How many TFRecord files each split gets: ``preprocess.num_shards``, or, when it is 0, a
number from the data.

TensorFlow's input-pipeline guide suggests files of 100-200 MB: large enough that reading
them is sequential, small enough to spread over readers and to keep each shard writer's
work bounded. The rule aims at :data:`TARGET_SHARD_BYTES` per file from the number of listed
images and the size they are re-encoded at (the listing knows no pixels, so a record's
size is estimated per pixel), and gives the train split at least one file per training
worker, so every worker reads whole files of its own. Pure: the stage calls it with the
listing before the pipeline starts.
"""

from __future__ import annotations

from collections.abc import Iterable

from components.preprocess.splits import SPLITS

TARGET_SHARD_BYTES = 150 * 10**6
# A record's estimated size: a 224-px JPEG of a photo at quality 95 takes ~0.55 bytes a
# pixel (beans: 27.6 KB); the estimate errs high, so files err small. Plus the label and uri.
BYTES_PER_PIXEL = 0.6
RECORD_OVERHEAD = 300


def estimated_record_bytes(image_size: int) -> int:
    """A record's estimated size, for an image re-encoded at ``image_size`` pixels a side."""
    return int(BYTES_PER_PIXEL * image_size * image_size) + RECORD_OVERHEAD


def shard_count(records: float, image_size: int, min_shards: int = 1) -> int:
    """Files for a split of about ``records`` images: the nearest count that makes them
    :data:`TARGET_SHARD_BYTES` each (so 100-225 MB), at least ``min_shards`` and 1."""
    by_size = round(records * estimated_record_bytes(image_size) / TARGET_SHARD_BYTES)
    return max(1, min_shards, by_size)


def expected_records(
    given_splits: Iterable[str], fractions: tuple[float, float, float], source_has_eval: bool
) -> dict[str, float]:
    """Each split's expected number of images, from the split each listed image was given
    (``""``: none) and the configured fractions, as ``splits.assign_split`` will assign them."""
    train, eval_, test = fractions
    expected = dict.fromkeys(SPLITS, 0.0)
    for given in given_splits:
        if not given:
            for split, share in zip(SPLITS, (train, eval_, test), strict=True):
                expected[split] += share
        elif given == "train" and not source_has_eval and train + eval_ > 0:
            expected["eval"] += eval_ / (train + eval_)
            expected["train"] += train / (train + eval_)
        elif given in expected:
            expected[given] += 1
    return expected


def plan_shards(
    given_splits: Iterable[str],
    fractions: tuple[float, float, float],
    source_has_eval: bool,
    image_size: int,
    num_shards: int,
    train_workers: int,
) -> dict[str, int]:
    """Files per split: ``num_shards`` for every split when set, else from the data.

    Args:
        given_splits: For every listed image, the split its source gave it, or ``""``.
        fractions: ``data.split``'s train, eval and test fractions.
        source_has_eval: Whether the source has its own eval split.
        image_size: The size the images are re-encoded at.
        num_shards: ``preprocess.num_shards``; 0 picks the count from the data.
        train_workers: Training workers: the train split gets at least one file for each.
    """
    if num_shards:
        return dict.fromkeys(SPLITS, num_shards)
    expected = expected_records(given_splits, fractions, source_has_eval)
    return {
        split: shard_count(expected[split], image_size, train_workers if split == "train" else 1)
        for split in SPLITS
    }
