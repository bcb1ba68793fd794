"""Beam runners: the options and the runner object a Beam stage runs with (``preprocess`` and
``predict`` share them). Runs in the driver."""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

# Runners that execute in this process's machine, where TF's file system cannot reach a
# GCS emulator and need not: what they write is staged locally and uploaded.
LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "PrismRunner")


def pipeline_options(
    runner: str, options: dict[str, Any], num_workers: int, temp_location: str
) -> PipelineOptions:
    """The Beam options: the section's ``pipeline_options`` passed through unchanged (they
    win), plus the runner and, for a local runner, its worker count (``num_workers``, 0: one
    in this process) and mode."""
    resolved: dict[str, Any] = {"runner": runner, "temp_location": temp_location}
    if runner in LOCAL_RUNNERS:
        workers = num_workers or 1
        resolved["direct_num_workers"] = workers
        resolved["direct_running_mode"] = "multi_processing" if workers > 1 else "in_memory"
    resolved.update(options)
    return PipelineOptions(flags=[], **resolved)


def runner_instance(runner: str) -> Any:
    """The local DirectRunner is pinned to Beam's FnApiRunner (the one that honours
    ``direct_num_workers``), instead of letting it try to download the Prism runner; None
    lets Beam build any other runner from the options."""
    if runner == "DirectRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None
