"""The storage edge: every file the project touches, local path or gs:// URI, goes through here.

Built on Beam's ``FileSystems``, the same client Beam's pipeline I/O uses, so local paths
and gs:// URIs behave alike (and a GCS emulator named by ``STORAGE_EMULATOR_HOST`` serves
both in tests). Runs in the driver and on Beam workers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileInfo:
    """A listed file: its full URI and size in bytes."""

    uri: str
    size: int


def is_gcs(uri: str) -> bool:
    """Whether ``uri`` names Google Cloud Storage."""
    return uri.startswith("gs://")


def is_absolute(uri: str) -> bool:
    """Whether ``uri`` is a URI with a scheme or an absolute local path."""
    return "://" in uri or os.path.isabs(uri)


def join(base: str, *parts: str) -> str:
    """Joins path parts with single slashes, for local paths and URIs alike."""
    out = base
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def _listing_prefix(prefix: str) -> str:
    return prefix.rstrip("/") + "/"


def list_files(prefix: str) -> list[FileInfo]:
    """Every file under the directory or prefix ``prefix``, recursively, sorted by URI."""
    if not is_gcs(prefix):
        if not os.path.isdir(prefix):
            return []
        found = []
        for dirpath, _, names in os.walk(prefix):
            for name in names:
                path = os.path.join(dirpath, name)
                found.append(FileInfo(path, os.path.getsize(path)))
        return sorted(found, key=lambda f: f.uri)
    result = FileSystems.match([_listing_prefix(prefix) + "**"])[0]
    found = [FileInfo(m.path, m.size_in_bytes) for m in result.metadata_list if not m.path.endswith("/")]
    return sorted(found, key=lambda f: f.uri)


def exists(uri: str) -> bool:
    """Whether a file exists at ``uri``, or any file lies under it as a prefix."""
    if not is_gcs(uri):
        return os.path.exists(uri) and (os.path.isfile(uri) or bool(list_files(uri)))
    return FileSystems.exists(uri) or bool(list_files(uri))


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``.

    Raises:
        FileNotFoundError: naming ``uri`` when there is no such file.
    """
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            return f.read()
    except (BeamIOError, FileNotFoundError, OSError) as e:
        if not FileSystems.exists(uri):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise OSError(f"cannot read {uri}: {e}") from e


def read_text(uri: str) -> str:
    """The file at ``uri`` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Writes ``data`` to ``uri`` atomically: readers see the old file or the whole new one.

    Local files are written under a temporary name and renamed; a GCS object only becomes
    visible once its upload completes.
    """
    if is_gcs(uri):
        with FileSystems.create(uri, compression_type="uncompressed") as f:
            f.write(data)
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``uri`` atomically."""
    write_bytes(uri, text.encode("utf-8"))


def delete_tree(prefix: str) -> None:
    """Deletes the file ``prefix`` or everything under it; a missing path is fine."""
    if not is_gcs(prefix):
        if os.path.isdir(prefix) and not os.path.islink(prefix):
            shutil.rmtree(prefix)
        elif os.path.lexists(prefix):
            os.unlink(prefix)
        return
    files = [f.uri for f in list_files(prefix)]
    if FileSystems.exists(prefix):
        files.append(prefix)
    if files:
        FileSystems.delete(files)


def copy_tree(src_prefix: str, dst_prefix: str) -> int:
    """Copies every file under ``src_prefix`` to the same relative path under ``dst_prefix``.

    Either side may be local or gs://. Returns the number of files copied.
    """
    files = list_files(src_prefix)
    base = _listing_prefix(src_prefix)
    for info in files:
        target = join(dst_prefix, info.uri[len(base):])
        if is_gcs(src_prefix) == is_gcs(dst_prefix) and is_gcs(src_prefix):
            FileSystems.copy([info.uri], [target])
        elif not is_gcs(src_prefix) and not is_gcs(dst_prefix):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(info.uri, target)
        else:
            _stream_copy(info.uri, target)
    return len(files)


def move_tree(src_prefix: str, dst_prefix: str) -> int:
    """Moves everything under ``src_prefix`` to ``dst_prefix``; returns the number of files.

    Local: one directory rename when the destination does not exist (atomic on one file
    system). Otherwise copy, then delete the source.
    """
    if not is_gcs(src_prefix) and not is_gcs(dst_prefix) and not os.path.exists(dst_prefix):
        count = len(list_files(src_prefix))
        os.makedirs(os.path.dirname(os.path.abspath(dst_prefix)), exist_ok=True)
        os.rename(src_prefix, dst_prefix)
        return count
    count = copy_tree(src_prefix, dst_prefix)
    delete_tree(src_prefix)
    return count


def _stream_copy(src: str, dst: str) -> None:
    if not is_gcs(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with FileSystems.open(src, compression_type="uncompressed") as reader:
        with FileSystems.create(dst, compression_type="uncompressed") as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
