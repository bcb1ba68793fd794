"""The preprocessing stage's adapter: list inputs, run the Beam graph, publish outputs.

Runs in the driver process (the laptop, or a Kubernetes Job's pod). Everything is written
under a staging directory first and moved to ``<run_dir>/preprocess`` only once complete,
so a reader never sees half a run, and a re-run replaces the previous outputs whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from apache_beam.options.pipeline_options import PipelineOptions

from components.preprocess import analysis, schema
from components.preprocess import pipeline as graph
from components.preprocess.sources import discover
from components.preprocess.splits import SPLITS
from pipeline import storage
from pipeline.config import Config, resolved_image_size, to_yaml
from pipeline.errors import StageError

STAGE = "preprocess"
# Runners that execute in this process's machine, where TF's file system cannot reach a
# GCS emulator and need not: the transform graph is staged locally and uploaded.
LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "PrismRunner")
_LOG = logging.getLogger(__name__)


def output_dir(config: Config) -> str:
    """``<run_dir>/preprocess``: where this stage's outputs live once published."""
    return storage.join(config.run_dir, STAGE)


def beam_options(config: Config, temp_location: str) -> PipelineOptions:
    """The Beam options: ``preprocess.pipeline_options`` passed through unchanged, plus the
    runner and, for the local runner, one worker process per core (or ``num_workers``)."""
    p = config.preprocess
    options: dict[str, Any] = {"runner": p.runner, "temp_location": temp_location}
    if p.runner in LOCAL_RUNNERS:
        options["direct_num_workers"] = p.num_workers or os.cpu_count() or 1
        options["direct_running_mode"] = (
            "multi_processing" if options["direct_num_workers"] > 1 else "in_memory"
        )
    options.update(p.pipeline_options)
    return PipelineOptions(flags=[], **options)


def _runner(config: Config):
    """The local DirectRunner is pinned to Beam's FnApiRunner (the one that honours
    ``direct_num_workers``), instead of letting it try to download the Prism runner."""
    if config.preprocess.runner == "DirectRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def run(config: Config) -> dict[str, Any]:
    """Runs preprocessing for ``config`` and returns the summary written to summary.json.

    Raises:
        ConfigError: when the source cannot be listed.
        StageError: when too many inputs were bad or nothing is left to train on; the dead
            letters and summary.json are still published, the records are not.
    """
    started = time.time()
    size = resolved_image_size(config)
    listing = discover(config.data.source)
    total = len(listing.candidates)
    print(
        f"[{STAGE}] {total} files in {config.data.source} ({listing.layout}); "
        f"images -> {size}x{size} JPEG; runner {config.preprocess.runner}",
        flush=True,
    )

    final = output_dir(config)
    staging = storage.join(config.run_dir, f".{STAGE}-staging-{uuid.uuid4().hex[:8]}")
    local_tmp = tempfile.mkdtemp(prefix="finetune-preprocess-")
    local_graph = config.preprocess.runner in LOCAL_RUNNERS and storage.is_gcs(config.run_dir)
    transform_dir = os.path.join(local_tmp, "graph") if local_graph else staging
    tft_temp = (
        os.path.join(local_tmp, "tft")
        if config.preprocess.runner in LOCAL_RUNNERS
        else storage.join(staging, "tmp", "tft")
    )
    try:
        candidates_uri = storage.join(staging, "tmp", "candidates.jsonl")
        storage.write_text(candidates_uri, "".join(c.to_json() + "\n" for c in listing.candidates))
        split = config.data.split
        plan = graph.Plan(
            candidates_uri=candidates_uri,
            output_dir=staging,
            transform_fn_dir=transform_dir,
            image_size=size,
            min_image_size=config.preprocess.min_image_size,
            jpeg_quality=config.preprocess.jpeg_quality,
            num_shards=config.preprocess.num_shards,
            split_fractions=(split.train, split.eval, split.test),
            source_has_eval=listing.has_eval,
        )
        options = beam_options(config, temp_location=storage.join(staging, "tmp", "beam"))
        with tft_beam.Context(temp_dir=tft_temp, force_tf_compat_v1=False):
            with beam.Pipeline(runner=_runner(config), options=options) as p:
                graph.build(p, plan)
        image_stats = analysis.image_statistics(transform_dir)
        if local_graph:
            storage.copy_tree(transform_dir, staging)
        storage.delete_tree(storage.join(staging, "tmp"))
        summary = _summary(config, listing.layout, total, size, staging, time.time() - started)
        summary["image_stats"] = image_stats
        storage.write_text(storage.join(staging, "config.yaml"), to_yaml(config))
        problem = _problem(config, summary)
        if problem:
            summary["status"], summary["error"] = "failed", problem
            for split_dir in ("transform_fn", "transformed_metadata", *SPLITS):
                storage.delete_tree(storage.join(staging, split_dir))
        storage.write_text(storage.join(staging, "summary.json"), json.dumps(summary, indent=2) + "\n")
        storage.delete_tree(final)
        storage.move_tree(staging, final)
    finally:
        storage.delete_tree(staging)
        shutil.rmtree(local_tmp, ignore_errors=True)
    _print_summary(summary, final)
    if problem:
        raise StageError(problem)
    return summary


def _summary(
    config: Config, layout: str, total: int, size: int, staging: str, seconds: float
) -> dict[str, Any]:
    counts = json.loads(storage.read_text(storage.join(staging, "counts.json")))
    vocab_uri = storage.join(staging, "transform_fn", "assets", schema.LABEL_VOCABULARY)
    classes = storage.read_text(vocab_uri).splitlines() if storage.exists(vocab_uri) else []
    storage.delete_tree(storage.join(staging, "counts.json"))
    return {
        "status": "ok",
        "source": config.data.source,
        "layout": layout,
        "image_size": size,
        "inputs": total,
        "classes": classes,
        **counts,
        "bad_fraction": round(counts["dead_letter"]["count"] / total, 6) if total else 0.0,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 2) if seconds > 0 else 0.0,
    }


def _problem(config: Config, summary: dict[str, Any]) -> str:
    """Why the outputs must not be used, or ``""``."""
    limit = config.preprocess.max_bad_fraction
    bad = summary["dead_letter"]["count"]
    if summary["bad_fraction"] > limit:
        reasons = ", ".join(f"{r}: {n}" for r, n in summary["dead_letter"]["by_reason"].items())
        return (
            f"{bad} of {summary['inputs']} inputs were bad ({summary['bad_fraction']:.1%} > "
            f"preprocess.max_bad_fraction {limit:.1%}; {reasons}). See "
            f"{storage.join(output_dir(config), 'dead_letter.jsonl')}; fix or remove them, or "
            "raise preprocess.max_bad_fraction."
        )
    if summary["records"]["train"] == 0:
        return "no valid training images are left; see dead_letter.jsonl for why each was rejected"
    return ""


def _print_summary(summary: dict[str, Any], final: str) -> None:
    records = ", ".join(f"{s} {n}" for s, n in summary["records"].items())
    dead = summary["dead_letter"]
    reasons = ", ".join(f"{r} {n}" for r, n in dead["by_reason"].items()) or "none"
    print(
        f"[{STAGE}] {summary['status']}: records {records}; classes {summary['classes']}; "
        f"dead letters {dead['count']} ({reasons}); duplicates {summary['duplicates']['count']} "
        f"(leaking across splits {summary['leakage']['count']}); {summary['seconds']:.1f} s, "
        f"{summary['images_per_second']:.1f} images/s\n[{STAGE}] outputs: {final}",
        flush=True,
    )
