"""The run directory: where each stage's outputs live, and how a stage finds an earlier one's.

Every stage writes under ``<run_dir>/<stage>/`` and marks a finished run with
``summary.json`` (``status: ok``); a later stage reads that summary before anything else.
A stage replaces only a folder it made: each carries :data:`OWNER_FILE`, naming the stage and,
once it finished, every file it wrote, so a file a user keeps there is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from components.core import scratch, storage
from components.core.errors import ConfigError, StageError


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


# What training leaves for evaluation, under <run_dir>/train.
MODEL_FILES = ("baseline/model.keras", "candidate/model.keras")

# The file that says which stage made a folder, and (once it finished) every file it wrote there.
OWNER_FILE = ".finetune-stage.json"


class FolderNotOwned(ConfigError):
    """A stage was asked to replace a folder holding files it did not write; nothing changed."""


def _relative(folder: str, uri: str) -> str:
    return uri[len(folder.rstrip("/").rstrip(os.sep)) + 1 :].replace(os.sep, "/")


def check_owned(folder: str, stage: str) -> None:
    """Refuses, before any work, to let ``stage`` replace ``folder`` unless every file in it
    is the stage's own: the folder is missing or empty, or its :data:`OWNER_FILE` names
    ``stage`` and lists every file present (an unfinished run's marker lists none: all of
    that folder is the stage's).

    Raises:
        FolderNotOwned: the folder holds a file the stage did not write, or was not made by
            this stage at all; the message names them and says what to do (exit 2).
    """
    present = {_relative(folder, f.uri) for f in storage.list_files(folder, special=True)}
    if not present:
        return
    marker = storage.read_json_object(storage.join(folder, OWNER_FILE))
    if marker is None or marker.get("stage") != stage:
        owner = marker.get("stage") if marker else None
        why = f"it belongs to the {owner} stage" if owner else f"it has no {OWNER_FILE}"
        foreign = sorted(present - {OWNER_FILE})
    else:
        written = marker.get("files")
        foreign = [] if not isinstance(written, dict) else sorted(present - set(written) - {OWNER_FILE})
        why = f"the {stage} stage did not write them"
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FolderNotOwned(
            f"{folder} holds files that the {stage} stage would delete but did not write ({why}): "
            f"{shown}. Move them out of {folder}, or point run_dir at another folder; nothing was changed."
        )


def mark_owned(folder: str, stage: str, sealed: bool = False) -> None:
    """Writes ``folder``'s :data:`OWNER_FILE`: when a stage starts writing there (the folder is
    all its own until it finishes), and ``sealed`` once it has, listing every file present
    with its size."""
    files = None
    if sealed:
        listing = storage.list_files(folder, special=True)
        files = {_relative(folder, f.uri): f.size for f in listing if _relative(folder, f.uri) != OWNER_FILE}
    record = {"stage": stage, "files": files}
    storage.write_text(storage.join(folder, OWNER_FILE), json.dumps(record, indent=2) + "\n")


def publish(staging: str, final: str, stage: str, config_yaml: str, summary: dict[str, Any]) -> None:
    """Completes a staging folder (:func:`components.core.scratch.new_staging`) and moves it
    into place as ``final``, replacing the last run's: writes ``config.yaml`` and
    ``summary.json``, drops the scratch owner file, seals the folder, checks ``final`` is still
    the stage's own (a file may have been put there while it ran) and swaps it in."""
    storage.write_text(storage.join(staging, "config.yaml"), config_yaml)
    storage.write_text(storage.join(staging, "summary.json"), json.dumps(summary, indent=2) + "\n")
    storage.delete_tree(storage.join(staging, scratch.OWNER))
    mark_owned(staging, stage, sealed=True)
    check_owned(final, stage)
    storage.delete_tree(final)
    storage.move_tree(staging, final)


def sealed_files(folder: str) -> dict[str, int] | None:
    """The files (relative path -> bytes) a finished stage recorded in ``folder``, or None
    when it recorded none (unfinished, or written before markers existed)."""
    marker = storage.read_json_object(storage.join(folder, OWNER_FILE))
    files = marker.get("files") if marker else None
    return files if isinstance(files, dict) else None


def intact(folder: str) -> bool:
    """True when ``folder`` was sealed and every file it recorded is there with its size:
    what a skip needs before trusting a finished stage's outputs (one listing, no reads)."""
    files = sealed_files(folder)
    return files is not None and not changed_files(folder, {rel: {"bytes": n} for rel, n in files.items()})


def file_facts(folder: str, rels: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{rel: {"bytes": n, "sha256": hex}}`` for files under ``folder``, each streamed once."""
    facts = {}
    for rel in rels:
        size, digest = storage.sha256(storage.join(folder, rel))
        facts[rel] = {"bytes": size, "sha256": digest}
    return facts


def records_digest(prep_summary: dict[str, Any]) -> str | None:
    """The digest of what training reads from a preprocessing run: its classes, image size and
    the train and eval shards' recorded digests; None when the shards were not recorded.

    Train keys its resume on it and ``finetune run`` its skip, so a model trained on other
    records is never reused."""
    shards = prep_summary.get("shards")
    if shards is None:
        return None
    read = {name: facts for name, facts in shards.items() if name.split("/")[0] in ("train", "eval")}
    material = {"classes": prep_summary["classes"], "image_size": prep_summary["image_size"], "shards": read}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
