"""The push stage: publish the blessed export as the registry's next version, atomically.

``finetune push --config FILE`` reads ``<run_dir>/evaluate/verdict.json`` and
``<run_dir>/export/saved_model/``, and:

1. does nothing (and says so) when the candidate was not blessed, or when a complete version
   with the same content fingerprint (SHA-256 of every file of the export) exists;
2. stages a copy with ``assets.extra/`` completed (metrics, push facts, TF Serving warm-up
   requests) under a non-integer name: ``<name>/_registry/staging/<time>-<id>/`` for a local
   registry, a temporary local folder for gs://;
3. takes the export's fingerprint claim, so that of two pushes of one export one publishes
   and the other waits for it (at most ``FINGERPRINT_WAIT_S``) and then reports its version;
4. loads the staged model and replays its warm-up requests (infra validation);
5. claims the next version number (exactly one racing push wins each number), recording the
   SHA-256 of every staged file and the commit record to be;
6. on GCS uploads every file but ``saved_model.pb`` to ``<name>/<version>/`` and
   ``saved_model.pb`` to ``<name>/_registry/staging/<id>/``;
7. writes the commit record, and only then
8. makes the version loadable: a local registry renames the staged folder to ``<name>/<version>``
   (one atomic step); on GCS ``saved_model.pb`` is uploaded last;
9. with ``registry.promote_to``, moves that alias to the new version (compare-and-swap).

TF Serving loads a folder once it holds ``saved_model.pb``, so it never sees an uncommitted
version. A push killed between steps 6 and 8 leaves a committed version without
``saved_model.pb``, which no alias can point at and which ``finetune registry fsck`` completes
from the claim's digests (see :mod:`components.registry_maintenance`).

Writes ``<run_dir>/push/summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from components import registry
from components import registry_maintenance as maintenance
from components.config import Config
from components.core import outputs, scratch, storage
from components.core.errors import StageError
from components.core.stamps import code_version, utc_now
from components.evaluate import export
from components.evaluate.output import Verdict
from components.preprocess.output import PreprocessOutput
from components.push import serving

STAGE = "push"
PUSH_FILE = "push.json"
METRICS_FILE = "metrics.json"
FINGERPRINT_WAIT_S = 600.0  # how long a push waits for another push of the same export
FINGERPRINT_POLL_S = 1.0


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
    verdict = Verdict.read(config.run_dir)
    if not verdict.blessed:
        result = {"pushed": False, "version": None, "reason": f"not blessed: {verdict.reason}"}
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


def _push(config: Config, verdict: Verdict) -> dict[str, Any]:
    uri, name = config.registry.uri, config.name
    source = storage.join(config.run_dir, "export", "saved_model")
    if not storage.exists(storage.join(source, export.SAVED_MODEL_PB)):
        raise StageError(
            f"the verdict is blessed but {source} has no saved_model.pb; re-run `finetune evaluate`"
        )
    with _staging(uri, name) as (staged, staging_id):
        storage.copy_tree(source, staged)
        fingerprint = export.content_fingerprint(staged)  # what evaluate recorded in the verdict
        existing = _take_fingerprint(uri, name, fingerprint, staging_id)
        if existing is not None:
            return {
                "pushed": False,
                "version": existing,
                "fingerprint": fingerprint,
                "reason": f"already published as version {existing} of '{name}' (same fingerprint); "
                "nothing to do",
            }
        try:
            return _publish(config, verdict, staged, staging_id, fingerprint)
        finally:
            maintenance.release_fingerprint(uri, name, fingerprint)


def _take_fingerprint(uri: str, name: str, fingerprint: str, staging_id: str) -> int | None:
    """Takes the export's fingerprint claim and returns None, or returns the complete version
    that holds this export already, waiting while another push holds the claim.

    Raises:
        StageError: the claim was still held after ``FINGERPRINT_WAIT_S`` seconds.
    """
    deadline, waiting = time.monotonic() + FINGERPRINT_WAIT_S, False
    while (existing := registry.find_by_fingerprint(uri, name, fingerprint)) is None:
        claim = {"who": registry.who(), "claimed": utc_now(), "staging": staging_id}
        holder = maintenance.hold_fingerprint(uri, name, fingerprint, claim)
        if holder is None:  # ours; a push that released it just now may have published it
            existing = registry.find_by_fingerprint(uri, name, fingerprint)
            if existing is not None:
                maintenance.release_fingerprint(uri, name, fingerprint)
            return existing
        if time.monotonic() >= deadline:
            raise StageError(
                f"another push of this export ({holder.get('who', '?')}, since {holder.get('claimed', '?')}) "
                f"still holds {maintenance.fingerprint_uri(uri, name, fingerprint)} after "
                f"{FINGERPRINT_WAIT_S:.0f} s. If no push of it is running it was killed: run "
                f"`finetune registry fsck {name}` and `finetune registry gc {name}` (or delete that file)"
            )
        if not waiting:
            say(f"waiting: {holder.get('who', 'another push')} is pushing this same export")
            waiting = True
        time.sleep(FINGERPRINT_POLL_S)
    return existing


def _publish(
    config: Config, verdict: Verdict, staged: str, staging_id: str, fingerprint: str
) -> dict[str, Any]:
    """Steps 4-8 of the module docstring, while holding the export's fingerprint claim."""
    uri, name = config.registry.uri, config.name
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
    record = _record(verdict.data, facts, staged, infra, labels)
    claim = {"who": facts["created_by"], "claimed": utc_now(), "fingerprint": fingerprint}
    claim |= {"staging": staging_id, "files": _digests(staged), "record": record}
    version = registry.claim_version(uri, name, claim)
    target = registry.version_uri(uri, name, version)
    remote_staging = maintenance.staging_uri(uri, name, staging_id)
    if storage.is_gcs(uri):
        _upload_all_but_the_graph(staged, target, remote_staging)
    record = registry.commit_version(uri, name, version, record)
    _make_loadable(staged, target)
    if storage.is_gcs(uri):  # on failure it stays for fsck
        storage.delete_file(storage.join(remote_staging, export.SAVED_MODEL_PB))
    return {
        "pushed": True,
        "version": version,
        "fingerprint": fingerprint,
        "uri": target,
        "infra_validation": infra,
        "created": record["created"],
        "reason": f"published version {version} of '{name}' to {uri}",
    }


