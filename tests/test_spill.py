"""Spill files: the examples between decoding and their shard's writer."""

from __future__ import annotations

import os
import random

import pytest

from components.preprocess import spill


def _example(i: int, image: bytes) -> dict:
    return {
        "id": i,
        "uri": f"gs://b/ünïcode,{i}.jpg",
        "label": "healthy" if i % 2 else "bean_rust",
        "sha256": f"{i:064x}",
        "image": image,
        "split": "train",  # not kept: the shard writer knows its split
        "pixel_mean": [1.0, 2.0, 3.0],
    }


def test_entries_come_back_in_order_with_their_fields_and_bytes():
    examples = [_example(i, os.urandom(n)) for i, n in enumerate((0, 1, 30_000, 7))]
    data = b"".join(spill.pack(ex) for ex in examples)
    assert list(spill.unpack(data)) == [{k: ex[k] for k in (*spill.FIELDS, "image")} for ex in examples]
    assert list(spill.unpack(b"")) == []


@pytest.mark.parametrize("cut", [1, 5, 20, 100])
def test_damaged_data_is_an_error_not_a_short_read(cut):
    data = spill.pack(_example(1, b"x" * 50)) + spill.pack(_example(2, b"y" * 50))
    with pytest.raises(ValueError, match="spill data ends inside"):
        list(spill.unpack(data[:-cut]))


def test_entries_stream_from_chunks_of_any_size():
    examples = [_example(i, os.urandom(n)) for i, n in enumerate((0, 1, 30_000, 7, 5000))]
    data = b"".join(spill.pack(ex) for ex in examples)
    expected = [{k: ex[k] for k in (*spill.FIELDS, "image")} for ex in examples]
    for size in (1, 7, 4096, len(data)):
        chunks = (data[i : i + size] for i in range(0, len(data), size))
        assert list(spill.unpack_stream(chunks)) == expected


def _pairs(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    keys = [f"{rng.getrandbits(64):016x}".encode() for _ in range(n)]
    keys[5] = keys[6]  # two records with one key: ordered by their bytes
    return [(k, rng.randbytes(rng.randrange(0, 3000))) for k in keys]


@pytest.mark.parametrize("budget", [10**9, 20_000, 1])  # in memory; runs of ~10 pairs; a run per pair
def test_sorter_gives_the_in_memory_order_whatever_its_budget(tmp_path, budget, monkeypatch):
    monkeypatch.setattr(spill, "MAX_FAN_IN", 4)  # and merges runs in passes when there are many
    pairs = _pairs(200)
    made = []

    def make_dir() -> str:
        made.append(tmp_path / f"runs{len(made)}")
        made[-1].mkdir()
        return str(made[-1])

    with spill.Sorter(budget, make_dir) as sorter:
        for key, value in pairs:
            sorter.add(key, value)
        spilled = sorter.runs
        assert list(sorter.sorted()) == sorted(pairs)
    if budget == 10**9:
        assert spilled == 0 and not made  # nothing written when it fits
    else:
        assert spilled >= (200 if budget == 1 else 10) and len(made) == 1
        assert not made[0].exists()  # the runs go with the sorter


def test_sorter_holds_no_more_than_its_budget(tmp_path):
    budget = 50_000
    with spill.Sorter(budget, lambda: str(tmp_path)) as sorter:
        for key, value in _pairs(500, seed=1):
            sorter.add(key, value)
            assert sorter._held_bytes < budget  # the bound is the point
        assert sorter.runs > 10
        assert len(list(sorter.sorted())) == 500
