"""Fills a missing local ``data.source`` folder from the archives in ``data.download``.

Runs in the driver, at the start of the preprocessing stage, before the source is listed.
When ``data.source`` already holds files nothing is fetched (no network at all). Otherwise
every archive is fetched (https:// and http:// with urllib; gs:// and local paths through
the storage edge) and extracted into one temporary folder beside ``data.source``, which is
renamed into place only once every archive has extracted: an interrupted or failed
download never leaves a half-filled ``data.source``, and a re-run starts over.

Members keep their paths inside the archive, with no folder stripped: the iBean
``train.zip`` holds ``train/<class>/<image>``, so the three iBean archives extracted into
one folder make the split-folder layout (``train/``, ``validation/``, ``test/``). macOS
metadata (``__MACOSX/`` folders, ``.DS_Store`` files) is skipped. A member with an
absolute path or a ``..`` component, a link that leads outside the folder, a device file,
or a file that an earlier archive already wrote is an error: nothing is extracted.

One download per ``data.source`` at a time: two processes filling the same folder at once
share the temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING

from pipeline.errors import StageError

if TYPE_CHECKING:
    from pipeline.config import Config

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DOWNLOAD_SCHEMES = ("", "https", "http", "gs")  # "": a local path
PROGRESS_SECONDS = 3.0  # at most one progress line per archive this often
TIMEOUT_SECONDS = 60.0  # per connect or read, not for the whole download
_CHUNK = 1024 * 1024
_SKIPPED_FOLDERS = ("__MACOSX",)
_SKIPPED_FILES = (".DS_Store",)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case (``https``, ``gs``), or ``""`` for a local path."""
    match = _SCHEME_RE.match(url)
    return match.group(1).lower() if match else ""


def archive_suffix(url: str) -> str:
    """The archive type of ``url`` from its path (query and fragment ignored), or ``""``."""
    path = urllib.parse.urlsplit(url).path if url_scheme(url) else url
    lower = path.lower()
    return next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), "")


def ensure_source(config: Config) -> None:
    """Downloads ``config.data.download`` into ``config.data.source`` when it needs it.

    Runs in the driver only (never on Beam workers or training replicas).

    Raises:
        StageError: an archive could not be fetched or extracted; ``data.source`` is left
            as it was.
    """
    fill_source(config.data.source, config.data.download)


def fill_source(source: str, urls: Sequence[str]) -> bool:
    """Fetches and extracts ``urls`` into the local folder ``source`` unless it holds files.

    Args:
        source: The local folder to fill (created with its parents when missing).
        urls: Archive URLs or local paths, extracted in this order.

    Returns:
        True when the archives were downloaded, False when there was nothing to do.

    Raises:
        StageError: a fetch or an extraction failed (the message names the URL).
    """
    if not urls:
        return False
    if _holds_files(source):
        _log(f"{source} already holds files; data.download is not used")
        return False
    destination = os.path.abspath(source)
    work = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.download")
    shutil.rmtree(work, ignore_errors=True)  # a failed or killed earlier run: start over
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    try:
        _log(f"{source} is missing or empty: fetching {len(urls)} archive(s)")
        for url in urls:
            with _fetched(url, work) as archive:
                _extract(archive, archive_suffix(url), tree, url)
        count = _place(tree, destination, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"{count} files extracted into {source}")
    return True


def _holds_files(path: str) -> bool:
    """True when ``path`` is a file, or a folder with a file somewhere below it."""
    if os.path.isfile(path):
        return True
    return os.path.isdir(path) and any(names for _, _, names in os.walk(path))


def _log(message: str) -> None:
    print(f"[download] {message}", file=sys.stderr, flush=True)


def _failure(url: str, why: str) -> StageError:
    """The error for a URL that could not be used, with what to do about it."""
    return StageError(
        f"data.download: {url}: {why}. Check the URL and the network and run again, or download "
        "and extract the archives yourself and set data.source to that folder (data.download is "
        "only used while data.source is missing or empty)."
    )


@contextlib.contextmanager
def _fetched(url: str, work: str) -> Iterator[str]:
    """A local path holding the archive's bytes (removed on exit when it is a copy)."""
    if url_scheme(url) in ("http", "https"):
        path = os.path.join(work, "archive" + archive_suffix(url))
        _http_download(url, path)
        try:
            yield path
        finally:
            os.remove(path)
        return
    from pipeline import storage  # imports Beam's file systems: only when needed

    _log(f"{url}: reading")
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_copy(url))
        except FileNotFoundError:
            raise _failure(url, "no such file") from None
        except Exception as exc:  # the GCS client's own errors are not OSErrors
            raise _failure(url, f"could not read it ({type(exc).__name__}: {exc})") from None
        if not os.path.isfile(path):
            raise _failure(url, "no such file")
        yield path


