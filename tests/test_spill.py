"""Spill files: the examples between decoding and their shard's writer."""

from __future__ import annotations

import os

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
