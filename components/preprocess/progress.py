"""Progress of a preprocessing run that a user can watch.

The pipeline's steps count what they do twice: as Beam metrics counters (``Metrics.counter``,
which Dataflow's, Flink's and Spark's UIs show while a job runs) and in this process's
:data:`TALLY`. Beam commits its counters only when a bundle ends, and the local runner reads
a whole listing as one bundle, so while a local run goes its counters say nothing; the tally
does, and the stage's :class:`Reporter` prints it at intervals. It is only meaningful where
the steps run in this process (the local runner with one in-process worker); elsewhere the
runner's own UI and logs show the counters.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from apache_beam.metrics import Metrics

READ = "images_read"
DECODED = "images_decoded"
DEAD_LETTERS = "dead_letters"
RECORDS = "records_written"
SHARDS = "shards_written"
INTERVAL_ENV = "FINETUNE_PROGRESS_SECONDS"  # seconds between progress lines (default 10)
DEFAULT_INTERVAL = 10.0


class Tally:
    """Thread-safe counts of this process's work (image threads and Beam's bundle threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


TALLY = Tally()  # this process's: what the steps that run here have done


def count(step: str, name: str, n: int = 1) -> None:
    """Counts ``n`` of ``name`` for ``step``: in Beam's metrics and in :data:`TALLY`."""
    Metrics.counter(step, name).inc(n)
    TALLY.add(name, n)


def line(counts: dict[str, int], total: int, shards: int, seconds: float) -> str:
    """One progress line: ``read 1,200/3,000 images (40%), 1,190 decoded, 10 dead letters;
    records written 0, shards 0/12; 120 images/s, 10 s``."""
    middle = (
        f"{counts.get(DECODED, 0):,} decoded, {counts.get(DEAD_LETTERS, 0):,} dead letters; "
        f"records written {counts.get(RECORDS, 0):,}, shards {counts.get(SHARDS, 0)}/{shards}"
    )
    return framed(counts, total, seconds, middle)


def framed(counts: dict[str, int], total: int, seconds: float, middle: str) -> str:
    """``read R/T images (P%), <middle>; N images/s, S s``: the frame every stage's progress
    line shares, around what that stage counts."""
    read = counts.get(READ, 0)
    share = f" ({read / total:.0%})" if total else ""
    rate = read / seconds if seconds > 0 else 0.0
    return f"read {read:,}/{total:,} images{share}, {middle}; {rate:.0f} images/s, {seconds:.0f} s"


def interval() -> float:
    """Seconds between progress lines: ``$FINETUNE_PROGRESS_SECONDS`` or 10."""
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class Reporter:
    """Prints :data:`TALLY` as a progress line every ``every`` seconds while the pipeline runs
    in this process (a background thread), and once more when it stops. On a terminal the
    line is rewritten in place; otherwise (a log, a pod) each is a line of its own.

    Use as a context manager around the pipeline run; the tally starts from zero. ``describe``
    makes the line from the counts, the total and the seconds (default: preprocessing's
    :func:`line` with ``shards``).
    """

    def __init__(
        self,
        prefix: str,
        total: int,
        shards: int,
        every: float,
        out: TextIO | None = None,
        describe: Callable[[dict[str, int], int, float], str] | None = None,
    ):
        self._prefix, self._total, self._every = prefix, total, every
        self._describe = describe or (lambda counts, total, seconds: line(counts, total, shards, seconds))
        self._out = out or sys.stdout
        self._tty = self._out.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._started = 0.0

    def __enter__(self) -> Reporter:
        TALLY.reset()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._print(end="\n")

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._print(end="" if self._tty else "\n")

    def _print(self, end: str) -> None:
        text = self._describe(TALLY.snapshot(), self._total, time.perf_counter() - self._started)
        start = "\r\x1b[2K" if self._tty else ""
        self._out.write(f"{start}[{self._prefix}] {text}{end}")
        self._out.flush()