def _digests(folder: str) -> dict[str, str]:
    """``{relative name: SHA-256}`` of every file of a local folder (``fsck`` checks them)."""
    return {
        os.path.relpath(info.uri, folder).replace(os.sep, "/"): storage.sha256(info.uri)[1]
        for info in storage.list_files(folder)
    }


@contextlib.contextmanager
def _staging(uri: str, name: str) -> Iterator[tuple[str, str]]:
    """``(local folder, staging id)``: the folder is not a version. For a local registry it is
    ``staging/<id>`` beside the versions (so the final rename is one atomic step on one file
    system); for gs:// a temporary folder (``staging/<id>/`` in the registry then gets only
    ``saved_model.pb``). The local folder is removed on the way out."""
    staging_id = maintenance.new_staging_id()
    remote = maintenance.staging_uri(uri, name, staging_id)
    if storage.is_gcs(uri):
        parent = scratch.mkdtemp("push")
        path = os.path.join(parent, "saved_model")
    else:
        parent = path = remote
    try:
        yield path, staging_id
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _complete_extra(config: Config, staged: str, facts: dict[str, Any]) -> list[str]:
    """Adds metrics, the push ``facts`` and warm-up requests to the staged ``assets.extra/``;
    returns the labels."""
    extra = os.path.join(staged, export.EXTRA)
    with open(os.path.join(extra, export.LABELS_FILE), encoding="utf-8") as f:
        labels = f.read().splitlines()
    image_size = PreprocessOutput.read(config.run_dir).image_size
    metrics = storage.join(outputs.stage_dir(config.run_dir, "evaluate"), METRICS_FILE)
    if storage.exists(metrics):
        storage.copy_file(metrics, os.path.join(extra, METRICS_FILE))
    with open(os.path.join(extra, PUSH_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(facts, indent=2) + "\n")
    serving.write_warmup(staged, serving.warmup_requests(config.name, image_size))
    return labels


def _upload_all_but_the_graph(staged: str, target: str, staging: str) -> None:
    """GCS, before the commit: every file but ``saved_model.pb`` to the version folder (TF
    Serving loads nothing there yet), ``saved_model.pb`` to the registry's staging folder
    (so that ``fsck`` can finish the version if this process dies)."""
    for root, _, names in os.walk(staged):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), staged).replace(os.sep, "/")
            where = staging if rel == export.SAVED_MODEL_PB else target
            storage.copy_file(os.path.join(root, n), storage.join(where, rel))


def _make_loadable(staged: str, target: str) -> None:
    """After the commit. Local: one rename of the staged folder. GCS: ``saved_model.pb``."""
    if storage.is_gcs(target):
        graph = export.SAVED_MODEL_PB
        storage.copy_file(os.path.join(staged, graph), storage.join(target, graph))
        return
    os.rename(staged, target)  # fails if the folder exists: the claim says it cannot


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
