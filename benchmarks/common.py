"""What every benchmark shares (``benchmarks.common``: the benchmarks run as modules from the
repository root)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(message: str) -> None:
    """A progress line on stderr (stdout carries the JSON result)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_result(path: str, result: dict[str, Any]) -> None:
    """Writes the result as JSON to ``path`` (creating its folder) and prints it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def add_work_options(parser: argparse.ArgumentParser, kept: str) -> None:
    """``--work`` and ``--keep``: where the benchmark's scratch goes, and whether ``kept``
    (what it holds, for the help) stays after."""
    parser.add_argument("--work", help="scratch folder, new or empty (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help=f"keep {kept}")


@contextlib.contextmanager
def work_folder(args: argparse.Namespace, prefix: str) -> Iterator[str]:
    """The scratch folder of :func:`add_work_options`: ``--work`` (refused unless new or
    empty, so nothing of a user's is ever removed) or a new temporary folder; removed at the
    end, whatever happens, unless ``--keep``."""
    if args.work:
        os.makedirs(args.work, exist_ok=True)
        if os.listdir(args.work):
            raise SystemExit(f"--work {args.work}: not empty; give a new or empty folder")
        work = os.path.abspath(args.work)
    else:
        work = tempfile.mkdtemp(prefix=prefix)
    try:
        yield work
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def paired(
    rounds: list[dict], what: str, top: str, bottom: str, keys: tuple[str, str, str]
) -> dict[str, Any]:
    """Measurement ``what`` of variants ``top`` and ``bottom`` run side by side in each round
    (``rounds[i][variant][what]``): each variant's median, the median of the per-round
    ``top / bottom`` ratios (only same-round figures are compared: a shared machine's speed
    drifts over minutes) and those ratios, under ``keys`` (top's, bottom's, the ratio's)."""
    ratios = [r[top][what] / r[bottom][what] for r in rounds]
    return {
        keys[0]: statistics.median(r[top][what] for r in rounds),
        keys[1]: statistics.median(r[bottom][what] for r in rounds),
        keys[2]: round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
    }


def mobilenet_v2_alpha(weights: str) -> str:
    """The width of a Keras MobileNetV2 ImageNet weights file, from its name
    (``..._<alpha>_<size>_no_top.h5``), for ``--set model.alpha=``.

    Raises:
        SystemExit: the name is not of that form, or the file is missing.
    """
    match = re.search(r"_(\d\.\d+)_\d+_no_top", os.path.basename(weights))
    if not match or not os.path.exists(weights):
        raise SystemExit(f"--weights {weights}: expected a MobileNetV2 '..._<alpha>_<size>_no_top.h5' file")
    return match.group(1)


class StageFailed(Exception):
    """A ``finetune`` subprocess exited non-zero (its output's end in the message)."""


def finetune(command: str, options: list[str], log_dir: str) -> float:
    """``python -m pipeline.cli <command> <options>`` (what ``finetune`` runs), its output in
    ``<log_dir>/<command>.log``; returns its seconds.

    Raises:
        StageFailed: it exited non-zero (a candidate the gate does not bless exits 0 too).
    """
    say(f"finetune {command} ...")
    log_path = os.path.join(log_dir, f"{command}.log")
    os.makedirs(log_dir, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", command, *options],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            check=False,
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        text = open(log_path).read()
        raise StageFailed(f"finetune {command} failed (exit code {done.returncode}):\n{text[-3000:]}")
    say(f"finetune {command}: {seconds:.1f} s")
    return seconds
