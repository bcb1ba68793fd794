"""Composite Beam transforms of the preprocessing stage. No I/O of their own: ``ReadAndDecode``
is handed its reader (the storage edge in the pipeline, a dict in the tests).

Elements are plain dicts (cheap to pickle between workers). An *example* dict has
``id, uri, label, split, sha256, image, pixel_mean, pixel_sq_mean``; a *dead letter* has
``uri, label, split, stage, reason, detail``. Step names are stable: they appear in logs,
metrics, dead letters and Kubernetes Job names.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from components.core import storage
from components.preprocess import images, progress
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
    record: dict[str, Any],
    size: int,
    min_size: int,
    quality: int,
    max_decoded: int = images.DEFAULT_MAX_DECODED_BYTES,
) -> tuple[bool, dict[str, Any]]:
    """Decodes one record's ``data``: ``(True, example)`` or ``(False, dead letter)``.

    Pure and thread-safe: :class:`ReadAndDecode` runs it on a pool of threads (Pillow and
    hashlib release the GIL while they work).
    """
    if not record.get("label"):
        return False, dead_letter(record, "DecodeAndValidate", "missing_label", "no label")
    data = record["data"]
    try:
        image = images.process_image(data, size, min_size, quality, max_decoded)
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


# Candidates read and decoded per batch: enough to keep every image thread busy, few enough
# that a batch of full-size originals stays small in memory.
READ_BATCH = 32
MAX_DEFAULT_THREADS = 8


FILE_TOO_LARGE = "file_too_large"
NOT_A_FILE = "not_a_file"
DEFAULT_MAX_FILE_BYTES = 64 * 2**20


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: the ones it is pinned to (``sched_getaffinity``), fewer
    when a cgroup CPU quota (a pod's CPU limit, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``)
    allows less, rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_quota(root: str) -> float | None:
    """CPUs allowed by the cgroup's quota, or None when there is none (or no cgroup)."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def default_image_threads() -> int:
    """Image threads when ``preprocess.image_threads`` is 0: one per CPU this process may use
    (:func:`available_cpus`: a pod's CPU limit counts, not the node's cores), at most
    :data:`MAX_DEFAULT_THREADS`."""
    return max(1, min(available_cpus(), MAX_DEFAULT_THREADS))


class _ReadAndDecodeFn(beam.DoFn):
    """Reads and decodes a batch of candidates on a pool of threads; on every worker.

    File reads, Pillow's decode / resize / encode and hashlib all release the GIL, so the
    threads keep several cores busy inside one Beam worker (and overlap the latency of gs://
    reads). With a pool, a batch's results are emitted when the next batch has been handed
    to the threads (the last one's at the end of the bundle), so the threads never wait
    while this thread passes results downstream. Results come back in input order; counters
    and the progress log stay on the bundle's own thread (Beam's metrics belong to it, not
    to pool threads).
    """

    def __init__(
        self,
        read: Callable[[str], bytes],
        check: Callable[[dict[str, Any]], tuple[bool, Any]],
        threads: int,
        max_file: int,
        step: str,
    ):
        self._read = read
        self._check = check
        self._max_file = max_file
        self._step = step
        self._threads = threads
        self._decoded = beam.metrics.Metrics.counter(step, "decoded")
        self._rejected = beam.metrics.Metrics.counter(step, "rejected")
        self._seen = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[list[Future], Any, Any]] = []  # submitted: futures, timestamp, window

    def setup(self):
        threads = self._threads or default_image_threads()  # resolved where the worker runs
        if threads > 1:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def start_bundle(self):
        self._pending = []

    def process(self, batch: list[Any], timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if self._pool is None:  # one thread: decode right here
            yield from self._outputs(map(self._one, batch))
            return
        self._pending.append(([self._pool.submit(self._one, c) for c in batch], timestamp, window))
        if len(self._pending) > 1:
            futures, _, _ = self._pending.pop(0)
            yield from self._outputs(f.result() for f in futures)

    def finish_bundle(self):
        # Outside process() an output carries its own timestamp and window.
        for futures, timestamp, window in self._pending:
            for output in self._outputs(f.result() for f in futures):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(
                        output.tag, WindowedValue(output.value, timestamp, [window])
                    )
                else:
                    yield WindowedValue(output, timestamp, [window])
        self._pending = []

    def _outputs(self, results):
        for ok, row in results:
            self._seen += 1
            if self._seen % 500 == 0:
                _LOG.info("%s: %d images on this worker", self._step, self._seen)
            progress.TALLY.add(progress.READ)
            if ok:
                self._decoded.inc()
                progress.TALLY.add(progress.DECODED)
                yield row
            else:
                self._rejected.inc()
                progress.TALLY.add(progress.DEAD_LETTERS)
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, row)

    def _one(self, candidate: Any) -> tuple[bool, Any]:
        """On a pool thread: one candidate's checked output, or its dead letter."""
        ok, record = read_candidate(candidate, self._read, self._max_file)
        return self._check(record) if ok else (False, record)


