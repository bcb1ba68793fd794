"""What each stage's results depend on: the input data's content fingerprint, the
configuration keys of each stage, and the stage keys made of them; and the pure decision
whether a stage may be skipped.

A stage's key is the hash of the previous stage's key (for preprocess, the content fingerprint
of the input images, kept cheap for unchanged local files by a stat cache in the run
directory), of the configuration keys the stage depends on (:data:`STAGE_INPUTS`,
the one place that says which) and of the package version. Nothing here imports TensorFlow or
Beam: the Kubernetes driver decides with it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
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
# With preprocess.num_shards 0, the train split has at least one file per training worker.
AUTO_SHARD_INPUTS = ("cluster.workers",)


# The stat cache of the input's local files, under the run directory (trusted): a file whose
# storage.signature is the one recorded keeps its recorded checksum, unread (as git's index).
FINGERPRINT_CACHE = ("cache", "fingerprint.json")
CACHE_FORMAT = "finetune-stat-cache-v1"
# A file modified this close before the scan started (or later) is never recorded: written in
# the same instant as a change still to come, it could change again and keep its mtime.
RACY_NS = 2_000_000_000
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class InputFingerprint:
    """The input data's fingerprint (:func:`scan_inputs`) and what computing it cost.

    Attributes:
        value: The fingerprint, hex SHA-256: the same with or without a stat cache.
        hashed: Local files read and hashed.
        cached: Local files whose checksum came from the stat cache, not read.
        listed: gs:// objects whose checksum came from a listing.
    """

    value: str
    hashed: int = 0
    cached: int = 0
    listed: int = 0

    def describe(self) -> str:
        """``"3 files hashed, 1297 from the cache"``, and the gs:// listing's count if any."""
        text = f"{self.hashed} files hashed, {self.cached} from the cache"
        return text + (f", {self.listed} from the gs:// listing" if self.listed else "")


def fingerprint_cache(run_dir: str) -> str:
    """``<run_dir>/cache/fingerprint.json``: where ``finetune run`` keeps the stat cache."""
    return storage.join(run_dir, *FINGERPRINT_CACHE)


def input_fingerprint(config: Config, cache_uri: str | None = None) -> str:
    """The content fingerprint of ``data.source`` (see :func:`scan_inputs`)."""
    return scan_inputs(config, cache_uri).value


def scan_inputs(config: Config, cache_uri: str | None = None) -> InputFingerprint:
    """The content fingerprint of ``data.source``: the same images give the same value
    wherever they lie; and how many files were read for it.

    Hashes each file's name relative to the source, its size and its checksum: SHA-256 of
    local files (each read once, on 8 threads), the MD5 (or CRC32C) from one
    google-cloud-storage listing for gs://, so no object is downloaded. A CSV/JSONL
    manifest contributes its own bytes and the files it lists (a listed file that does not
    exist counts as ``missing``). Runs in the driver.

    Args:
        config: The configuration (``data.source``, ``data.allowed_roots``).
        cache_uri: A stat cache (:func:`fingerprint_cache`): a local file whose size, mtime,
            ctime, inode and device are the ones recorded there keeps its recorded checksum,
            unread; rewritten atomically when this scan's differ. A missing, unreadable or
            malformed cache only costs a full hash. None: hash every local file.

    Raises:
        ConfigError: the source holds no files, or the manifest does not exist.
    """
    source, cache = config.data.source, _StatCache(cache_uri)
    if source.lower().endswith(MANIFEST_SUFFIXES):
        entries = _manifest_entries(source, config.data.allowed_roots, cache)
    else:
        entries = _folder_entries(source, cache)
    cache.save()
    digest = hashlib.sha256(b"finetune-inputs-v1\n")
    for entry in sorted(entries):
        digest.update(json.dumps(entry).encode() + b"\n")
    return InputFingerprint(digest.hexdigest(), cache.hashed, cache.cached, cache.listed)


def _folder_entries(source: str, cache: _StatCache) -> list[tuple[str, int, str]]:
    """(name relative to ``source``, size, checksum) of every file under a folder or prefix."""
    base = source.rstrip("/") + "/" if storage.is_gcs(source) else os.path.join(source, "")
    if storage.is_gcs(source):
        found = _gcs_checksums(base)
        cache.listed += len(found)
    else:
        found = cache.checksums([f.uri for f in storage.list_files(source)])
    if not found:
        raise ConfigError(f"data.source: no files under {source}")
    return [(uri[len(base) :].replace(os.sep, "/"), *found[uri]) for uri in found]


