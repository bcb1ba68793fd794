"""Wiring of the stages: command line, configuration and the storage edge."""

from __future__ import annotations

import datetime
import os
from importlib import metadata

# TensorFlow turns on oneDNN's CPU kernels by default only on CPUs with AVX-512 VNNI/BF16 or
# AMX; on AVX2 machines (most laptops and cloud VMs, AMD EPYC) it leaves them off, and
# fine-tuning MobileNetV2 on 2 cores runs at half the speed (`make bench`: bench_cpu_kernels.py).
# Read once, when TensorFlow is first imported: this package is imported before it (the CLI,
# the components package, the tests). TF_ENABLE_ONEDNN_OPTS=0 in the environment still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def code_version() -> str:
    """The installed package's version, recorded in run.json and with every pushed version
    ("" when the package is not installed)."""
    try:
        return metadata.version("finetune-pipeline")
    except metadata.PackageNotFoundError:
        return ""


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2026-11-26T09:30:00Z``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
