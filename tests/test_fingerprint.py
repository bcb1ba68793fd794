"""The input fingerprint's stat cache: a local file whose size, mtime, ctime, inode and device
are unchanged keeps its recorded checksum unread, and the fingerprint is the same value with or
without the cache. Real files on local disk; mtimes are set into the past with ``os.utime`` where
a file must be old enough to be recorded (a just-written one is racy and never is)."""

from __future__ import annotations

import json
import os
import time

import pytest

from components.config import load_config
from components.core import storage
from pipeline import keys

FILES = {"cat/a.jpg": b"a" * 100, "cat/b.jpg": b"b" * 50, "dog/c.jpg": b"c" * 70}
PAST_NS = (time.time_ns() - 3600 * 10**9, time.time_ns() - 3600 * 10**9)  # (atime, mtime): an hour ago


def _write(root, files: dict[str, bytes], past: bool = True) -> str:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        if past:
            os.utime(path, ns=PAST_NS)
    return str(root)


def _config(source: str):
    return load_config(None, [f"data.source={source}", "run_dir=unused"])


def _scan(source: str, cache: str | None) -> keys.InputFingerprint:
    return keys.scan_inputs(_config(source), cache)


def _uncached(source: str) -> str:
    return keys.input_fingerprint(_config(source))


def _counts(scan: keys.InputFingerprint) -> tuple[int, int]:
    return scan.hashed, scan.cached


def _recorded(cache: str) -> dict:
    return json.loads(open(cache).read())["files"]


@pytest.fixture
def cache(tmp_path) -> str:
    return keys.fingerprint_cache(str(tmp_path / "run"))


def test_the_cache_lies_in_the_run_directory():
    assert keys.fingerprint_cache("gs://b/runs/r") == "gs://b/runs/r/cache/fingerprint.json"


