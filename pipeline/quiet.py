"""TensorFlow's start-up noise, held back: the lines its C++ logging writes to stderr while it
loads, which ask nothing of a user (issue #18). Shown with -v or a TF_CPP_MIN_LOG_LEVEL of 0."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# What TensorFlow writes to stderr while it loads that asks nothing of a user (issue #18).
# Two copies of its C++ logging (libtensorflow_framework.so.2's and the profiler plugin's)
# write these lines as the libraries load, before TF_CPP_MIN_LOG_LEVEL is applied; Abseil's
# logging reads no variable, so only the stderr of the import itself can hold them back.
STARTUP_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "] oneDNN custom operations are on.",
    "] Could not find cuda drivers on your machine, GPU will not be used.",
)
NO_CUDA_DRIVER = "] Could not find cuda drivers on your machine"
CUINIT_FAILED = "] failed call to cuInit:"


def without_startup_noise(text: str) -> str:
    """``text``, what TensorFlow wrote to stderr while it loaded, less its start-up noise: the
    lines of STARTUP_NOISE, and the failed cuInit (an ERROR) of a machine that has no CUDA
    driver at all, which TensorFlow said just before. Where a driver is installed a failed
    cuInit is a fault, and it stays; so does every other line."""
    lines = text.splitlines(keepends=True)
    no_driver = any(NO_CUDA_DRIVER in line for line in lines)
    return "".join(
        line
        for line in lines
        if not any(noise in line for noise in STARTUP_NOISE) and not (no_driver and CUINIT_FAILED in line)
    )


def quiet_startup(environ: dict[str, str] | None = None) -> bool:
    """Whether TensorFlow's start-up noise is held back: unless the C++ log level in force
    (TF_CPP_MIN_LOG_LEVEL: the user's, else 0 with -v and 2 without, see ``_setup_logging``)
    shows INFO."""
    environ = os.environ if environ is None else environ
    return environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() not in ("", "0")


@contextlib.contextmanager
def startup_noise_held_back() -> Iterator[None]:
    """Holds the process's stderr (fd 2, where C++ writes) in a temporary file while the body
    runs, then writes what came there to stderr less :func:`without_startup_noise`'s lines;
    also when the body raises, so a failed import's own lines are shown.

    A temporary file rather than a pipe: nothing blocks however much is written, and no reader
    thread can fall behind. A process killed inside the body (a crash while TensorFlow loads)
    takes what was held with it; -v holds nothing back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                sys.stderr.write(without_startup_noise(held.read().decode(errors="replace")))
                sys.stderr.flush()
    finally:
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices (which starts CUDA, or fails to) with its
    start-up noise held back. A no-op but for the device list once TensorFlow is imported."""
    with startup_noise_held_back():
        import tensorflow as tf

        tf.config.list_physical_devices()
