"""The storage edge: every file the project touches, local path or gs:// URI, goes through here.

Remote URIs (``gs://`` and any other scheme Beam knows) go through Apache Beam's
``FileSystems``, i.e. the same GCS client that Beam's pipeline I/O uses; local paths use
``os``/``shutil`` directly so that writes can be atomic (temporary file + ``os.replace``).

Directory semantics: a "prefix" names a directory. ``list_files("gs://b/run")`` lists
objects under ``gs://b/run/`` (never ``gs://b/run2``); GCS folder placeholders (objects
whose name ends in ``/``) are never reported as files. Remote prefixes must not contain
glob characters (``*?[``). Local results start with the prefix exactly as it was given.

Over 400 lines on purpose: it is the one place where the project touches files (DESIGN.md:
one storage edge), and every operation keeps its local and its gs:// branch side by side.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

_CHUNK = 8 * 1024 * 1024
_WRITE_BUFFER = 1024 * 1024
_RAW = "uncompressed"  # Beam's CompressionTypes.UNCOMPRESSED: never (de)compress by file extension
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _filesystems():
    """Beam's ``FileSystems``, for URIs with a scheme only: imported on first use, so that
    local paths (and the processes that only touch them) never import Beam."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


@dataclass(frozen=True)
class FileInfo:
    """One file: its full URI or local path, and its size in bytes."""

    uri: str
    size: int


def is_gcs(uri: str) -> bool:
    """Returns True when ``uri`` is a ``gs://`` URI."""
    return uri.startswith("gs://")


def is_absolute(uri: str) -> bool:
    """Returns True for a URI with a scheme (``gs://...``) or an absolute local path."""
    return not _is_local(uri) or os.path.isabs(uri)


def _is_local(uri: str) -> bool:
    return _SCHEME.match(uri) is None


def join(base: str, *parts: str) -> str:
    """Joins parts onto a local path or URI: ``join("gs://b/x/", "/y/", "z") == "gs://b/x/y/z"``.

    Leading, trailing and repeated slashes in ``parts`` are dropped, so there are never
    doubled or trailing slashes.
    """
    segments = [s for p in parts for s in p.split("/") if s]
    if _is_local(base):
        return os.path.join(base, *segments) if segments else base
    return "/".join([base.rstrip("/"), *segments])


def _dir(prefix: str) -> str:
    """The prefix as a directory: ending in os.sep for local, in '/' for remote."""
    if _is_local(prefix):
        return os.path.join(prefix, "")
    if any(c in prefix for c in "*?["):
        raise ValueError(f"glob characters are not allowed in a storage prefix: {prefix}")
    return prefix.rstrip("/") + "/"


def _remote_match(directory: str, limit: int | None = None) -> list[FileInfo]:
    """Objects under a remote directory, placeholders included, unsorted."""
    result = _filesystems().match([directory + "**"], limits=[limit])[0]
    return [FileInfo(m.path, m.size_in_bytes) for m in result.metadata_list]


def list_files(prefix: str, special: bool = False) -> list[FileInfo]:
    """Lists every file under a local directory or remote prefix, recursively.

    Args:
        prefix: The directory or prefix.
        special: Also list, locally, what is neither a regular file nor a folder (FIFOs,
            devices, sockets, broken symlinks, symlinks to folders, which are not followed),
            with size -1, so that a caller can account for each (reading one raises
            :class:`NotAFile` or FileNotFoundError) instead of losing it silently.

    Returns:
        The files sorted by URI; an empty list when there are none or ``prefix`` is missing.
    """
    directory = _dir(prefix)
    if _is_local(prefix):
        files = []
        for root, dirs, names in os.walk(directory.rstrip(os.sep) or os.sep):
            for path in (os.path.join(root, n) for n in names):
                if os.path.isfile(path):
                    files.append(FileInfo(path, os.path.getsize(path)))
                elif special:
                    files.append(FileInfo(path, -1))
            if special:
                files += [FileInfo(p, -1) for p in (os.path.join(root, d) for d in dirs) if os.path.islink(p)]
    else:
        files = [f for f in _remote_match(directory) if not f.uri.endswith("/")]
    return sorted(files, key=lambda f: f.uri)