def _manifest_entries(source: str, allowed_roots: list[str], cache: _StatCache) -> list[tuple[str, int, str]]:
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
    local = cache.checksums([u for u in listed if not storage.is_gcs(u) and u not in outside])
    local |= {u: (-1, OUTSIDE_SOURCE) for u in outside}
    remote = [u for u in listed if storage.is_gcs(u) and u not in outside]
    cache.listed += len(remote)
    found = local | _gcs_listed_checksums(remote)
    suffix = "manifest" + os.path.splitext(source)[1].lower()
    entries = [(suffix, len(data), "sha256:" + hashlib.sha256(data).hexdigest())]
    return entries + [(u[len(base) :] if base and u.startswith(base) else u, *found[u]) for u in listed]


def _checksum(path: str) -> tuple[int, str]:
    """(size, ``sha256:<hex>``) of a local file, streamed in chunks (never held whole)
    through the storage edge; (-1, ``missing``) or (-1, its kind) for a FIFO or a device,
    never read (a dead letter)."""
    try:
        size, digest = storage.sha256(path)
    except FileNotFoundError:
        return -1, MISSING
    except storage.NotAFile as e:
        return -1, e.kind
    return size, "sha256:" + digest


class _StatCache:
    """The checksums of the local files of one scan: taken from the last scan's record when a
    file's :func:`storage.signature` is unchanged, else read (and recorded unless racy).

    The record lies in the trusted run directory, yet anything unexpected in it (missing,
    unreadable, not JSON, another format, a malformed entry) only costs a full hash. It holds
    only the files of the last scan that had local files, keyed by absolute path.
    """

    def __init__(self, uri: str | None):
        self.uri, self.started_ns = uri, time.time_ns()
        self.old: dict[str, Any] | None = None  # read on first use
        self.new: dict[str, list[Any]] = {}
        self.hashed = self.cached = self.listed = 0

    def _load(self) -> dict[str, Any]:
        if self.uri is None:
            return {}
        try:
            data = storage.read_json_object(self.uri)
        except (OSError, ValueError):  # unreadable, or not UTF-8
            return {}
        files = data.get("files") if data and data.get("format") == CACHE_FORMAT else None
        return files if isinstance(files, dict) else {}

    def checksums(self, paths: list[str]) -> dict[str, tuple[int, str]]:
        """path -> (size, ``sha256:<hex>``), or (-1, ``missing`` or a special file's kind).

        A file whose signature matches its entry costs one stat, here; the others are read
        on 8 threads (hashlib releases the GIL).
        """
        if self.old is None:
            self.old = self._load()
        found, misses = {}, []
        for path in paths:
            key, before = os.path.abspath(path), storage.signature(path)
            old = self.old.get(key)
            if before and isinstance(old, list) and len(old) == 6 and tuple(old[:5]) == before:
                if isinstance(old[5], str) and _CHECKSUM.fullmatch(old[5]):
                    found[path], self.new[key] = (before[0], old[5]), old
                    self.cached += 1
                    continue
            misses.append((path, before))
        with ThreadPoolExecutor(max_workers=8) as pool:
            for (path, _), (checksum, entry) in zip(misses, pool.map(self._hash, misses), strict=True):
                found[path] = checksum
                self.hashed += checksum[1].startswith("sha256:")
                if entry is not None:
                    self.new[os.path.abspath(path)] = entry
        return found

    def _hash(self, miss: tuple[str, tuple[int, ...] | None]) -> tuple[tuple[int, str], list[Any] | None]:
        """(size, checksum) of a file not in the cache, and its entry: None unless it was
        read whole, was settled (modified before the racy window) and did not change while
        it was read."""
        path, before = miss
        checksum = _checksum(path)
        settled = before is not None and before[1] < self.started_ns - RACY_NS
        if settled and checksum[0] == before[0] and storage.signature(path) == before:
            return checksum, [*before, checksum[1]]
        return checksum, None

    def save(self) -> None:
        """Rewrites the record, atomically, when this scan's entries differ from it (entries
        of files no longer listed are dropped); an unchanged re-run writes nothing."""
        if self.uri is None or self.old is None or self.new == self.old:
            return
        storage.write_chunks(self.uri, _cache_chunks(self.new))


def _cache_chunks(files: dict[str, list[Any]]) -> Iterator[bytes]:
    """The stat cache as one JSON object, one entry a line, streamed 10,000 entries a chunk."""
    yield json.dumps({"format": CACHE_FORMAT})[:-1].encode() + b', "files": {'
    items = sorted(files.items())
    for start in range(0, len(items), 10_000):
        lines = (f"\n{json.dumps(k)}: {json.dumps(v)}" for k, v in items[start : start + 10_000])
        yield ((b"," if start else b"") + ",".join(lines).encode())
    yield b"\n}}\n"


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
    if stage == "preprocess" and config.preprocess.num_shards == 0:
        keys += AUTO_SHARD_INPUTS
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
