"""The prediction stage's adapter: resolve the model, list the images, run the Beam graph,
publish the outputs. Runs in the driver process (the laptop, or a Kubernetes Job's pod).

``{date}`` and ``{time}`` in ``predict.output`` are filled in at the start (the summary and
config.yaml record the folder written). Everything is written into a staging folder beside it
and moved into place only once complete: a reader never sees half a run's predictions, and a
re-run replaces the last one whole (never a folder holding files this stage did not write).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import time
from typing import Any

import apache_beam as beam

from components.config import Config, to_yaml
from components.config.predict import expand_output, missing
from components.core import outputs, scratch, storage
from components.core.errors import ConfigError, StageError
from components.predict import model as model_ref
from components.predict import pipeline as graph
from components.preprocess import progress, runners
from components.preprocess.sources import discover_images, jsonl_chunks

STAGE = "predict"


def _parent(uri: str) -> str:
    uri = uri.rstrip("/")
    if storage.is_gcs(uri):
        return posixpath.dirname(uri)
    return os.path.dirname(os.path.abspath(uri))


def describe(counts: dict[str, int], total: int, seconds: float) -> str:
    """One progress line: ``read 1,200/3,000 images (40%), 1,150 classified, 10 dead letters;
    120 images/s, 10 s``."""
    classified, dead = counts.get(graph.CLASSIFIED, 0), counts.get(progress.DEAD_LETTERS, 0)
    middle = f"{classified:,} classified, {dead:,} dead letters"
    return progress.framed(counts, total, seconds, middle)


def run(config: Config) -> dict[str, Any]:
    """Classifies every image of ``predict.input`` with ``predict.model`` into
    ``predict.output``; returns the summary written to summary.json.

    Raises:
        ConfigError: a required key is missing, the model reference does not resolve, or the
            input cannot be listed (exit 2, nothing written).
        StageError: more of the inputs than ``predict.max_bad_fraction`` were dead letters
            (the outputs are published all the same).
    """
    problems = missing(config.predict)
    if problems:
        raise ConfigError("finetune predict needs:\n  " + "\n  ".join(problems))
    started = time.time()
    output = expand_output(config.predict.output, datetime.datetime.now(datetime.UTC))
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, output=output))
    p = config.predict
    resolved = model_ref.resolve(config)
    where = f"version {resolved.version} of '{resolved.name}'" if resolved.name else resolved.uri
    print(f"[{STAGE}] model {resolved.reference}: {where} ({resolved.fingerprint[:19]})", flush=True)
    listing = discover_images(p.input, config.data.allowed_roots)
    total = len(listing.candidates)
    print(f"[{STAGE}] {total} files in {p.input} ({listing.layout}); runner {p.runner}", flush=True)
    outputs.check_owned(p.output, STAGE)  # before any work: never delete a user's file
    staging = scratch.new_staging(_parent(p.output), STAGE)
    try:
        candidates_uri = storage.join(staging, "tmp", "candidates.jsonl")
        storage.write_chunks(candidates_uri, jsonl_chunks(listing.candidates))
        layout = listing.layout
        listing.candidates.clear()  # the pipeline reads them from the file
        _run_beam(config, resolved, candidates_uri, staging, total)
        summary = _summary(config, resolved, layout, total, staging, time.time() - started)
        _publish(config, summary, staging)
    finally:
        storage.delete_tree(staging)
    _print_summary(summary, p.output)
    if summary["status"] != "ok":
        raise StageError(summary["error"])
    return summary


def _run_beam(
    config: Config, resolved: model_ref.ResolvedModel, candidates_uri: str, staging: str, total: int
):
    p = config.predict
    plan = graph.Plan(
        candidates_uri=candidates_uri,
        output_dir=staging,
        model_uri=resolved.uri,
        model=resolved.identity(),
        batch_size=p.batch_size,
        image_threads=p.image_threads,
        model_threads=p.model_threads,
        min_image_size=config.preprocess.min_image_size,
        max_file_bytes=config.preprocess.max_file_mb * 2**20,
        max_decoded_bytes=config.preprocess.max_decoded_mb * 2**20,
        num_shards=p.num_shards,
        format=p.format,
    )
    options = runners.pipeline_options(
        p.runner, p.pipeline_options, p.num_workers, storage.join(staging, "tmp", "beam")
    )
    with _progress(config, total):
        with beam.Pipeline(runner=runners.runner_instance(p.runner), options=options) as pipeline:
            graph.build(pipeline, plan)
    storage.delete_tree(storage.join(staging, "tmp"))


def _progress(config: Config, total: int) -> contextlib.AbstractContextManager:
    """Progress lines where the steps run in this process (the local runner's in-process
    worker); elsewhere the runner's UI and logs show the Beam counters."""
    p = config.predict
    if p.runner in runners.LOCAL_RUNNERS and (p.num_workers or 1) == 1:
        return progress.Reporter(STAGE, total, 0, progress.interval(), describe=describe)
    where = "its worker processes' logs" if p.runner in runners.LOCAL_RUNNERS else "the runner's UI"
    counters = (
        f"{graph.STEP_CHECK}/decoded, {graph.STEP_CHECK}/rejected, {graph.STEP_INFER}/{graph.CLASSIFIED}"
    )
    print(f"[{STAGE}] progress: Beam counters ({counters}) in {where}", flush=True)
    return contextlib.nullcontext()


