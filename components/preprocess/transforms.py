"""Composite Beam transforms of the preprocessing stage. No I/O here.

Elements are plain dicts (cheap to pickle between workers). An *example* dict has
``id, uri, label, split, sha256, image, pixel_mean, pixel_sq_mean``; a *dead letter* has
``uri, label, split, stage, reason, detail``. Step names are stable: they appear in logs,
metrics, dead letters and Kubernetes Job names.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import apache_beam as beam

from components.preprocess import images
from components.preprocess.splits import assign_split

DEAD_LETTER = "dead_letter"
DUPLICATE = "duplicate"
_SPLIT_PRIORITY = {"test": 0, "eval": 1, "train": 2}  # which copy of a duplicate is kept
_LOG = logging.getLogger(__name__)


def dead_letter(record: dict[str, Any], stage: str, reason: str, detail: str) -> dict[str, Any]:
    """The dead-letter row for ``record``: what it was, where and why it was rejected."""
    return {
        "uri": record.get("uri", ""),
        "label": record.get("label", ""),
        "split": record.get("split", ""),
        "stage": stage,
        "reason": reason,
        "detail": detail,
    }


def decode_record(
    record: dict[str, Any], size: int, min_size: int, quality: int
) -> tuple[bool, dict[str, Any]]:
    """Decodes one record's ``data``: ``(True, example)`` or ``(False, dead letter)``.

    Pure and thread-safe: the pipeline runs it on a pool of threads (Pillow and hashlib
    release the GIL while they work), the composite below runs it one record at a time.
    """
    if not record.get("label"):
        return False, dead_letter(record, "DecodeAndValidate", "missing_label", "no label")
    data = record["data"]
    try:
        image = images.process_image(data, size, min_size, quality)
    except images.BadImage as e:
        return False, dead_letter(record, "DecodeAndValidate", e.reason, e.detail)
    return True, {
        "id": record["id"],
        "uri": record["uri"],
        "label": record["label"],
        "split": record.get("split", ""),
        "sha256": hashlib.sha256(data).hexdigest(),
        "image": image.encoded,
        "pixel_mean": list(image.pixel_mean),
        "pixel_sq_mean": list(image.pixel_sq_mean),
    }


class DecodeCounters:
    """The decode counters and progress log, kept on the bundle's own thread (Beam's metrics
    belong to the thread that processes the bundle, not to pool threads)."""

    def __init__(self):
        self._decoded = beam.metrics.Metrics.counter("DecodeAndValidate", "decoded")
        self._rejected = beam.metrics.Metrics.counter("DecodeAndValidate", "rejected")
        self._seen = 0

    def route(self, ok: bool, row: dict[str, Any]):
        """The output for one :func:`decode_record` result: the example or a dead letter."""
        self._seen += 1
        if self._seen % 500 == 0:
            _LOG.info("DecodeAndValidate: %d images on this worker", self._seen)
        if ok:
            self._decoded.inc()
            return row
        self._rejected.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER, row)


class _DecodeAndValidateFn(beam.DoFn):
    """Decodes one image; on every worker. Bad images go to the dead-letter output."""

    def __init__(self, size: int, min_size: int, quality: int):
        self._size, self._min_size, self._quality = size, min_size, quality
        self._counters = DecodeCounters()

    def process(self, record: dict[str, Any]):
        yield self._counters.route(*decode_record(record, self._size, self._min_size, self._quality))


class DecodeAndValidate(beam.PTransform):
    """Records with ``data`` bytes -> examples, plus a ``dead_letter`` output.

    Returns a ``DoOutputsTuple``: ``result.examples`` and ``result.dead_letter``.
    """

    def __init__(self, size: int, min_size: int, quality: int = 95):
        super().__init__()
        self._fn = _DecodeAndValidateFn(size, min_size, quality)

    def expand(self, records):
        return records | "Decode" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main="examples")


class AssignSplits(beam.PTransform):
    """Gives every example its split, from the source or from its content hash.

    Deterministic: the split depends only on the image bytes and the fractions, so a re-run,
    a rename or added images never move an existing image to another split.
    """

    def __init__(self, train: float, eval: float, test: float, source_has_eval: bool):
        super().__init__()
        self._args = (train, eval, test, source_has_eval)

    def expand(self, examples):
        train, eval_, test, has_eval = self._args
        return examples | "Assign" >> beam.Map(
            lambda ex: {**ex, "split": assign_split(ex["sha256"], ex["split"], train, eval_, test, has_eval)}
        )


# What Deduplicate groups: everything about an example but its image bytes.
_SLIM_KEYS = ("id", "uri", "label", "split", "sha256", "pixel_mean", "pixel_sq_mean")


def _keep_one(copies: list[dict[str, Any]]):
    """Keeps one copy of identical images; the others go to the ``duplicate`` output.

    The kept copy is the one in the most protected split (test, then eval, then train), so
    an image seen in both train and test stays a test image and no longer leaks into train.
    """
    copies = sorted(copies, key=lambda ex: (_SPLIT_PRIORITY[ex["split"]], ex["uri"], ex["id"]))
    kept = copies[0]
    yield kept
    for dup in copies[1:]:
        yield beam.pvalue.TaggedOutput(
            DUPLICATE,
            {
                "id": dup["id"],
                "uri": dup["uri"],
                "label": dup["label"],
                "split": dup["split"],
                "duplicate_of": kept["uri"],
                "kept_label": kept["label"],
                "kept_split": kept["split"],
                "cross_split": dup["split"] != kept["split"],
                "conflicting_label": dup["label"] != kept["label"],
            },
        )


class Deduplicate(beam.PTransform):
    """Finds exact duplicates (same SHA-256 of the bytes) and decides which copy stays.

    Only the examples' metadata is grouped, never the image bytes: the bytes stay where they
    were decoded, and :class:`DropDuplicates` removes the dropped copies from there.

    Returns a ``DoOutputsTuple``: ``result.examples`` (the kept copies, without image bytes)
    and ``result.duplicate`` (one report per dropped copy, with its ``id``).
    """

    def expand(self, examples):
        return (
            examples
            | "KeyByHash" >> beam.Map(lambda ex: (ex["sha256"], {k: ex[k] for k in _SLIM_KEYS}))
            | "GroupByHash" >> beam.GroupByKey()
            | "KeepOne"
            >> beam.FlatMap(lambda kv: _keep_one(list(kv[1]))).with_outputs(DUPLICATE, main="examples")
        )
