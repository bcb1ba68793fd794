"""``finetune run``: every stage in order, in this process, skipping the ones that are up to date.

preprocess -> train -> evaluate (gate + export) -> push. Each stage has a key: the hash of the
previous stage's key (for preprocess, the content fingerprint of the input images), of the
configuration keys the stage depends on (:data:`STAGE_INPUTS`, the one place that says which)
and of the package version. A stage is skipped when ``<run_dir>/run.json`` says it finished
with the same key, its outputs are still there, and no stage before it ran in this call (a
stage that ran rewrote what the later ones read); ``force`` runs everything.

``run.json`` is rewritten atomically (through the storage edge) at every stage transition, so
a run killed mid-stage leaves a truthful record (that stage ``running``) and the next call
resumes after the last stage that finished. Push runs only with ``registry.uri`` set; it also
runs when the candidate is not blessed, and then records why nothing was pushed.

Runs in one process (a laptop, or one pod); in a cluster, run the stages as separate Jobs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from components.config import Config, resolved_image_size
from components.core import outputs, storage
from components.core.errors import ConfigError, FinetuneError, StageError
from components.core.stamps import code_version, utc_now
from components.preprocess.download import ensure_source
from components.preprocess.sources import MANIFEST_SUFFIXES, OUTSIDE_SOURCE, discover

RUN_FILE = "run.json"
NO_REGISTRY = "registry.uri is not set"
MISSING = "missing"  # the checksum of a file a manifest lists but that does not exist

# Which configuration keys change each stage's results: a dotted key, or a section meaning every
# key in it (so a key added to a section later makes the stage re-run rather than go unnoticed).
# ``name`` is the Keras model's name, saved with it. run_dir and data.source are in no stage:
# the content of the data decides (see input_fingerprint), not where it lies.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "preprocess": ("data.split", "model.image_size", "preprocess"),
    "train": ("name", "model", "train"),
    "evaluate": ("evaluate", "gate", "export"),
    "push": ("registry.uri", "registry.promote_to"),
}
# Keys in those sections that change how a stage runs, never what it writes.
EXECUTION_ONLY = frozenset(
    {
        "preprocess.runner",
        "preprocess.pipeline_options",
        "preprocess.num_workers",
        "preprocess.image_threads",
        "train.backup_every_steps",
        "evaluate.batch_size",
    }
)
# With gate.compare_to_production, evaluate also depends on where the production model is.
CHAMPION_INPUTS = ("registry.uri", "registry.production_alias")


@dataclass(frozen=True)
class Stage:
    """One step of the run: its name, the module whose ``run(config)`` does it, and a check
    that returns the facts of its finished outputs (None when they are gone or unusable)."""

    name: str
    module: str
    finished: Callable[[Config], dict[str, Any] | None]


def _summary_outputs(config: Config, stage: str, *required: str) -> dict[str, Any] | None:
    """``<run_dir>/<stage>/summary.json`` with status ok, and the ``required`` files beside it."""
    try:
        summary = outputs.read_summary(config.run_dir, stage)
    except (StageError, ValueError):
        return None
    folder = outputs.stage_dir(config.run_dir, stage)
    if not all(storage.exists(storage.join(folder, path)) for path in required):
        return None
    if not _consistent(config, stage, folder, summary):
        return None
    facts = {"dir": folder, "summary": storage.join(folder, "summary.json")}
    keep = ("records", "pushed", "version", "reason")
    return facts | {k: summary[k] for k in keep if k in summary}


def _consistent(config: Config, stage: str, folder: str, summary: dict[str, Any]) -> bool:
    """Whether a finished stage's outputs are still the ones it recorded, made from the
    inputs that are there now: preprocess's shards (sizes), train's models (sizes) and the
    records they were trained on (digest), the export push published (fingerprint)."""
    if stage == "preprocess":
        shards = summary.get("shards")
        return shards is not None and not outputs.changed_files(folder, shards)
    if stage == "train":
        models = summary.get("models")
        try:
            records = outputs.records_digest(outputs.read_summary(config.run_dir, "preprocess"))
        except (StageError, ValueError):
            return False
        same_records = records is not None and summary.get("inputs_sha256") == records
        return same_records and models is not None and not outputs.changed_files(folder, models)
    if stage == "push":
        verdict = _read_verdict(config)
        blessed_export = (verdict or {}).get("export") or {}
        return summary.get("fingerprint") == blessed_export.get("fingerprint")
    return True


def _read_verdict(config: Config) -> dict[str, Any] | None:
    path = storage.join(outputs.stage_dir(config.run_dir, "evaluate"), "verdict.json")
    try:
        verdict = json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


def _evaluate_outputs(config: Config) -> dict[str, Any] | None:
    """The verdict, and the export when it blessed the candidate: only while the models it
    judged are the ones training left (digests) and the export is as it was written."""
    folder = outputs.stage_dir(config.run_dir, "evaluate")
    path = storage.join(folder, "verdict.json")
    saved_model = storage.join(config.run_dir, "export", "saved_model")
    verdict = _read_verdict(config)
    if verdict is None:
        return None
    try:
        outputs.read_summary(config.run_dir, "train")
        trained = outputs.file_facts(outputs.stage_dir(config.run_dir, "train"), outputs.MODEL_FILES)
    except (StageError, ValueError, FileNotFoundError):
        return None
    if verdict.get("models") != trained:
        return None  # judged other models (train ran again since, or a model was replaced)
    if verdict.get("blessed") and not outputs.intact(storage.join(config.run_dir, "export")):
        return None
    facts = {"dir": folder, "verdict": path, "blessed": bool(verdict.get("blessed"))}
    facts |= {"reason": verdict.get("reason", ""), "report": storage.join(config.run_dir, "report.html")}
    return facts | ({"export": saved_model} if facts["blessed"] else {})


STAGES = (
    Stage("preprocess", "components.preprocess.stage", lambda c: _summary_outputs(c, "preprocess")),
    Stage(
        "train",
        "components.train.stage",
        lambda c: _summary_outputs(c, "train", "baseline/model.keras", "candidate/model.keras"),
    ),
    Stage("evaluate", "components.evaluate.stage", _evaluate_outputs),
    Stage("push", "components.push.stage", lambda c: _summary_outputs(c, "push")),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def input_fingerprint(config: Config) -> str:
    """The content fingerprint of ``data.source``: the same images give the same value
    wherever they lie.

    Hashes each file's name relative to the source, its size and its checksum: SHA-256 of
    local files (each read once, on 8 threads), the MD5 (or CRC32C) from one
    google-cloud-storage listing for gs://, so no object is downloaded. A CSV/JSONL
    manifest contributes its own bytes and the files it lists (a listed file that does not
    exist counts as ``missing``). Runs in the driver.

    Raises:
        ConfigError: the source holds no files, or the manifest does not exist.
    """
    source = config.data.source
    if source.lower().endswith(MANIFEST_SUFFIXES):
        entries = _manifest_entries(source, config.data.allowed_roots)
    else:
        entries = _folder_entries(source)
    digest = hashlib.sha256(b"finetune-inputs-v1\n")
    for entry in sorted(entries):
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()


def _folder_entries(source: str) -> list[tuple[str, int, str]]:
    """(name relative to ``source``, size, checksum) of every file under a folder or prefix."""
    base = source.rstrip("/") + "/" if storage.is_gcs(source) else os.path.join(source, "")
    if storage.is_gcs(source):
        found = _gcs_checksums(base)
    else:
        found = _local_checksums([f.uri for f in storage.list_files(source)])
    if not found:
        raise ConfigError(f"data.source: no files under {source}")
    return [(uri[len(base) :].replace(os.sep, "/"), *found[uri]) for uri in found]


def _manifest_entries(source: str, allowed_roots: list[str]) -> list[tuple[str, int, str]]:
    """The manifest's bytes, under its suffix only, and every file it lists (found by the
    preprocessing stage's own ``discover``, which resolves relative paths); a listed file
    outside the allowed roots counts by its name only, never read."""
    try:
        data = storage.read_bytes(source)
    except FileNotFoundError:
        raise ConfigError(f"data.source: manifest not found: {source}") from None
    base = source.rsplit("/", 1)[0] + "/" if "/" in source else ""
    candidates = [c for c in discover(source, allowed_roots).candidates if not c.uri.startswith(source + "#")]
    outside = {c.uri for c in candidates if c.problem == OUTSIDE_SOURCE}
    listed = sorted({c.uri for c in candidates})
    local = _local_checksums([u for u in listed if not storage.is_gcs(u) and u not in outside])
    local |= {u: (-1, OUTSIDE_SOURCE) for u in outside}
    found = local | _gcs_listed_checksums([u for u in listed if storage.is_gcs(u) and u not in outside])
    suffix = "manifest" + os.path.splitext(source)[1].lower()
    entries = [(suffix, len(data), "sha256:" + hashlib.sha256(data).hexdigest())]
    return entries + [(u[len(base) :] if base and u.startswith(base) else u, *found[u]) for u in listed]


def _local_checksums(paths: Iterable[str]) -> dict[str, tuple[int, str]]:
    """path -> (size, ``sha256:<hex>``), or (-1, ``missing``); files are streamed in chunks
    (never held whole) on 8 threads (hashlib releases the GIL), through the storage edge."""

    def one(path: str) -> tuple[int, str]:
        try:
            size, digest = storage.sha256(path)
        except FileNotFoundError:
            return -1, MISSING
        except storage.NotAFile as e:  # a FIFO or a device: a dead letter, never read
            return -1, e.kind
        return size, "sha256:" + digest

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


def _gcs_checksums(prefix: str) -> dict[str, tuple[int, str]]:
    """gs:// uri -> (size, checksum) of every object under ``prefix``, from one listing.

    Uses the client Beam's GcsIO builds (the storage edge's credentials and endpoint). The
    checksum is the MD5 GCS keeps, or its CRC32C for composite objects, which have no MD5.
    """
    from apache_beam.io.gcp.gcsio import GcsIO

    bucket, _, name = prefix[len("gs://") :].partition("/")
    found = {}
    for blob in GcsIO().client.list_blobs(bucket, prefix=name):
        if not blob.name.endswith("/"):  # folder placeholders are not files
            checksum = f"md5:{blob.md5_hash}" if blob.md5_hash else f"crc32c:{blob.crc32c}"
            found[f"gs://{bucket}/{blob.name}"] = (int(blob.size), checksum)
    return found


def _gcs_listed_checksums(uris: list[str]) -> dict[str, tuple[int, str]]:
    """Checksums of the gs:// files a manifest lists: one listing per bucket, of the longest
    folder that holds them all; a file not found is ``missing``."""
    found: dict[str, tuple[int, str]] = {}
    for bucket in sorted({u[len("gs://") :].split("/", 1)[0] for u in uris}):
        mine = [u for u in uris if u.startswith(f"gs://{bucket}/")]
        common = os.path.commonprefix(mine)
        found |= _gcs_checksums(common[: common.rfind("/") + 1])
    return {u: found.get(u, (-1, MISSING)) for u in uris}


def config_slice(config: Config, stage: str) -> dict[str, Any]:
    """The dotted keys and values of the configuration that ``stage`` depends on
    (STAGE_INPUTS without EXECUTION_ONLY); ``model.image_size`` is the resolved size."""
    keys = STAGE_INPUTS[stage]
    if stage == "evaluate" and config.gate.compare_to_production:
        keys += CHAMPION_INPUTS
    values: dict[str, Any] = {}
    for key in keys:
        values |= _flatten(key, functools.reduce(getattr, key.split("."), config))
    if "model.image_size" in values:
        values["model.image_size"] = resolved_image_size(config)
    return {k: v for k, v in values.items() if k not in EXECUTION_ONLY}


def _flatten(key: str, value: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(value):
        return {key: value}
    return {
        k: v
        for f in dataclasses.fields(value)
        for k, v in _flatten(f"{key}.{f.name}", getattr(value, f.name)).items()
    }


def stage_keys(config: Config, fingerprint: str) -> dict[str, str]:
    """Each stage's key: hash(previous key, its configuration slice, the package version);
    the input data's fingerprint comes before preprocess."""
    keys, previous, version = {}, fingerprint, code_version()
    for stage in STAGES:
        material = {
            "previous": previous,
            "stage": stage.name,
            "config": config_slice(config, stage.name),
            "version": version,
        }
        previous = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        keys[stage.name] = previous
    return keys