def _summary(
    config: Config, resolved: model_ref.ResolvedModel, layout: str, total: int, staging: str, seconds: float
) -> dict[str, Any]:
    counts_uri = storage.join(staging, "counts.json")
    counts = json.loads(storage.read_text(counts_uri))
    storage.delete_tree(counts_uri)
    files = sorted(
        f.uri[len(staging.rstrip("/")) + 1 :]
        for f in storage.list_files(staging)
        if posixpath.basename(f.uri).startswith(graph.PREDICTIONS)
    )
    bad = counts["dead_letter"]["count"]
    summary = {
        "status": "ok",
        "model": resolved.to_dict(),
        "input": config.predict.input,
        "output": config.predict.output,
        "layout": layout,
        "inputs": total,
        **counts,
        "format": config.predict.format,
        "files": files,
        "bad_fraction": round(bad / total, 6) if total else 0.0,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 2) if seconds > 0 else 0.0,
    }
    limit = config.predict.max_bad_fraction
    if summary["bad_fraction"] > limit:
        reasons = ", ".join(f"{r}: {n}" for r, n in counts["dead_letter"]["by_reason"].items())
        summary["status"] = "failed"
        summary["error"] = (
            f"{bad} of {total} inputs were bad ({summary['bad_fraction']:.1%} > predict.max_bad_fraction "
            f"{limit:.1%}; {reasons}); see {storage.join(config.predict.output, 'dead_letter.jsonl')}"
        )
    return summary


def _publish(config: Config, summary: dict[str, Any], staging: str) -> None:
    """Completes the staging folder and moves it into place, replacing the last run's."""
    outputs.publish(staging, config.predict.output, STAGE, to_yaml(config), summary)


def _print_summary(summary: dict[str, Any], final: str) -> None:
    dead = summary["dead_letter"]
    reasons = ", ".join(f"{r} {n}" for r, n in dead["by_reason"].items()) or "none"
    classes = ", ".join(f"{c} {n}" for c, n in summary["per_class"].items()) or "none"
    print(
        f"[{STAGE}] {summary['status']}: {summary['predictions']} predictions ({classes}); dead letters "
        f"{dead['count']} ({reasons}); {summary['seconds']:.1f} s, "
        f"{summary['images_per_second']:.1f} images/s\n"
        f"[{STAGE}] outputs: {final}",
        flush=True,
    )