def exists(uri: str) -> bool:
    """Returns True if ``uri`` is a file, or a directory/prefix with at least one file under it."""
    if _is_local(uri):
        if os.path.isfile(uri):
            return True
        return os.path.isdir(uri) and any(names for _, _, names in os.walk(uri))
    if not uri.endswith("/") and _filesystems().exists(uri):
        return True
    first = _remote_match(_dir(uri), limit=1)
    # When the first object found is a folder placeholder, look for a real file.
    return bool(first) and (not first[0].uri.endswith("/") or bool(list_files(uri)))


class NotAFile(ValueError):
    """A local path names a device, a FIFO or a socket, not a regular file: reading it could
    block forever (a FIFO with no writer) or never end (``/dev/zero``)."""

    def __init__(self, uri: str, kind: str):
        super().__init__(f"{uri} is a {kind}, not a regular file")
        self.uri, self.kind = uri, kind


def _special_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    kinds += ((stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))
    return next((kind for test, kind in kinds if test(mode)), "special file")


def _iter_chunks(uri: str, size: int = _CHUNK) -> Iterator[bytes]:
    """Streams a file's bytes; raises FileNotFoundError naming ``uri`` when it is missing and
    :class:`NotAFile` for a local path that is not a regular file (checked before opening it)."""
    if _is_local(uri):
        with contextlib.suppress(FileNotFoundError):  # a missing file is reported below
            mode = os.stat(uri).st_mode
            if not stat.S_ISREG(mode):
                raise NotAFile(uri, _special_kind(mode))
    try:
        handle = open(uri, "rb") if _is_local(uri) else _filesystems().open(uri, compression_type=_RAW)
        with handle:
            while chunk := handle.read(size):
                yield chunk
    except Exception as exc:
        # GCS opens lazily and fails on the first read with google.api_core's NotFound.
        missing = isinstance(exc, FileNotFoundError)
        with contextlib.suppress(Exception):
            missing = missing or (not _is_local(uri) and not _filesystems().exists(uri))
        if missing:
            raise FileNotFoundError(errno.ENOENT, "No such file", uri) from exc
        raise


def iter_chunks(uri: str) -> Iterator[bytes]:
    """A file's bytes as a stream of chunks (at most 8 MiB each), never held whole.

    Raises:
        FileNotFoundError: ``uri`` does not exist (the message names it).
        NotAFile: a local path that is not a regular file (never opened).
    """
    return _iter_chunks(uri)