def decide(previous: dict[str, Any] | None, key: str, earlier_ran: bool, force: bool) -> tuple[bool, str]:
    """Whether a stage may be skipped, and why (pure; its outputs are checked afterwards).

    Args:
        previous: The stage's entry in the last run.json, or None.
        key: The stage's key now.
        earlier_ran: Whether a stage before it ran in this call.
        force: ``finetune run --force``.
    """
    if force:
        return False, "--force"
    if not previous or not previous.get("completed"):
        status = (previous or {}).get("status")
        return False, {"failed": "it failed last time", "running": "it was interrupted"}.get(
            status, "no finished run recorded"
        )
    if previous.get("key") != key:
        return False, "its inputs or configuration changed"
    if earlier_ran:
        return False, "an earlier stage ran"
    return True, f"unchanged since {previous['completed']}"


def _say(message: str) -> None:
    print(f"[run] {message}", flush=True)


def write_record(config: Config, record: dict[str, Any]) -> None:
    """Rewrites ``<run_dir>/run.json`` (atomically, through the storage edge)."""
    storage.write_text(storage.join(config.run_dir, RUN_FILE), json.dumps(record, indent=2) + "\n")


def mark_done(config: Config, entry: dict[str, Any], stage: str, seconds: float, answer: Any = None) -> None:
    """Records a stage that finished: ok, its seconds, and the facts of its outputs (plus
    what the stage's own ``answer`` says that its files do not, for evaluate and push)."""
    facts = STAGE_BY_NAME[stage].finished(config) or {"dir": outputs.stage_dir(config.run_dir, stage)}
    if isinstance(answer, dict):
        facts |= {
            k: answer[k] for k in ("blessed", "reason", "pushed", "version") if k in answer and k not in facts
        }
    entry.update(status="ok", seconds=round(seconds, 3), completed=utc_now(), outputs=facts)


