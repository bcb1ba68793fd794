"""Wiring of the stages: command line, configuration and the storage edge."""

from __future__ import annotations

import os

# TensorFlow turns on oneDNN's CPU kernels by default only on CPUs with AVX-512 VNNI/BF16 or
# AMX; on AVX2 machines (most laptops and cloud VMs, AMD EPYC) it leaves them off, and
# fine-tuning MobileNetV2 on 2 cores runs at half the speed (`make bench`: bench_cpu_kernels.py).
# Read once, when TensorFlow is first imported: this package is imported before it (the CLI,
# the components package, the tests). TF_ENABLE_ONEDNN_OPTS=0 in the environment still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