def read_candidate(
    candidate: Any, read: Callable[[str], bytes], max_file: int
) -> tuple[bool, dict[str, Any]]:
    """Reads one listed candidate (``sources.Candidate``): ``(True, record)`` with its bytes in
    ``data``, or ``(False, dead letter)``: a problem found while listing, a file over
    ``max_file`` bytes (unread when the listing knew its size), not a regular file, or any
    read error (missing, permission denied, ...), after the client's own retries."""
    record = {"id": candidate.id, "uri": candidate.uri, "label": candidate.label, "split": candidate.split}
    if candidate.problem:
        return False, dead_letter(record, "ListImages", candidate.problem, candidate.detail)
    too_large = f"over preprocess.max_file_mb ({max_file / 2**20:g} MiB)"
    if candidate.size > max_file:  # known from the listing: not read at all
        return False, dead_letter(
            record, "ReadImages", FILE_TOO_LARGE, f"{candidate.size} bytes, {too_large}"
        )
    try:
        record["data"] = read(candidate.uri)
        if len(record["data"]) > max_file:  # a reader that does not bound itself
            raise storage.FileTooLarge(candidate.uri, max_file)
    except storage.NotAFile as e:
        return False, dead_letter(record, "ReadImages", NOT_A_FILE, str(e))
    except storage.FileTooLarge:
        return False, dead_letter(
            record, "ReadImages", FILE_TOO_LARGE, f"more than {max_file} bytes, {too_large}"
        )
    except Exception as e:  # any read error (missing, permission denied, ...): this file's
        # problem, after the client's own retries, not the run's
        return False, dead_letter(record, "ReadImages", "unreadable", f"{type(e).__name__}: {e}")
    return True, record


class ReadAndCheck(beam.PTransform):
    """Candidates (``sources.Candidate``) -> what ``check`` makes of each one's bytes, plus a
    ``dead_letter`` output.

    Reads each candidate's bytes with ``read`` (the pipeline passes the storage edge's reader,
    bounded to ``max_file`` bytes; the transform itself does no I/O of its own;
    :func:`read_candidate` says what becomes a dead letter) and hands the record to ``check``
    (``(True, output)`` or ``(False, dead letter)``, pure and thread-safe), in batches of
    :data:`READ_BATCH` on ``threads`` threads per worker (0: one per usable CPU). The batches
    are redistributed first (a listing is read as one bundle; this spreads the work over every
    worker), as batches: one shuffled element per 32 candidates. ``step`` names the counters.

    Returns a ``DoOutputsTuple``: ``result.examples`` and ``result.dead_letter``.
    """

    def __init__(
        self,
        read: Callable[[str], bytes],
        check: Callable[[dict[str, Any]], tuple[bool, Any]],
        threads: int = 0,
        max_file: int = DEFAULT_MAX_FILE_BYTES,
        step: str = "DecodeAndValidate",
    ):
        super().__init__()
        self._fn = _ReadAndDecodeFn(read, check, threads, max_file, step)

    def expand(self, candidates):
        return (
            candidates
            | "Batch" >> beam.BatchElements(min_batch_size=READ_BATCH, max_batch_size=READ_BATCH)
            | "Distribute" >> beam.Reshuffle()
            | "Decode" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main="examples")
        )


class ReadAndDecode(ReadAndCheck):
    """Candidates -> examples (:func:`decode_record`: decoded, validated, resized and
    re-encoded at ``size``, at most ``max_decoded`` bytes of pixels), plus a ``dead_letter``
    output; see :class:`ReadAndCheck`."""

    def __init__(
        self,
        read: Callable[[str], bytes],
        size: int,
        min_size: int,
        quality: int = 95,
        threads: int = 0,
        max_file: int = DEFAULT_MAX_FILE_BYTES,
        max_decoded: int = images.DEFAULT_MAX_DECODED_BYTES,
    ):
        decode = functools.partial(
            decode_record, size=size, min_size=min_size, quality=quality, max_decoded=max_decoded
        )
        super().__init__(read, decode, threads, max_file)


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