class FileTooLarge(ValueError):
    """A file holds more than the reader allows (it was not read past the limit)."""

    def __init__(self, uri: str, limit: int):
        super().__init__(f"{uri} holds more than {limit} bytes")
        self.uri, self.limit = uri, limit


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Reads a whole file, or at most ``max_bytes`` of it.

    A bounded read stops as soon as the file proves larger, so an endless file (a FIFO,
    ``/dev/zero``) or a huge one costs ``max_bytes`` and no more.

    Raises:
        FileNotFoundError: ``uri`` does not exist (the message names it).
        FileTooLarge: ``uri`` holds more than ``max_bytes``.
    """
    if max_bytes is None:
        return b"".join(_iter_chunks(uri))
    chunks, total = [], 0
    for chunk in _iter_chunks(uri, min(_CHUNK, max_bytes + 1)):
        total += len(chunk)
        if total > max_bytes:
            raise FileTooLarge(uri, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def sha256(uri: str) -> tuple[int, str]:
    """``(size, hex SHA-256)`` of a file, streamed in chunks (never held whole)."""
    digest, size = hashlib.sha256(), 0
    for chunk in _iter_chunks(uri):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def read_text(uri: str) -> str:
    """Reads a whole file as UTF-8 text (see :func:`read_bytes`)."""
    return read_bytes(uri).decode("utf-8")


def read_json_object(uri: str) -> dict | None:
    """The JSON object in ``uri``, or None when the file is missing, is not JSON or holds
    something else (for markers and records that a killed writer may have left unfinished)."""
    try:
        value = json.loads(read_text(uri))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_chunks(uri: str, chunks: Iterable[bytes]) -> None:
    """Writes atomically: readers see the old file or the complete new one, never a part."""
    if not _is_local(uri):
        # GCS commits the object on close; leaving the block with an error cancels the
        # upload instead (BlobWriter.__exit__ -> terminate), so no partial object lands.
        with _filesystems().create(uri, compression_type=_RAW) as handle:
            for chunk in chunks:
                handle.write(chunk)
        return
    path = os.path.abspath(uri)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours umask
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def open_for_write(uri: str) -> BinaryIO:
    """Opens a new file for writing piece by piece; the caller closes it.

    Not atomic: a reader may see a part of the file while it is written. Only for scratch
    files whose name is handed on once they are closed (a Beam bundle's spill files).
    Creates local parent directories as needed. Local writes are buffered by the MiB, so
    that many small pieces cost few system calls.
    """
    if not _is_local(uri):
        return _filesystems().create(uri, compression_type=_RAW)
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    return open(uri, "wb", buffering=_WRITE_BUFFER)


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a whole file atomically, creating local parent directories as needed."""
    write_chunks(uri, [data])


def write_text(uri: str, text: str) -> None:
    """Writes text as UTF-8, atomically (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode("utf-8"))


class AlreadyExists(FileExistsError):
    """:func:`create_exclusive` lost: the file was there (another writer created it first)."""


@functools.cache
def _gcs_client(endpoint: str | None):
    """One google-cloud-storage client per endpoint (``STORAGE_EMULATOR_HOST`` or the real one)."""
    from google.cloud import storage as gcs

    return gcs.Client()


def gcs_client():
    """The google-cloud-storage client for gs:// (honours ``STORAGE_EMULATOR_HOST``)."""
    return _gcs_client(os.environ.get("STORAGE_EMULATOR_HOST"))


def _gcs_blob(uri: str):
    """The google-cloud-storage blob for ``gs://bucket/name`` (honours STORAGE_EMULATOR_HOST)."""
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not bucket or not name:
        raise ValueError(f"not a gs://bucket/object URI: {uri}")
    return gcs_client().bucket(bucket).blob(name)


def create_exclusive(uri: str, data: bytes) -> None:
    """Creates a file only if it does not exist yet; of racing writers exactly one wins.

    This is the registry's compare-and-swap: on GCS an upload with the precondition
    ``if_generation_match=0`` (the object must not exist), locally ``os.link`` of a
    complete temporary file (which fails when the name exists). Either way the file
    appears complete or not at all.

    Raises:
        AlreadyExists: the file exists (naming ``uri``).
    """
    if is_gcs(uri):
        from google.api_core.exceptions import PreconditionFailed

        try:
            _gcs_blob(uri).upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            raise AlreadyExists(errno.EEXIST, "already exists", uri) from None
        return
    if not _is_local(uri):
        raise ValueError(f"create_exclusive supports local paths and gs:// only, not {uri}")
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AlreadyExists(errno.EEXIST, "already exists", uri) from None
    finally:
        os.remove(tmp)


def delete_file(uri: str) -> None:
    """Deletes one file; a missing one is fine. On GCS a single object delete through
    google-cloud-storage (no batch request), the client :func:`create_exclusive` uses."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            _gcs_blob(uri).delete()
        return
    if not _is_local(uri):
        _filesystems().delete([uri])
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(uri)


def modified(uri: str) -> float:
    """When a file (or, locally, a folder) was last written, in seconds since the epoch.

    Raises:
        FileNotFoundError: it does not exist.
    """
    if _is_local(uri):
        return os.stat(uri).st_mtime
    return _filesystems().last_updated(uri)


def signature(uri: str) -> tuple[int, int, int, int, int] | None:
    """``(size, mtime_ns, ctime_ns, inode, device)`` of a local regular file (a symlink
    followed, as a read follows it): what a stat cache compares to know, without reading
    it, that a file is unchanged (as git's index does). None for a missing or special file
    and for a remote URI (whose checksum its listing gives)."""
    if not _is_local(uri):
        return None
    try:
        found = os.stat(uri)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev


def delete_tree(prefix: str) -> None:
    """Deletes a file, or everything under a directory/prefix; a missing one is fine.

    Raises:
        OSError: Some remote objects could not be deleted.
    """
    if _is_local(prefix):
        if os.path.isdir(prefix) and not os.path.islink(prefix):
            shutil.rmtree(prefix)
        elif os.path.lexists(prefix):
            os.remove(prefix)
        return
    directory = _dir(prefix)
    if not prefix.endswith("/") and _filesystems().exists(prefix):
        _filesystems().delete([prefix])
    # Recursive delete of the prefix (placeholders too); Beam only logs its failures,
    # so check that nothing is left.
    _filesystems().delete([directory])
    if _remote_match(directory, limit=1):
        raise OSError(f"could not delete everything under {directory}")


def _pairs(src_prefix: str, dst_prefix: str) -> list[tuple[str, str]]:
    """(source, destination) for every file under ``src_prefix``, keeping relative paths."""
    base = _dir(src_prefix)  # local listings start with the prefix as given, too
    rels = [(f.uri, f.uri[len(base) :].replace(os.sep, "/")) for f in list_files(src_prefix)]
    return [(uri, join(dst_prefix, rel)) for uri, rel in rels]


def _same_remote(src: str, dst: str) -> bool:
    return not _is_local(src) and _filesystems().get_scheme(src) == _filesystems().get_scheme(dst)


def copy_file(src: str, dst: str) -> None:
    """Copies one file between local paths and URIs, streaming; the destination appears
    complete or not at all (see :func:`write_bytes`)."""
    write_chunks(dst, _iter_chunks(src))


def copy_tree(src_prefix: str, dst_prefix: str) -> int:
    """Copies every file under ``src_prefix`` to the same relative path under ``dst_prefix``.

    Works across local paths and URIs in any combination; within one remote filesystem
    the copy is server-side. Existing destination files are overwritten.

    Returns:
        The number of files copied (0 when ``src_prefix`` holds none).
    """
    pairs = _pairs(src_prefix, dst_prefix)
    if pairs and _same_remote(src_prefix, dst_prefix):
        _filesystems().copy([s for s, _ in pairs], [d for _, d in pairs])
    else:
        for src, dst in pairs:
            write_chunks(dst, _iter_chunks(src))
    return len(pairs)


def move_tree(src_prefix: str, dst_prefix: str) -> int:
    """Moves every file under ``src_prefix`` to the same relative path under ``dst_prefix``.

    Local to local is a single directory rename when possible (same filesystem, and the
    destination missing or empty); otherwise, and for remote storage, the files are
    copied and then the source is deleted, which is not atomic.

    Returns:
        The number of files moved (0 when ``src_prefix`` holds none).

    Raises:
        ValueError: ``dst_prefix`` is ``src_prefix`` or lies under it.
    """
    both_local = _is_local(src_prefix) and _is_local(dst_prefix)
    if both_local or _same_remote(src_prefix, dst_prefix):
        norm = (lambda p: _dir(os.path.abspath(p))) if both_local else _dir
        if norm(dst_prefix).startswith(norm(src_prefix)):
            raise ValueError(f"cannot move {src_prefix} into itself ({dst_prefix})")
    pairs = _pairs(src_prefix, dst_prefix)
    if not pairs:
        return 0
    if both_local:
        dst = os.path.abspath(dst_prefix)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(os.path.abspath(src_prefix), dst)
            return len(pairs)
    if _same_remote(src_prefix, dst_prefix):
        _filesystems().rename([s for s, _ in pairs], [d for _, d in pairs])  # copy, then delete
        return len(pairs)
    copy_tree(src_prefix, dst_prefix)
    delete_tree(src_prefix)
    return len(pairs)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path holding ``uri``'s bytes: the path itself when local, otherwise a
    temporary copy removed on exit (for readers such as Keras's that need a local file). The
    copy lies in a scratch folder (``scratch.mkdtemp``), so one that a killed process left
    is swept by the next run."""
    if _is_local(uri):
        yield uri
        return
    from components.core import scratch  # scratch builds on this module

    folder = scratch.mkdtemp("copy")
    try:
        tmp = os.path.join(folder, "file" + os.path.splitext(uri)[1])
        with open(tmp, "wb") as f:
            for chunk in _iter_chunks(uri):
                f.write(chunk)
        yield tmp
    finally:
        shutil.rmtree(folder, ignore_errors=True)
