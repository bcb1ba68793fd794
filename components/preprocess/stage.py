"""The preprocessing stage's adapter: list inputs, run the Beam graph, publish outputs.

Runs in the driver process (the laptop, or a Kubernetes Job's pod). Everything is written
under a staging directory first and moved to ``<run_dir>/preprocess`` only once complete,
so a reader never sees half a run, and a re-run replaces the previous outputs whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from apache_beam.options.pipeline_options import PipelineOptions

from components.config import Config, resolved_image_size, to_yaml
from components.core import outputs, scratch, storage
from components.core.errors import StageError
from components.preprocess import analysis, progress, runners
from components.preprocess import pipeline as graph
from components.preprocess.download import ensure_source
from components.preprocess.runners import LOCAL_RUNNERS
from components.preprocess.shards import plan_shards
from components.preprocess.sources import Listing, discover, jsonl_chunks
from components.preprocess.splits import SPLITS
from components.preprocess.transforms import available_cpus

STAGE = "preprocess"


def output_dir(config: Config) -> str:
    """``<run_dir>/preprocess``: where this stage's outputs live once published."""
    return storage.join(config.run_dir, STAGE)


def local_workers(config: Config) -> int:
    """Worker processes for the local runner: ``preprocess.num_workers``, or one in-process
    worker when it is 0. The image threads use the cores; Beam's worker processes send every
    element through this driver process over gRPC, which makes them slower than the image
    threads (``benchmarks/bench_preprocess.py`` compares the two)."""
    return config.preprocess.num_workers or 1


