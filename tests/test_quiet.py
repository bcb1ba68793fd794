"""TensorFlow's and Beam's start-up noise: held back by default, shown with -v (issue #18)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import cli, quiet

FINETUNE = [sys.executable, "-m", "pipeline.cli"]
# One marker per kind of line a default run must not show.
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit", "instance dicts")
# What TensorFlow 2.21 writes while it loads on a machine without a CUDA driver (shortened).
IMPORT_STDERR = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1.5    245 port.cc:153] oneDNN custom operations are on. You may see slightly different results.
I0000 00:00:1.6    245 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
W0000 00:00:1.7    245 some_op.cc:12] a real warning
E0000 00:00:1.8    245 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)
"""


def test_startup_noise_goes_and_every_other_line_stays():
    assert (
        quiet.without_startup_noise(IMPORT_STDERR) == "W0000 00:00:1.7    245 some_op.cc:12] a real warning\n"
    )


def test_a_failed_cuinit_stays_where_a_cuda_driver_is_installed():
    with_driver = "".join(line for line in IMPORT_STDERR.splitlines(True) if "cudart_stub" not in line)
    assert "failed call to cuInit" in quiet.without_startup_noise(with_driver)


def test_the_log_level_in_force_decides_and_the_users_wins():
    assert quiet.quiet_startup({"TF_CPP_MIN_LOG_LEVEL": "2"})  # the default without -v
    assert not quiet.quiet_startup({"TF_CPP_MIN_LOG_LEVEL": "0"})  # -v, or the user asks for INFO
    assert quiet.quiet_startup({"TF_CPP_MIN_LOG_LEVEL": "3"})  # the user's, even with -v


def test_held_back_stderr_still_shows_errors_when_the_body_fails(capfd):
    with pytest.raises(ImportError, match="no such library"):
        with quiet.startup_noise_held_back():
            os.write(2, IMPORT_STDERR.encode())
            print("Traceback: the import failed", file=sys.stderr)
            raise ImportError("no such library")
    err = capfd.readouterr().err
    assert "a real warning" in err and "Traceback: the import failed" in err
    assert not any(marker in err for marker in NOISE), err


def test_the_instance_dicts_notice_is_hidden_unless_verbose(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # what _setup_logging would set
    notice = logging.LogRecord(
        "absl", logging.WARNING, __file__, 1, cli.TFT_INSTANCE_DICTS + " ...", (), None
    )
    other = logging.LogRecord("absl", logging.WARNING, __file__, 1, "something real", (), None)
    beam_notice = logging.LogRecord(
        "root", logging.WARNING, __file__, 1, cli.BEAM_NO_RESOURCE + ", ...", (), None
    )
    absl, root = logging.getLogger("absl"), logging.getLogger()
    try:
        cli._setup_logging(verbose=False)
        assert not absl.filter(notice) and absl.filter(other)
        assert not root.filter(beam_notice) and root.filter(other)
        cli._setup_logging(verbose=True)
        assert absl.filter(notice) and absl.filter(other) and root.filter(beam_notice)
    finally:
        absl.removeFilter(cli.not_instance_dicts_notice)
        root.removeFilter(cli.not_instance_dicts_notice)


def _preprocess(source: str, run_dir: str, *flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.getcwd()
    command = ["preprocess", *flags, "--set", f"data.source={source}", "--set", f"run_dir={run_dir}"]
    command += ["--set", "model.image_size=32", "--set", "preprocess.num_workers=1"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}  # not a terminal, as in a log
    return subprocess.Popen([*FINETUNE, *command], text=True, env=env, **pipes)


def _finished(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "[preprocess] ok: records" in stdout, stdout
    return stdout, stderr


def test_a_run_shows_its_own_lines_and_no_startup_noise_unless_verbose(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        os.makedirs(tmp_path / "src" / label)
        for i in range(5):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(tmp_path / "src" / label / f"{i}.jpg")
    # Side by side: each spends most of its time importing TensorFlow.
    quiet = _preprocess(str(tmp_path / "src"), str(tmp_path / "quiet"))
    verbose = _preprocess(str(tmp_path / "src"), str(tmp_path / "verbose"), "-v")
    stdout, stderr = _finished(quiet)
    assert not [marker for marker in NOISE if marker in stdout + stderr], stderr
    _, stderr = _finished(verbose)
    assert "instance dicts" in stderr, stderr  # Python's side, on any machine
    assert "absl::InitializeLog" in stderr or "oneDNN custom operations" in stderr
