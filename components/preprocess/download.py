"""Fills a missing local ``data.source`` folder from the archives in ``data.download``.

Runs in the driver, at the start of the preprocessing stage, before the source is listed.
When ``data.source`` already holds files nothing is fetched (no network at all). Otherwise
every archive is fetched (https:// and http:// with urllib; gs:// and local paths through
the storage edge) and extracted into one temporary folder beside ``data.source``, which is
renamed into place only once every archive has extracted: an interrupted or failed
download never leaves a half-filled ``data.source``, and a re-run starts over.

An entry is a URL or ``{url: ..., sha256: <64 hex>}``: a pinned digest must match before
anything is extracted. Plain http:// needs one (the config refuses it without), and so does
an https:// download that is redirected to http://.

Archives are untrusted: ``components.preprocess.archives`` checks every member before writing any (only
regular files and folders with plain names) and bounds what they write by
``data.download_limits`` (``max_total_mb`` in all, where a download also stops; ``max_ratio``
per archive; ``max_members``). Members keep their paths (the iBean ``train.zip`` holds
``train/<class>/<image>``); macOS metadata (``__MACOSX/``, ``.DS_Store``) is skipped; a path
that an earlier member or archive wrote is an error.

One download per ``data.source`` at a time: two processes filling the same folder at once
share the temporary folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from components.config.data import archive_suffix, url_scheme
from components.core.errors import StageError
from components.preprocess.archives import Budget, extract, failure, over

if TYPE_CHECKING:
    from components.config import Config, DownloadLimitsConfig

PROGRESS_SECONDS = 3.0  # at most one progress line per archive this often
TIMEOUT_SECONDS = 60.0  # per connect or read, not for the whole download
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Archive:
    """One ``data.download`` entry: where the archive is, and its pinned digest (or ``""``)."""

    url: str
    sha256: str = ""


def as_archive(entry: str | Mapping[str, Any] | Archive) -> Archive:
    """The :class:`Archive` of a ``data.download`` entry (a URL, or ``{url, sha256}``)."""
    if isinstance(entry, Archive):
        return entry
    if isinstance(entry, str):
        return Archive(entry)
    return Archive(str(entry["url"]), str(entry.get("sha256", "")).lower())


def ensure_source(config: Config) -> None:
    """Downloads ``config.data.download`` into ``config.data.source`` when it needs it.

    Runs in the driver only (never on Beam workers or training replicas).

    Raises:
        StageError: an archive could not be fetched, failed its digest, was unsafe or over
            ``data.download_limits``; ``data.source`` is left as it was.
    """
    fill_source(config.data.source, config.data.download, config.data.download_limits)


def fill_source(
    source: str,
    entries: Sequence[str | Mapping[str, Any] | Archive],
    limits: DownloadLimitsConfig | None = None,
) -> bool:
    """Fetches and extracts ``entries`` into the local folder ``source`` unless it holds files.

    Args:
        source: The local folder to fill (created with its parents when missing).
        entries: Archive URLs or local paths, or ``{url, sha256}`` mappings or
            :class:`Archive` values, extracted in this order.
        limits: ``data.download_limits`` (None: the defaults).

    Returns:
        True when the archives were downloaded, False when there was nothing to do.

    Raises:
        StageError: a fetch, a digest, a member or a limit failed (the message names the URL).
    """
    archives = [as_archive(e) for e in entries]
    if not archives:
        return False
    if _holds_files(source):
        _log(f"{source} already holds files; data.download is not used")
        return False
    if limits is None:
        from components.config import DownloadLimitsConfig

        limits = DownloadLimitsConfig()
    destination = os.path.abspath(source)
    work = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.download")
    shutil.rmtree(work, ignore_errors=True)  # a failed or killed earlier run: start over
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    budget = Budget(limits)
    try:
        _log(f"{source} is missing or empty: fetching {len(archives)} archive(s)")
        for archive in archives:
            with _fetched(archive, work, budget.max_bytes) as path:
                _check_digest(path, archive)
                extract(path, archive_suffix(archive.url), archive.url, tree, budget)
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


@contextlib.contextmanager
def _fetched(archive: Archive, work: str, max_bytes: int) -> Iterator[str]:
    """A local path holding the archive's bytes (removed on exit when it is a copy)."""
    url = archive.url
    if url_scheme(url) in ("http", "https"):
        path = os.path.join(work, "archive" + archive_suffix(url))
        _http_download(archive, path, max_bytes)
        try:
            yield path
        finally:
            os.remove(path)
        return
    from components.core import storage  # imports Beam's file systems: only when needed

    _log(f"{url}: reading")
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_copy(url))
        except FileNotFoundError:
            raise failure(url, "no such file") from None
        except Exception as exc:  # the GCS client's own errors are not OSErrors
            raise failure(url, f"could not read it ({type(exc).__name__}: {exc})") from None
        if not os.path.isfile(path):
            raise failure(url, "no such file")
        yield path


class _PinnedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to https:// only, or to http:// when a digest pins the archive."""

    def __init__(self, pinned: bool) -> None:
        self.schemes = ("https", "http") if pinned else ("https",)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's hook
        if url_scheme(newurl) not in self.schemes:
            why = "refused: not https:// and no sha256 pins the archive"
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} {why}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_download(archive: Archive, path: str, max_bytes: int) -> None:
    """Streams the archive into ``path``, printing progress; raises StageError on any failure."""
    url = archive.url
    if url_scheme(url) == "http" and not archive.sha256:
        raise failure(url, "http:// is refused without a sha256 digest (use https://)")
    opener = urllib.request.build_opener(_PinnedRedirects(bool(archive.sha256)))
    request = urllib.request.Request(url, headers={"User-Agent": "finetune-pipeline"})
    try:
        with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            total = int(response.headers.get("Content-Length") or -1)
            with open(path, "wb") as out:
                received = _copy_with_progress(response, out, _display_name(url), total, max_bytes)
    except urllib.error.HTTPError as exc:
        raise failure(url, f"the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise failure(url, f"cannot reach the server ({exc.reason})") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, http.client errors
        raise failure(url, f"the download failed ({type(exc).__name__}: {exc})") from None
    if received > max_bytes:
        raise over(url, f"the archive is larger than {max_bytes // 2**20} MiB", "max_total_mb")
    if total >= 0 and received != total:
        raise failure(url, f"the connection closed after {received} of {total} bytes")


def _display_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlsplit(url).path) or url


def _copy_with_progress(source: IO[bytes], out: IO[bytes], name: str, total: int, limit: int) -> int:
    """Copies in chunks until EOF or past ``limit`` bytes, printing ``[download] <name>
    done/total MB`` every few seconds; returns the bytes received."""
    received, last = 0, time.monotonic()
    while received <= limit and (chunk := source.read(_CHUNK)):
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


def _check_digest(path: str, archive: Archive) -> None:
    """Raises unless the file at ``path`` has the archive's pinned sha256 (when it has one)."""
    if not archive.sha256:
        return
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != archive.sha256:
        raise StageError(
            f"data.download: {archive.url}: sha256 mismatch: expected {archive.sha256}, got {actual}. "
            "Nothing was extracted. The archive is not the pinned one (changed upstream, truncated or "
            "tampered with): check where it comes from before updating the sha256 in data.download."
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