def _http_download(url: str, path: str) -> None:
    """Streams ``url`` into ``path``, printing progress; raises StageError on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "finetune-pipeline"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            total = int(response.headers.get("Content-Length") or -1)
            with open(path, "wb") as out:
                received = _copy_with_progress(response, out, _display_name(url), total)
    except urllib.error.HTTPError as exc:
        raise _failure(url, f"the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _failure(url, f"cannot reach the server ({exc.reason})") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, http.client errors
        raise _failure(url, f"the download failed ({type(exc).__name__}: {exc})") from None
    if total >= 0 and received != total:
        raise _failure(url, f"the connection closed after {received} of {total} bytes")


def _display_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlsplit(url).path) or url


def _copy_with_progress(source: IO[bytes], out: IO[bytes], name: str, total: int) -> int:
    """Copies in chunks, printing ``[download] <name> done/total MB`` every few seconds."""
    received, last = 0, time.monotonic()
    while chunk := source.read(_CHUNK):
        out.write(chunk)
        received += len(chunk)
        if time.monotonic() - last >= PROGRESS_SECONDS:
            _log(f"{name} {_megabytes(received, total)}")
            last = time.monotonic()
    _log(f"{name} {_megabytes(received, total)} done")
    return received


def _megabytes(received: int, total: int) -> str:
    done = f"{received / 1e6:.1f}"
    return f"{done}/{total / 1e6:.1f} MB" if total >= 0 else f"{done} MB"


def _extract(archive: str, suffix: str, root: str, url: str) -> None:
    """Extracts a .zip or tar archive into ``root``, checking every member first.

    Raises:
        StageError: the archive is corrupt, or a member is unsafe or already extracted.
    """
    try:
        if suffix == ".zip":
            _extract_zip(archive, root, url)
        else:
            _extract_tar(archive, root, url)
    except StageError:
        raise
    except tarfile.FilterError as exc:  # links outside root, device files, ...
        raise _unsafe(url, exc.tarinfo.name, str(exc)) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise _failure(url, f"not a valid {suffix} archive ({exc}); the file may be truncated") from None
    except (OSError, RuntimeError, NotImplementedError) as exc:  # disk full, encrypted, ...
        raise _failure(url, f"could not extract it ({exc})") from None


def _unsafe(url: str, member: str, why: str) -> StageError:
    return StageError(
        f"data.download: {url}: unsafe archive member '{member}': {why}. Nothing was extracted; "
        "check where the archive comes from, or extract it yourself and set data.source."
    )


def _skipped(name: str) -> bool:
    parts = [p for p in name.split("/") if p]
    return bool(parts) and (parts[0] in _SKIPPED_FOLDERS or parts[-1] in _SKIPPED_FILES)


def _target(root: str, name: str, url: str) -> str:
    """Where member ``name`` goes under ``root``; rejects absolute paths and ``..``."""
    if name.startswith(("/", "\\")) or re.match(r"^[a-zA-Z]:", name):
        raise _unsafe(url, name, "absolute path")
    parts = [p for p in re.split(r"[\\/]", name) if p and p != "."]
    if ".." in parts:
        raise _unsafe(url, name, "'..' path component")
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise _unsafe(url, name, "leads outside the extraction folder through a link")
    return path


def _extract_zip(archive: str, root: str, url: str) -> None:
    """Extracts a zip archive; symbolic links in zips are rejected (zipfile cannot make them)."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not _skipped(m.filename)]
        targets = [(m, _target(root, m.filename, url)) for m in members]
        for member, _ in targets:
            if stat.S_ISLNK(member.external_attr >> 16):
                raise _unsafe(url, member.filename, "symbolic link")
        for member, path in targets:
            if member.is_dir():
                os.makedirs(path, exist_ok=True)
                continue
            _check_new(path, member.filename, url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with zf.open(member) as src, open(path, "xb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _extract_tar(archive: str, root: str, url: str) -> None:
    """Extracts a tar archive (any compression) with tarfile's ``data`` filter, which
    rejects links that lead outside ``root`` and special files."""
    with tarfile.open(archive, "r:*") as tf:
        members = [m for m in tf.getmembers() if not _skipped(m.name)]
        for member in members:
            _target(root, member.name, url)
            tarfile.data_filter(member, root)  # checks every member before writing any
        for member in members:
            if not member.isdir():
                _check_new(_target(root, member.name, url), member.name, url)
            tf.extract(member, root, filter="data")


def _check_new(path: str, name: str, url: str) -> None:
    if os.path.lexists(path):
        raise StageError(
            f"data.download: {url}: '{name}' was already extracted from an earlier archive; "
            "each file may come from one archive only (check data.download for duplicates)."
        )


def _place(tree: str, destination: str, source: str) -> int:
    """Renames the extracted ``tree`` to ``destination``; returns its number of files."""
    count = sum(len(names) for _, _, names in os.walk(tree))
    if not count:
        raise StageError(
            f"data.download: the archives hold no files, so {source} would stay empty; "
            "check the URLs in data.download."
        )
    try:
        if os.path.isdir(destination) and not os.path.islink(destination):
            for folder, _, _ in os.walk(destination, topdown=False):
                os.rmdir(folder)  # empty folders only: fails rather than delete a file
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.rename(tree, destination)
    except OSError as exc:
        raise StageError(
            f"data.download: could not move the extracted files into {source} ({exc}); "
            "make data.source an empty or missing local folder."
        ) from None
    return count
