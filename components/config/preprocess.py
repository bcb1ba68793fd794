"""The ``preprocess`` section: the Beam + tf.Transform stage, its runner and the credentials rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from components.core.configtree import option, out_of_range
from components.core.errors import did_you_mean

# Beam runners we know by name; a dotted path to a runner class is passed through as well.
KNOWN_RUNNERS = (
    "DirectRunner",
    "BundleBasedDirectRunner",
    "PrismRunner",
    "DataflowRunner",
    "FlinkRunner",
    "SparkRunner",
    "PortableRunner",
)
# pipeline_options keys that hold credentials: they would be copied into every config.yaml, the
# cluster's ConfigMap and the registry's assets.extra. Known harmless keys that match are allowed.
_SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|private|(^|_)key($|_)|apikey", re.I)
SAFE_OPTION_KEYS = frozenset(
    {"dataflow_kms_key", "kms_key_name", "service_account_email", "impersonate_service_account"}
)


@dataclass(frozen=True)
class PreprocessConfig:
    """The Beam + tf.Transform preprocessing stage.

    ``runner`` and ``pipeline_options`` go to Beam unchanged, so the same pipeline runs on
    Dataflow, Flink or Spark. ``image_threads`` is how many threads read and decode images
    in each Beam worker (``0``: one per CPU the worker may use, at most 8); they are
    what uses a machine's cores. ``num_workers`` sets the local runner's worker processes
    (``0``: one, in this process); remote runners ignore it. ``max_file_mb`` bounds the bytes
    read for one input (a larger file is a ``file_too_large`` dead letter, read no further);
    ``max_decoded_mb`` the memory its decoded pixels may take, from its header before any
    decoding (a ``too_large`` dead letter: a small PNG can declare a huge 16-bit canvas).
    """

    runner: str = option(
        "DirectRunner", help="any Beam runner (`DataflowRunner`, `FlinkRunner`, `SparkRunner`, ...)"
    )
    pipeline_options: dict[str, Any] = option(
        help="passed to Beam unchanged (`project`, `region`, `temp_location`, `setup_file`, ...); "
        "keys that look like credentials are refused",
        factory=dict,
    )
    num_workers: int = option(0, help="local runner worker processes; 0 = one, in this process")
    image_threads: int = option(
        0,
        help="threads reading and decoding images in each Beam worker; 0 = one per CPU the worker "
        "may use (its affinity and cgroup quota, e.g. a pod's CPU limit), at most 8",
    )
    num_shards: int = option(
        0,
        help="TFRecord files per split; 0 = from the data: files of about 150 MB, and at least one "
        "train file per training worker (`cluster.workers`)",
    )
    shard_sort_mb: int = option(
        64,
        help="memory (MiB) each shard writer may hold to put its records in content-hash order; a "
        "larger shard is sorted in runs on the worker's local disk and merged (same bytes either way)",
    )
    min_image_size: int = option(32, help="images whose shorter side is smaller are rejected")
    max_bad_fraction: float = option(
        0.1, help="fail the run when more of the inputs than this are dead letters"
    )
    jpeg_quality: int = option(95, help="quality of the re-encoded JPEGs in the TFRecords")
    max_file_mb: int = option(
        64, help="an input file larger than this is a `file_too_large` dead letter, never read past it"
    )
    max_decoded_mb: int = option(
        256,
        help="an image whose pixels (bit depth counted) plus their RGB copy would take more, from its "
        "header, is `too_large`",
    )


def secret_option_keys(options: dict[str, Any]) -> list[str]:
    """The ``preprocess.pipeline_options`` keys that look like credentials."""
    return sorted(k for k in options if _SECRET_KEY_RE.search(str(k)) and str(k) not in SAFE_OPTION_KEYS)


def runner_problems(section: str, runner: str, options: dict[str, Any]) -> list[str]:
    """The problems of a section's Beam ``runner`` and ``pipeline_options`` (``preprocess``
    and ``predict`` share the rules)."""
    problems = []
    secret = secret_option_keys(options)
    if secret:
        problems.append(
            f"{section}.pipeline_options: {', '.join(secret)} look like credentials, which would be written "
            "into every config.yaml, the cluster's ConfigMap and the registry; give the workers an identity "
            "instead (Workload Identity, cluster.credentials_secret, or the runner's service account)"
        )
    if runner not in KNOWN_RUNNERS and "." not in runner:
        problems.append(
            f"{section}.runner: unknown runner '{runner}'{did_you_mean(runner, KNOWN_RUNNERS)} "
            f"Valid: {', '.join(KNOWN_RUNNERS)}, or a dotted path to a runner class"
        )
    return problems


def check(p: PreprocessConfig) -> list[str]:
    """Every problem of the ``preprocess`` section."""
    problems = runner_problems("preprocess", p.runner, p.pipeline_options)
    problems += out_of_range(
        "preprocess.",
        (
            ("num_workers", p.num_workers, 0, 1024),
            ("image_threads", p.image_threads, 0, 256),
            ("num_shards", p.num_shards, 0, 100_000),
            ("shard_sort_mb", p.shard_sort_mb, 1, 1_000_000),
            ("min_image_size", p.min_image_size, 1, 100_000),
            ("jpeg_quality", p.jpeg_quality, 1, 100),
            ("max_file_mb", p.max_file_mb, 1, 100_000),
            ("max_decoded_mb", p.max_decoded_mb, 1, 100_000),
        ),
    )
    if not 0.0 <= p.max_bad_fraction <= 1.0:
        problems.append(f"preprocess.max_bad_fraction: {p.max_bad_fraction} must be between 0 and 1")
    return problems