def test_cached_value_equals_uncached_and_an_unchanged_rerun_reads_nothing(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    uncached = _uncached(source)
    first = _scan(source, cache)
    assert first.value == uncached and _counts(first) == (3, 0)
    assert first.describe() == "3 files hashed, 0 from the cache"
    written = open(cache, "rb").read()
    assert set(_recorded(cache)) == {os.path.join(os.path.abspath(source), r) for r in FILES}
    again = _scan(source, cache)
    assert again.value == uncached and _counts(again) == (0, 3)
    assert open(cache, "rb").read() == written  # nothing changed: the cache is not rewritten
    relative = os.path.relpath(source)  # the same files named another way: the same entries
    assert _counts(_scan(relative, cache)) == (0, 3)


def test_content_changed_in_place_with_the_same_size_and_mtime_is_rehashed(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    before = _scan(source, cache).value
    path = os.path.join(source, "cat/a.jpg")
    old = os.stat(path)
    time.sleep(0.05)  # past the file system's timestamp tick, so that the ctime moves
    with open(path, "r+b") as f:  # same inode, same size, other bytes
        f.write(b"A")
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # the old mtime back: only ctime tells
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    assert now.st_ctime_ns != old.st_ctime_ns
    changed = _scan(source, cache)
    assert changed.value != before and changed.value == _uncached(source)
    assert _counts(changed) == (1, 2)


def test_a_replaced_file_is_rehashed(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    before = _scan(source, cache).value
    path = os.path.join(source, "dog/c.jpg")
    old = os.stat(path)
    _write(tmp_path / "new", {"c.jpg": FILES["dog/c.jpg"]})  # the same bytes, a new inode
    os.replace(tmp_path / "new" / "c.jpg", path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert os.stat(path).st_ino != old.st_ino
    same = _scan(source, cache)
    assert same.value == before and _counts(same) == (1, 2)
    _write(tmp_path / "new", {"c.jpg": b"C" * 70})  # other bytes, same size and mtime
    os.replace(tmp_path / "new" / "c.jpg", path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    other = _scan(source, cache)
    assert other.value != before and other.value == _uncached(source) and _counts(other) == (1, 2)


def test_a_deleted_and_an_added_file_change_the_fingerprint(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    before = _scan(source, cache).value
    os.remove(os.path.join(source, "cat/b.jpg"))
    deleted = _scan(source, cache)
    assert deleted.value != before and deleted.value == _uncached(source) and _counts(deleted) == (0, 2)
    assert not any(k.endswith("b.jpg") for k in _recorded(cache))  # dropped on rewrite
    _write(source, {"dog/d.jpg": b"d" * 10})
    added = _scan(source, cache)
    assert added.value not in (before, deleted.value) and added.value == _uncached(source)
    assert _counts(added) == (1, 2) and len(_recorded(cache)) == 3


@pytest.mark.parametrize(
    "content",
    [
        b"not json {",
        b"\xff\xfe not utf-8",
        b"[1, 2, 3]",
        b'{"format": "finetune-stat-cache-v0", "files": {}}',
        b'{"format": "finetune-stat-cache-v1", "files": []}',
        b"",
    ],
)
def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path, cache, content):
    source = _write(tmp_path / "images", FILES)
    storage.write_bytes(cache, content)
    scan = _scan(source, cache)
    assert scan.value == _uncached(source) and _counts(scan) == (3, 0)
    assert _counts(_scan(source, cache)) == (0, 3)


def test_malformed_entries_are_rehashed(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    uncached = _scan(source, cache).value
    entries = _recorded(cache)
    a, b, c = sorted(entries)
    entries[a][-1] = "sha256:not-hex"  # right signature, bad checksum
    entries[b] = entries[b][:5]  # no checksum
    entries[c] = {"size": 70}
    storage.write_text(cache, json.dumps({"format": keys.CACHE_FORMAT, "files": entries}))
    scan = _scan(source, cache)
    assert scan.value == uncached and _counts(scan) == (3, 0)


def test_an_unreadable_cache_is_ignored(tmp_path, cache):
    source = _write(tmp_path / "images", FILES)
    os.makedirs(os.path.dirname(cache))
    os.mkfifo(cache)  # never opened (a read would block): ignored, then replaced by the rewrite
    scan = _scan(source, cache)
    assert scan.value == _uncached(source) and _counts(scan) == (3, 0)
    assert _counts(_scan(source, cache)) == (0, 3)


def test_racy_just_written_files_are_not_cached(tmp_path, cache):
    source = _write(tmp_path / "images", FILES, past=False)  # mtime: now
    future = os.path.join(source, "dog/c.jpg")
    os.utime(future, ns=(time.time_ns() + 3600 * 10**9,) * 2)  # an hour ahead: racy too
    first = _scan(source, cache)
    assert first.value == _uncached(source) and _counts(first) == (3, 0)
    assert _counts(_scan(source, cache)) == (3, 0)  # nothing was recorded
    assert not os.path.exists(cache)  # nothing to record: nothing written
    recent = os.path.join(source, "cat/b.jpg")
    os.utime(recent, ns=(time.time_ns() - 10**9,) * 2)  # a second ago: still within the window
    os.utime(os.path.join(source, "cat/a.jpg"), ns=PAST_NS)
    assert _counts(_scan(source, cache)) == (3, 0)
    assert _counts(_scan(source, cache)) == (2, 1)  # only the old one was recorded
    assert [k[-5:] for k in _recorded(cache)] == ["a.jpg"]


def test_a_manifests_local_files_use_the_cache(tmp_path, cache):
    _write(tmp_path / "images", FILES)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("uri,label\nimages/cat/a.jpg,cat\nimages/dog/c.jpg,dog\nimages/gone.jpg,dog\n")
    source = str(manifest)
    uncached = _uncached(source)
    first = _scan(source, cache)
    assert first.value == uncached and _counts(first) == (2, 0)  # the missing file is not counted
    again = _scan(source, cache)
    assert again.value == uncached and _counts(again) == (0, 2)
    _write(tmp_path / "images", {"gone.jpg": b"now here"})
    appeared = _scan(source, cache)
    assert appeared.value != uncached and appeared.value == _uncached(source) and _counts(appeared) == (1, 2)


def test_special_files_a_manifest_lists_are_never_read_nor_cached(tmp_path, cache):
    _write(tmp_path / "images", FILES)
    os.mkfifo(tmp_path / "images" / "pipe.jpg")  # a FIFO with no writer: reading it would block
    manifest = tmp_path / "labels.csv"
    manifest.write_text("uri,label\nimages/cat/a.jpg,cat\nimages/pipe.jpg,dog\n")
    source = str(manifest)
    first = _scan(source, cache)
    assert first.value == _uncached(source) and _counts(first) == (1, 0)
    assert _counts(_scan(source, cache)) == (0, 1) and len(_recorded(cache)) == 1