def image_threads(config: Config) -> int:
    """``preprocess.image_threads`` for each worker; when 0 and the local runner has several
    worker processes, the CPUs this process may use shared among them (0 otherwise: each
    worker counts its own, ``transforms.default_image_threads``)."""
    threads = config.preprocess.image_threads
    if threads or config.preprocess.runner not in LOCAL_RUNNERS or local_workers(config) == 1:
        return threads
    return max(1, available_cpus() // local_workers(config))


def beam_options(config: Config, temp_location: str) -> PipelineOptions:
    """The Beam options of ``preprocess.runner`` (:func:`runners.pipeline_options`)."""
    p = config.preprocess
    return runners.pipeline_options(p.runner, p.pipeline_options, p.num_workers, temp_location)


def _progress(config: Config, total: int, shards: int) -> contextlib.AbstractContextManager:
    """Progress lines while the pipeline runs, where its steps run in this process (the local
    runner's in-process worker); elsewhere the runner's UI and logs show its counters."""
    if config.preprocess.runner in LOCAL_RUNNERS and local_workers(config) == 1:
        return progress.Reporter(STAGE, total, shards, progress.interval())
    where = "its worker processes' logs" if config.preprocess.runner in LOCAL_RUNNERS else "the runner's UI"
    print(f"[{STAGE}] progress: Beam counters ({', '.join(_COUNTERS)}) in {where}", flush=True)
    return contextlib.nullcontext()


_COUNTERS = ("DecodeAndValidate/decoded", "DecodeAndValidate/rejected", f"{graph.STEP_WRITE}/records_written")


@dataclass(frozen=True)
class _Workspace:
    """Where one run writes before publishing.

    Attributes:
        final: ``<run_dir>/preprocess``, replaced whole at the end.
        staging: A sibling of ``final`` that receives every output first.
        local_tmp: A local scratch directory, removed at the end.
        transform_dir: Where tf.Transform writes its graph: the staging directory, or local
            scratch when a local runner writes to gs:// (TF's own GCS client cannot be pointed
            at an emulator, and need not be: the graph is uploaded through the storage edge).
        tft_temp: tf.Transform's temporary directory (shared storage for remote runners).
        spill_dir: Where the decoded images wait for their shard's writer
            (``components/preprocess/spill.py``): local scratch for the local runner, shared
            storage under the staging directory for remote ones.
    """

    final: str
    staging: str
    local_tmp: str
    transform_dir: str
    tft_temp: str
    spill_dir: str

    @staticmethod
    def create(config: Config) -> _Workspace:
        local_runner = config.preprocess.runner in LOCAL_RUNNERS
        staging = scratch.new_staging(config.run_dir, STAGE)  # and sweeps what killed runs left
        local_tmp = scratch.mkdtemp(STAGE)
        local_graph = local_runner and storage.is_gcs(config.run_dir)
        shared_tmp = storage.join(staging, "tmp")  # what every worker of a remote runner reaches
        return _Workspace(
            final=output_dir(config),
            staging=staging,
            local_tmp=local_tmp,
            transform_dir=os.path.join(local_tmp, "graph") if local_graph else staging,
            tft_temp=storage.join(local_tmp if local_runner else shared_tmp, "tft"),
            spill_dir=storage.join(local_tmp if local_runner else shared_tmp, "spill"),
        )

    def cleanup(self) -> None:
        storage.delete_tree(self.staging)
        shutil.rmtree(self.local_tmp, ignore_errors=True)


def run(config: Config) -> dict[str, Any]:
    """Runs preprocessing for ``config`` and returns the summary written to summary.json.

    Raises:
        ConfigError: when the source cannot be listed.
        StageError: when too many inputs were bad or nothing is left to train on; the dead
            letters and summary.json are still published, the records are not. Also when
            ``data.download`` is needed and an archive cannot be fetched or extracted.
    """
    ensure_source(config)  # fills a missing local data.source from data.download
    started = time.time()
    size = resolved_image_size(config)
    listing = discover(config.data.source, config.data.allowed_roots)
    total = len(listing.candidates)
    print(
        f"[{STAGE}] {total} files in {config.data.source} ({listing.layout}); images -> {size}x{size} "
        f"JPEG; runner {config.preprocess.runner}",
        flush=True,
    )
    outputs.check_owned(output_dir(config), STAGE)  # before any work: never delete a user's file
    work = _Workspace.create(config)
    try:
        _run_beam(config, listing, size, work)
        summary = _summary(config, listing.layout, total, size, work, time.time() - started)
        _publish(config, summary, work)
    finally:
        work.cleanup()
    _print_summary(summary, work.final)
    if summary["status"] != "ok":
        raise StageError(summary["error"])
    return summary


def _run_beam(config: Config, listing: Listing, size: int, work: _Workspace) -> None:
    """Writes the candidate list and runs the Beam graph into the staging directory.

    Empties ``listing.candidates`` once they are written: the pipeline reads them from the
    file, and the driver (the local runner's process too) holds nothing per image while it
    runs (about 330 bytes an image).
    """
    candidates_uri = storage.join(work.staging, "tmp", "candidates.jsonl")
    storage.write_chunks(candidates_uri, jsonl_chunks(listing.candidates))
    split = config.data.split
    fractions = (split.train, split.eval, split.test)
    shards = plan_shards(
        (c.split for c in listing.candidates),
        fractions,
        listing.has_eval,
        size,
        config.preprocess.num_shards,
        config.cluster.workers,
    )
    plan = graph.Plan(
        candidates_uri=candidates_uri,
        output_dir=work.staging,
        spill_dir=work.spill_dir,
        transform_fn_dir=work.transform_dir,
        image_size=size,
        min_image_size=config.preprocess.min_image_size,
        jpeg_quality=config.preprocess.jpeg_quality,
        max_file_bytes=config.preprocess.max_file_mb * 2**20,
        max_decoded_bytes=config.preprocess.max_decoded_mb * 2**20,
        image_threads=image_threads(config),
        shards=shards,
        sort_bytes=config.preprocess.shard_sort_mb * 2**20,
        split_fractions=fractions,
        source_has_eval=listing.has_eval,
    )
    total = len(listing.candidates)
    listing.candidates.clear()
    options = beam_options(config, storage.join(work.staging, "tmp", "beam"))
    print(f"[{STAGE}] TFRecord files: " + ", ".join(f"{s} {n}" for s, n in shards.items()), flush=True)
    with _progress(config, total, sum(shards.values())):
        with tft_beam.Context(temp_dir=work.tft_temp, force_tf_compat_v1=False):
            with beam.Pipeline(
                runner=runners.runner_instance(config.preprocess.runner), options=options
            ) as p:
                graph.build(p, plan)
    if work.transform_dir != work.staging:
        storage.copy_tree(work.transform_dir, work.staging)
    storage.delete_tree(storage.join(work.staging, "tmp"))


def _publish(config: Config, summary: dict[str, Any], work: _Workspace) -> None:
    """Completes the staging directory and moves it into place, replacing the last run.

    A failed run publishes its dead letters and summary only: records and a transform graph
    that must not be used are never left where a trainer would find them.
    """
    if summary["status"] != "ok":
        for name in ("transform_fn", "transformed_metadata", *SPLITS):
            storage.delete_tree(storage.join(work.staging, name))
    outputs.publish(work.staging, work.final, STAGE, to_yaml(config), summary)


def _summary(
    config: Config, layout: str, total: int, size: int, work: _Workspace, seconds: float
) -> dict[str, Any]:
    """summary.json: the pipeline's counts, the vocabulary and statistics, and the verdict."""
    counts_uri = storage.join(work.staging, "counts.json")
    counts = json.loads(storage.read_text(counts_uri))
    storage.delete_tree(counts_uri)
    classes = analysis.read_vocabulary(storage.join(work.staging, "transform_fn"))
    summary = {
        "status": "ok",
        "source": config.data.source,
        "layout": layout,
        "image_size": size,
        "inputs": total,
        "classes": classes,
        "records": counts.pop("records"),
        **counts,
        "image_stats": analysis.image_statistics(work.transform_dir),
        "bad_fraction": round(counts["dead_letter"]["count"] / total, 6) if total else 0.0,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 2) if seconds > 0 else 0.0,
    }
    problem = _problem(config, summary)
    if problem:
        summary["status"], summary["error"] = "failed", problem
        summary["shards"] = {}  # a failed run publishes no records
    return summary


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