def failed_run(
    config: Config, record: dict[str, Any], stage: str, error: str, seconds: float, resume: str
) -> StageError:
    """Records the run as failed at ``stage`` after ``seconds`` and returns the StageError
    that names it, the outputs kept and how to resume (``resume``: "re-run", "submit again")."""
    kept = [n for n, e in record["stages"].items() if e["status"] in ("ok", "skipped") and e.get("completed")]
    error = f"stage '{stage}' failed: {error}"
    record.update(status="failed", finished=utc_now(), seconds=round(seconds, 3), error=error)
    write_record(config, record)
    kept_text = f"outputs of {', '.join(kept)} are kept; " if kept else ""
    return StageError(f"{error}; {kept_text}{resume} to resume from {stage}")


def read_record(run_dir: str) -> dict[str, Any] | None:
    """The last ``<run_dir>/run.json``, or None when there is none (or it cannot be read)."""
    path = storage.join(run_dir, RUN_FILE)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except ValueError as e:
        _say(f"ignoring {path}: not valid JSON ({e}); every stage will run")
        return None


def run(config: Config, force: bool = False) -> dict[str, Any]:
    """Runs preprocess, train, evaluate and push for ``config``, skipping what is up to date.

    Args:
        config: The validated configuration.
        force: Run every stage, up to date or not.

    Returns:
        The record written to ``<run_dir>/run.json``.

    Raises:
        ConfigError: the source holds no files, or TF_CONFIG names several workers.
        StageError: a stage failed: names it and says which earlier outputs are kept.
    """
    _check_one_process()
    clock = time.perf_counter()
    ensure_source(config)  # a missing local data.source is filled from data.download first
    fingerprint = input_fingerprint(config)
    _say(f"input data fingerprint {fingerprint[:12]} ({time.perf_counter() - clock:.2f} s)")
    keys = stage_keys(config, fingerprint)
    last = (read_record(config.run_dir) or {}).get("stages", {})
    record: dict[str, Any] = {
        "status": "running",
        "started": utc_now(),
        "finished": None,
        "seconds": None,
        "force": force,
        "input_fingerprint": fingerprint,
        "version": code_version(),
        "stages": {s.name: {"status": "pending", "key": keys[s.name]} for s in STAGES},
    }
    write_record(config, record)
    earlier_ran = False
    for number, stage in enumerate(STAGES, start=1):
        label, entry = f"{number}/{len(STAGES)} {stage.name}", record["stages"][stage.name]
        skip, why = decide(last.get(stage.name), keys[stage.name], earlier_ran, force)
        facts = stage.finished(config) if skip else None
        if stage.name == "push" and not config.registry.uri:
            entry.update(status="skipped", started=utc_now(), seconds=0.0, reason=NO_REGISTRY, outputs={})
            _say(f"{label}: skipped ({NO_REGISTRY})")
        elif facts is not None:
            completed = last[stage.name]["completed"]
            entry.update(status="skipped", started=utc_now(), seconds=0.0, reason=why, completed=completed)
            entry["outputs"] = facts
            _say(f"{label}: {why}, skipped")
        else:
            error = _execute(config, record, stage, label, "its outputs are gone" if skip else why)
            if error is not None:
                _fail(config, record, stage.name, error, clock)
            earlier_ran = True
        write_record(config, record)
    record.update(status="ok", finished=utc_now(), seconds=round(time.perf_counter() - clock, 3))
    write_record(config, record)
    _report(config, record)
    return record


