"""The push stage: publish the blessed export as the registry's next version, atomically.

``finetune push --config FILE`` reads ``<run_dir>/evaluate/verdict.json`` and
``<run_dir>/export/saved_model/``, and:

1. does nothing (and says so) when the candidate was not blessed, or when a version with the
   same content fingerprint (SHA-256 of every file of the export) is already committed;
2. stages a copy with ``assets.extra/`` completed (metrics, push facts, TF Serving warm-up
   requests) under a non-integer name: ``<name>/_registry/staging/<id>/`` for a local
   registry, a temporary local folder for gs://;
3. loads the staged model and replays its warm-up requests (infra validation);
4. claims the next version number (exactly one racing push wins each number);
5. makes it visible: a local registry renames the staged folder to ``<name>/<version>``
   (one atomic step); on GCS every other file is uploaded first and ``saved_model.pb`` last;
6. writes the commit record the registry checks (a version without one does not count), and
7. with ``registry.promote_to``, moves that alias to the new version (compare-and-swap).

Writes ``<run_dir>/push/summary.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

from components import registry
from components.evaluate import export
from components.push import serving
from pipeline import code_version, outputs, storage, utc_now
from pipeline.config import Config
from pipeline.errors import StageError

STAGE = "push"
PUSH_FILE = "push.json"
METRICS_FILE = "metrics.json"


def say(message: str) -> None:
    print(f"[push] {message}", flush=True)


def run(config: Config) -> dict[str, Any]:
    """Pushes the run's blessed export; returns (and writes) the push summary.

    Raises:
        StageError: no registry.uri, no verdict or export to push, or infra validation failed.
    """
    started = time.perf_counter()
    if not config.registry.uri:
        raise StageError(
            "registry.uri is not set: name a local directory or gs:// prefix, "
            "e.g. --set registry.uri=registry"
        )
    verdict = _read_verdict(config.run_dir)
    if not verdict["blessed"]:
        result = {"pushed": False, "version": None, "reason": f"not blessed: {verdict['reason']}"}
    else:
        result = _push(config, verdict)
    if config.registry.promote_to and result["version"] is not None:
        result["promoted"] = _promote(config, int(result["version"]), result["fingerprint"])
    summary = {
        "status": "ok",
        "registry": config.registry.uri,
        "name": config.name,
        **result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_text(
        storage.join(config.run_dir, STAGE, "summary.json"), json.dumps(summary, indent=2) + "\n"
    )
    say(result["reason"])
    return summary


def _read_verdict(run_dir: str) -> dict[str, Any]:
    path = storage.join(outputs.stage_dir(run_dir, "evaluate"), "verdict.json")
    if not storage.exists(path):
        raise StageError(f"{path} not found; run `finetune evaluate` with this config first")
    return json.loads(storage.read_text(path))


def export_fingerprint(saved_model_dir: str) -> str:
    """SHA-256 over every file of a local SavedModel folder (relative names and bytes)."""
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(saved_model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, saved_model_dir).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def _push(config: Config, verdict: dict[str, Any]) -> dict[str, Any]:
    uri, name = config.registry.uri, config.name
    source = storage.join(config.run_dir, "export", "saved_model")
    if not storage.exists(storage.join(source, export.SAVED_MODEL_PB)):
        raise StageError(
            f"the verdict is blessed but {source} has no saved_model.pb; re-run `finetune evaluate`"
        )
    with _staging(uri, name) as staged:
        storage.copy_tree(source, staged)
        fingerprint = export_fingerprint(staged)
        existing = registry.find_by_fingerprint(uri, name, fingerprint)
        if existing is not None:
            return {
                "pushed": False,
                "version": existing,
                "fingerprint": fingerprint,
                "reason": f"already published as version {existing} of '{name}' (same fingerprint); "
                "nothing to do",
            }
        facts = {
            "fingerprint": fingerprint,
            "source_run": config.run_dir,
            "created": utc_now(),
            "created_by": registry.who(),
            "code_version": code_version(),
        }
        labels = _complete_extra(config, staged, facts)
        say(f"infra validation of the staged model ({len(labels)} classes)")
        infra = serving.validate(staged, labels)
        record = _record(verdict, facts, staged, infra, labels)
        version = registry.claim_version(uri, name, {"who": facts["created_by"], "claimed": utc_now()})
        target = registry.version_uri(uri, name, version)
        _make_visible(staged, target)
    record = registry.commit_version(uri, name, version, record)
    return {
        "pushed": True,
        "version": version,
        "fingerprint": fingerprint,
        "uri": target,
        "infra_validation": infra,
        "created": record["created"],
        "reason": f"published version {version} of '{name}' to {uri}",
    }


@contextlib.contextmanager
def _staging(uri: str, name: str) -> Iterator[str]:
    """A local folder that is not a version: beside the versions for a local registry (so
    the final rename is one atomic step on one file system), else a temporary folder."""
    if storage.is_gcs(uri):
        parent = tempfile.mkdtemp(prefix="finetune-push-")
        path = os.path.join(parent, "saved_model")
    else:
        parent = os.path.join(registry.model_uri(uri, name), registry.META, "staging", uuid.uuid4().hex)
        path = parent
    try:
        yield path
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _complete_extra(config: Config, staged: str, facts: dict[str, Any]) -> list[str]:
    """Adds metrics, the push ``facts`` and warm-up requests to the staged ``assets.extra/``;
    returns the labels."""
    extra = os.path.join(staged, export.EXTRA)
    with open(os.path.join(extra, export.LABELS_FILE), encoding="utf-8") as f:
        labels = f.read().splitlines()
    summary = outputs.read_summary(config.run_dir, "preprocess")
    metrics = storage.join(outputs.stage_dir(config.run_dir, "evaluate"), METRICS_FILE)
    if storage.exists(metrics):
        storage.copy_file(metrics, os.path.join(extra, METRICS_FILE))
    with open(os.path.join(extra, PUSH_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(facts, indent=2) + "\n")
    serving.write_warmup(staged, serving.warmup_requests(config.name, int(summary["image_size"])))
    return labels


def _make_visible(staged: str, target: str) -> None:
    """Local: one rename. Remote: every file but ``saved_model.pb``, then ``saved_model.pb``."""
    if not storage.is_gcs(target):
        os.rename(staged, target)  # fails if the folder exists: the claim says it cannot
        return
    files = sorted(
        os.path.relpath(os.path.join(root, n), staged) for root, _, names in os.walk(staged) for n in names
    )
    files.sort(key=lambda rel: rel == export.SAVED_MODEL_PB)
    for rel in files:
        storage.copy_file(os.path.join(staged, rel), storage.join(target, rel.replace(os.sep, "/")))


def _record(
    verdict: dict[str, Any], facts: dict[str, Any], staged: str, infra: dict[str, Any], labels: list[str]
) -> dict[str, Any]:
    """The commit record: the push facts, labels, data fingerprint, gate numbers, infra check."""
    keys = ("metric", "baseline", "candidate", "delta", "confidence_interval", "test_examples", "reason")
    with open(os.path.join(staged, export.EXTRA, "fingerprint.json"), encoding="utf-8") as f:
        data_fingerprint = json.load(f).get("sha256")
    return {
        **facts,
        "labels": labels,
        "data_fingerprint": data_fingerprint,
        "verdict": {k: verdict.get(k) for k in keys},
        "infra_validation": infra,
    }


def _promote(config: Config, version: int, fingerprint: str) -> dict[str, Any]:
    uri, name, alias = config.registry.uri, config.name, config.registry.promote_to
    move = registry.promote(
        uri, name, alias, version, reason=f"finetune run {config.run_dir} ({fingerprint[:19]})"
    )
    if move is None:
        say(f"'{alias}' already points at version {version}")
        return {"alias": alias, "version": version, "moved": False}
    say(f"'{alias}' moved from version {move.previous} to {version}")
    return {"alias": alias, "version": version, "moved": True, "previous": move.previous}
