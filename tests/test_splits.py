"""Deterministic split assignment (a pure function of the content hash)."""

import hashlib
from collections import Counter

from components.preprocess.splits import assign_split, bucket

HASHES = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]


def test_fractions_are_respected_and_stable():
    splits = [assign_split(h, "", 0.8, 0.1, 0.1, False) for h in HASHES]
    counts = Counter(splits)
    assert abs(counts["train"] / len(HASHES) - 0.8) < 0.03
    assert abs(counts["eval"] / len(HASHES) - 0.1) < 0.02
    assert abs(counts["test"] / len(HASHES) - 0.1) < 0.02
    assert splits == [assign_split(h, "", 0.8, 0.1, 0.1, False) for h in HASHES]


def test_adding_images_never_moves_existing_ones():
    before = {h: assign_split(h, "", 0.8, 0.1, 0.1, False) for h in HASHES[:1000]}
    after = {h: assign_split(h, "", 0.8, 0.1, 0.1, False) for h in HASHES}
    assert all(after[h] == s for h, s in before.items())


def test_given_splits_are_kept_and_eval_is_carved_from_train_only_without_eval():
    assert {assign_split(h, "test", 0.8, 0.1, 0.1, False) for h in HASHES} == {"test"}
    assert {assign_split(h, "train", 0.8, 0.1, 0.1, True) for h in HASHES} == {"train"}
    carved = Counter(assign_split(h, "train", 0.8, 0.1, 0.1, False) for h in HASHES)
    assert set(carved) == {"train", "eval"}
    assert abs(carved["eval"] / len(HASHES) - 0.1 / 0.9) < 0.02


def test_bucket_is_uniform_in_unit_interval():
    values = [bucket(h) for h in HASHES]
    assert 0 <= min(values) and max(values) < 1
    assert abs(sum(values) / len(values) - 0.5) < 0.02
