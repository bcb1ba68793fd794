"""The run directory: where each stage's outputs live, and how a stage finds an earlier one's.

Every stage writes under ``<run_dir>/<stage>/`` and marks a finished run with
``summary.json`` (``status: ok``); a later stage reads that summary before anything else.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.errors import StageError


def stage_dir(run_dir: str, stage: str) -> str:
    """``<run_dir>/<stage>``."""
    return storage.join(run_dir, stage)


def read_summary(run_dir: str, stage: str) -> dict[str, Any]:
    """The finished ``stage``'s ``summary.json``.

    Raises:
        StageError: the stage has not run here, or did not succeed; says what to run.
    """
    path = storage.join(stage_dir(run_dir, stage), "summary.json")
    if not storage.exists(path):
        raise StageError(f"{path} not found; run `finetune {stage}` with this config first")
    summary = json.loads(storage.read_text(path))
    if summary.get("status") != "ok":
        raise StageError(f"the {stage} stage did not succeed ({path}: status {summary.get('status')})")
    return summary


def changed_files(folder: str, expected: dict[str, dict[str, Any]]) -> list[str]:
    """The files of ``expected`` (relative path -> ``{"bytes": n, ...}``, as a stage recorded
    them) that are missing under ``folder`` or have another size: one listing, no reads.

    A skip trusts the outputs only when this is empty; the sizes catch a deleted, truncated
    or replaced shard without downloading it (digests are what resumes key on).
    """
    found = {f.uri: f.size for f in storage.list_files(folder)}
    return sorted(
        rel for rel, facts in expected.items() if found.get(storage.join(folder, rel)) != facts["bytes"]
    )
