"""Spill files: where encoded images wait between decoding and the writing of their shard.

A shard is written in content-hash order, so its examples must be gathered from every
worker first. Gathering them through Beam's shuffle moves the image bytes through the
runner's data plane, which on the local runner is slow for images of tens of KB (every
byte is encoded and decoded several times, on one thread). So the decoding stage
appends each example to a spill file of its own bundle per (split, shard) instead, and only
the files' names go through the shuffle: the way Beam's own file sinks gather their
temporary files (``fileio.WriteToFiles``). The files live in the run's scratch space and go
with it.

A spill file is a run of entries, each a header (``<II``: the lengths of the metadata and
of the image), the metadata as JSON (:data:`FIELDS`) and the image bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

FIELDS = ("id", "uri", "label", "sha256")  # what the shard writer needs besides the image
_HEADER = struct.Struct("<II")


def pack(example: dict[str, Any]) -> bytes:
    """One example's entry: its :data:`FIELDS` and its ``image``."""
    meta = json.dumps([example[k] for k in FIELDS], separators=(",", ":")).encode("utf-8")
    image = example["image"]
    return _HEADER.pack(len(meta), len(image)) + meta + image


def unpack(data: bytes) -> Iterator[dict[str, Any]]:
    """The examples of a spill file's bytes, in the order they were written.

    Raises:
        ValueError: the bytes end inside an entry (a spill file is only handed on once
            closed, so this means it was damaged).
    """
    view, offset = memoryview(data), 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            raise ValueError(f"spill data ends inside an entry header at byte {offset}")
        meta_len, image_len = _HEADER.unpack_from(view, offset)
        start = offset + _HEADER.size
        end = start + meta_len + image_len
        if end > len(data):
            raise ValueError(f"spill data ends inside the entry at byte {offset}")
        example = dict(zip(FIELDS, json.loads(bytes(view[start : start + meta_len])), strict=True))
        example["image"] = bytes(view[start + meta_len : end])
        yield example
        offset = end
