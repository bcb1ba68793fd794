"""What each stage's results depend on: the input data's content fingerprint, the
configuration keys of each stage, and the stage keys made of them; and the pure decision
whether a stage may be skipped.

A stage's key is the hash of the previous stage's key (for preprocess, the content fingerprint
of the input images), of the configuration keys the stage depends on (:data:`STAGE_INPUTS`,
the one place that says which) and of the package version. Nothing here imports TensorFlow or
Beam: the Kubernetes driver decides with it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from components.config import Config, resolved_image_size
from components.core import storage
from components.core.errors import ConfigError
from components.core.stamps import code_version
from components.preprocess.sources import MANIFEST_SUFFIXES, OUTSIDE_SOURCE, discover
from pipeline.record import StageEntry

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
        "preprocess.shard_sort_mb",
        "train.backup_every_steps",
        "evaluate.batch_size",
    }
)
# With gate.compare_to_production, evaluate also depends on where the production model is.
CHAMPION_INPUTS = ("registry.uri", "registry.production_alias")


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

    Uses the storage edge's google-cloud-storage client (its credentials and endpoint). The
    checksum is the MD5 GCS keeps, or its CRC32C for composite objects, which have no MD5.
    """
    bucket, _, name = prefix[len("gs://") :].partition("/")
    found = {}
    for blob in storage.gcs_client().list_blobs(bucket, prefix=name):
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
    for stage in STAGE_INPUTS:  # in the order the stages run
        material = {
            "previous": previous,
            "stage": stage,
            "config": config_slice(config, stage),
            "version": version,
        }
        previous = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        keys[stage] = previous
    return keys


def decide(previous: StageEntry | None, key: str, earlier_ran: bool, force: bool) -> tuple[bool, str]:
    """Whether a stage may be skipped, and why (pure; its outputs are checked afterwards).

    Args:
        previous: The stage's entry in the last run.json, or None.
        key: The stage's key now.
        earlier_ran: Whether a stage before it ran in this call.
        force: ``finetune run --force``.
    """
    if force:
        return False, "--force"
    if not previous or not previous.completed:
        status = previous.status if previous else None
        return False, {"failed": "it failed last time", "running": "it was interrupted"}.get(
            status, "no finished run recorded"
        )
    if previous.key != key:
        return False, "its inputs or configuration changed"
    if earlier_ran:
        return False, "an earlier stage ran"
    return True, f"unchanged since {previous.completed}"
