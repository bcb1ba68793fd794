"""Progress a user can watch: the preprocessing stage's lines while its pipeline runs."""

from __future__ import annotations

import io
import os
import re
import time

import numpy as np
from PIL import Image

from components.preprocess import progress
from tests.preprocess_helpers import run_stage


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reporter_prints_a_line_at_each_interval_and_the_final_counts():
    out = io.StringIO()  # not a terminal: a line each time, as in a log or a pod
    with progress.Reporter("preprocess", total=10, shards=2, every=0.05, out=out):
        for _ in range(10):
            progress.TALLY.add(progress.READ)
            progress.TALLY.add(progress.DECODED)
        time.sleep(0.3)
        progress.TALLY.add(progress.RECORDS, 9)
        progress.TALLY.add(progress.SHARDS, 2)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("[preprocess] read ") for line in lines)
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith(
        "[preprocess] read 10/10 images (100%), 10 decoded, 0 dead letters; records written 9, shards 2/2;"
    )


def test_on_a_terminal_the_line_is_rewritten_in_place():
    out = _Terminal()
    with progress.Reporter("preprocess", total=4, shards=1, every=0.05, out=out):
        time.sleep(0.2)
    text = out.getvalue()
    assert text.count("\r\x1b[2K[preprocess] read 0/4 images (0%)") >= 2
    assert text.endswith("\n") and text.count("\n") == 1  # one line, finished when the run ends


def test_a_stage_run_reports_its_progress_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.2")
    source = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(24):
        path = source / ("cat" if i % 2 else "dog") / f"{i}.jpg"
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, "JPEG")
    (source / "cat" / "broken.jpg").write_bytes(b"not an image")
    summary = run_stage(str(source), str(tmp_path / "run"), "preprocess.max_bad_fraction=0.5")
    printed = capsys.readouterr().out
    assert "[preprocess] TFRecord files: train 1, eval 1, test 1" in printed
    lines = [line for line in printed.splitlines() if line.startswith("[preprocess] read ")]
    assert len(lines) >= 2  # at least one while it ran, and the last
    written = sum(summary["records"].values())
    assert re.match(
        rf"\[preprocess\] read 25/25 images \(100%\), 24 decoded, 1 dead letters; "
        rf"records written {written}, shards 3/3; \d+ images/s, \d+ s$",
        lines[-1],
    ), lines[-1]