def _check_one_process() -> None:
    from components.train import distribute

    if distribute.parse_tf_config().num_workers > 1:
        raise ConfigError(
            "TF_CONFIG names several workers, but `finetune run` runs every stage in this one "
            "process; run the stages as separate Jobs instead (`finetune train` on each worker)"
        )


def _execute(config: Config, record: dict[str, Any], stage: Stage, label: str, why: str) -> Exception | None:
    """Runs one stage in this process and records it; returns its exception, if it raised."""
    entry = record["stages"][stage.name]
    entry.update(status="running", started=utc_now(), seconds=None, reason=why)
    write_record(config, record)
    _say(f"{label}: running ({why})")
    clock = time.perf_counter()
    try:
        result = importlib.import_module(stage.module).run(config)
    except Exception as exc:
        entry.update(status="failed", seconds=round(time.perf_counter() - clock, 3), error=str(exc))
        if not isinstance(exc, FinetuneError):  # unexpected: say what it was, keep where
            entry.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=-20))
        _say(f"{label}: failed after {entry['seconds']:.1f} s: {entry['error']}")
        return exc
    mark_done(config, entry, stage.name, time.perf_counter() - clock, result)
    _say(f"{label}: done in {entry['seconds']:.1f} s")
    return None


def _fail(config: Config, record: dict[str, Any], stage: str, exc: Exception, clock: float) -> NoReturn:
    """Records the failed run and raises the StageError that names the stage."""
    error = record["stages"][stage]["error"]
    raise failed_run(config, record, stage, error, time.perf_counter() - clock, "re-run") from exc


def _report(config: Config, record: dict[str, Any]) -> None:
    """The end of the run on stdout: the verdict, the registry version and the report."""
    verdict, push = record["stages"]["evaluate"]["outputs"], record["stages"]["push"]
    _say(
        ("verdict: BLESSED: " if verdict.get("blessed") else "verdict: NOT BLESSED: ")
        + verdict.get("reason", "")
    )
    pushed = push.get("outputs", {})
    if pushed.get("version") is not None:
        where = f"'{config.name}' in {config.registry.uri}"
        _say(f"registry: version {pushed['version']} of {where} ({pushed.get('reason', '')})")
    else:
        _say(f"registry: no version ({pushed.get('reason') or push.get('reason', '')})")
    _say(f"report: {verdict.get('report', storage.join(config.run_dir, 'report.html'))}")
    _say(f"record: {storage.join(config.run_dir, RUN_FILE)} ({record['seconds']:.1f} s)")
