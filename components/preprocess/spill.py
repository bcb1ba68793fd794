"""Spill files: where encoded images wait between decoding and the writing of their shard,
and the bounded sort that puts a shard's records in content-hash order.

A shard is written in content-hash order, so its examples must be gathered from every
worker first. Gathering them through Beam's shuffle moves the image bytes through the
runner's data plane, which on the local runner is slow for images of tens of KB (every
byte is encoded and decoded several times, on one thread). So the decoding stage
appends each example to a spill file of its own bundle per (split, shard) instead, and only
the files' names go through the shuffle: the way Beam's own file sinks gather their
temporary files (``fileio.WriteToFiles``). The files live in the run's scratch space and go
with it.

A spill file is a run of entries, each a header (``<II``: the lengths of the metadata and
of the blob), the metadata and the blob. An example's metadata is JSON (:data:`FIELDS`) and
its blob the image bytes. Entries are read as a stream (:func:`frames`), never a file whole.

A shard writer's memory must not grow with its shard: :class:`Sorter` holds records up to
a byte budget, then writes them, sorted, as a run on the worker's local disk, and merges the
runs at the end (an external merge sort), so the output is the same bytes whatever the budget.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

FIELDS = ("id", "uri", "label", "sha256")  # what the shard writer needs besides the image
_HEADER = struct.Struct("<II")
RUN_READ_BYTES = 256 * 1024  # read buffer per sorted run while merging
MAX_FAN_IN = 64  # runs merged at once; more are first merged into fewer (bounded open files)
_ITEM_OVERHEAD = 120  # bytes Python spends on a held (key, value) pair besides their contents


def frame(meta: bytes, blob: bytes) -> bytes:
    """One entry: the header, ``meta`` and ``blob``."""
    return _HEADER.pack(len(meta), len(blob)) + meta + blob


def frames(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The ``(meta, blob)`` entries in a stream of byte chunks, in order, holding at most one
    chunk and one entry.

    Raises:
        ValueError: the bytes end inside an entry (a spill file is only handed on once
            closed, so this means it was damaged).
    """
    buffer, consumed = bytearray(), 0
    for chunk in chunks:
        buffer += chunk
        start = 0
        while len(buffer) - start >= _HEADER.size:
            meta_len, blob_len = _HEADER.unpack_from(buffer, start)
            meta_at = start + _HEADER.size
            end = meta_at + meta_len + blob_len
            if end > len(buffer):
                break
            yield bytes(buffer[meta_at : meta_at + meta_len]), bytes(buffer[meta_at + meta_len : end])
            start = end
        del buffer[:start]
        consumed += start
    if buffer:
        where = "an entry header" if len(buffer) < _HEADER.size else "the entry"
        raise ValueError(f"spill data ends inside {where} at byte {consumed}")


def pack(example: dict[str, Any]) -> bytes:
    """One example's entry: its :data:`FIELDS` and its ``image``."""
    meta = json.dumps([example[k] for k in FIELDS], separators=(",", ":")).encode("utf-8")
    return frame(meta, example["image"])


def unpack_stream(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The examples of a spill file's byte chunks, in the order they were written (see
    :func:`frames` for what it raises)."""
    for meta, image in frames(chunks):
        example = dict(zip(FIELDS, json.loads(meta), strict=True))
        example["image"] = image
        yield example


def unpack(data: bytes) -> Iterator[dict[str, Any]]:
    """The examples of a spill file's bytes (:func:`unpack_stream` of one chunk)."""
    return unpack_stream((data,))


class Sorter:
    """Orders ``(key, value)`` byte pairs by key, then value, holding at most about
    ``budget`` bytes of them: beyond it, the pairs held are sorted and written as a run to a
    local folder from ``make_dir`` (made on the first run), and :meth:`sorted` merges the
    runs. The same pairs come out in the same order whatever the budget. Call :meth:`close`
    (or use it as a context manager) to remove the runs.
    """

    def __init__(self, budget: int, make_dir: Callable[[], str]):
        self._budget, self._make_dir = budget, make_dir
        self._held: list[tuple[bytes, bytes]] = []
        self._held_bytes = 0
        self._dir: str | None = None
        self._runs: list[str] = []
        self._written = 0  # runs made, merged ones included: unique file names

    @property
    def runs(self) -> int:
        """Sorted runs on disk so far."""
        return len(self._runs)

    def add(self, key: bytes, value: bytes) -> None:
        self._held.append((key, value))
        self._held_bytes += len(key) + len(value) + _ITEM_OVERHEAD
        if self._held_bytes >= self._budget:
            self._held.sort()
            self._runs.append(self._write_run(self._held))
            self._held, self._held_bytes = [], 0

    def sorted(self) -> Iterator[tuple[bytes, bytes]]:
        """Every pair added, in order; run once, after the last :meth:`add`."""
        self._held.sort()
        while len(self._runs) >= MAX_FAN_IN:  # merge the oldest into one, until few are left
            first, self._runs = self._runs[:MAX_FAN_IN], self._runs[MAX_FAN_IN:]
            self._runs.append(self._write_run(heapq.merge(*map(_read_run, first))))
            for path in first:
                os.remove(path)
        yield from heapq.merge(*map(_read_run, self._runs), self._held)

    def _write_run(self, pairs: Iterable[tuple[bytes, bytes]]) -> str:
        if self._dir is None:
            self._dir = self._make_dir()
        path = os.path.join(self._dir, f"run-{self._written:06d}")
        self._written += 1
        with open(path, "wb", buffering=RUN_READ_BYTES) as f:
            for key, value in pairs:
                f.write(frame(key, value))
        return path

    def close(self) -> None:
        self._held, self._runs = [], []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Sorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_run(path: str) -> Iterator[tuple[bytes, bytes]]:
    with open(path, "rb") as f:
        yield from frames(iter(lambda: f.read(RUN_READ_BYTES), b""))
