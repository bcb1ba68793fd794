"""The number of TFRecord files per split: explicit, or from the data."""

from __future__ import annotations

import pytest

from components.preprocess import shards

MB = 10**6


@pytest.mark.parametrize(
    ("records", "image_size", "min_shards", "expected"),
    [
        (0, 224, 1, 1),  # an empty split still has its file
        (1_000, 224, 1, 1),  # 30 MB
        (1_000, 224, 4, 4),  # one file per training worker at least
        (100_000, 224, 1, 20),  # 3.0 GB / 150 MB
        (1_000_000, 224, 8, 203),  # 30 GB
        (1_000_000, 96, 1, 39),  # smaller images, fewer files
        (5_000, 224, 1, 1),  # 151 MB: one file
        (8_000, 224, 1, 2),  # 242 MB: two of 121 MB
    ],
)
def test_shard_count(records, image_size, min_shards, expected):
    assert shards.shard_count(records, image_size, min_shards) == expected


@pytest.mark.parametrize("records", [5_000, 20_000, 123_456, 10**6])
def test_files_land_between_100_and_225_mb_once_there_are_several(records):
    n = shards.shard_count(records, 224)
    size = records * shards.estimated_record_bytes(224) / n
    assert n == 1 or 100 * MB <= size <= 225 * MB


def test_an_explicit_count_wins_for_every_split():
    assert shards.plan_shards(["", "test"] * 10**6, (0.8, 0.1, 0.1), False, 224, 7, 16) == {
        "train": 7,
        "eval": 7,
        "test": 7,
    }


def test_splits_follow_the_source_and_the_fractions():
    # 200k unassigned images: 80/10/10; plus 100k given train (eval carved out: 1/9) and 50k test
    given = [""] * 200_000 + ["train"] * 90_000 + ["test"] * 50_000
    expected = shards.expected_records(given, (0.8, 0.1, 0.1), source_has_eval=False)
    assert expected == pytest.approx({"train": 240_000, "eval": 30_000, "test": 70_000})
    planned = shards.plan_shards(given, (0.8, 0.1, 0.1), False, 224, 0, train_workers=2)
    assert planned == {"train": 49, "eval": 6, "test": 14}
    assert shards.plan_shards(given[:100], (0.8, 0.1, 0.1), False, 224, 0, train_workers=2) == {
        "train": 2,  # one per worker
        "eval": 1,
        "test": 1,
    }
    with_eval = shards.expected_records(["train", "eval", "test"], (0.8, 0.1, 0.1), source_has_eval=True)
    assert with_eval == {"train": 1, "eval": 1, "test": 1}
