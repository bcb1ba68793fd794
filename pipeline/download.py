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

Archives are untrusted. Only regular files and folders are extracted: a symbolic or hard
link, device, FIFO or other special member (or an encrypted one) fails the whole download
before anything is written, so no path ever leads through a link (tarfile's ``data`` filter
trusts ``os.path.realpath``, which CVE-2025-4517 defeats). Names are checked as text: no
absolute path, drive letter, ``..``, backslash, control character or undecodable byte;
components up to 255 bytes, names up to 1024. This module writes each file (``open(...,
"xb")``; the archive's modes, owners and times are ignored). ``data.download_limits`` bound
the bytes written (``max_total_mb`` in all; a download stops there too), each archive's
expansion over its size (``max_ratio``, an archive under 1 MiB counting as 1 MiB) and the
members (``max_members`` in all), counting real bytes, not headers (tar headers, which lay
out the stream, are checked first too). Members keep their paths (the iBean ``train.zip``
holds ``train/<class>/<image>``); macOS metadata (``__MACOSX/``, ``.DS_Store``) is skipped; a
path that an earlier member or archive wrote is an error.

One download per ``data.source`` at a time: two processes filling the same folder at once
share the temporary folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from pipeline.errors import StageError

if TYPE_CHECKING:
    from pipeline.config import Config, DownloadLimitsConfig

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DOWNLOAD_SCHEMES = ("", "https", "http", "gs")  # "": a local path
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PROGRESS_SECONDS = 3.0  # at most one progress line per archive this often
TIMEOUT_SECONDS = 60.0  # per connect or read, not for the whole download
MAX_NAME_BYTES = 1024  # a member's whole path, UTF-8
MAX_COMPONENT_BYTES = 255  # one folder or file name (NAME_MAX)
RATIO_FLOOR_BYTES = 2**20  # max_ratio counts a smaller archive as this large
_MIB = 2**20
_CHUNK = 1024 * 1024
_SKIPPED_FOLDERS = ("__MACOSX",)
_SKIPPED_FILES = (".DS_Store",)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_REFUSED = "only regular files and folders are extracted"
# Refused member kinds, by stat.filemode's letter; tar types map to the same letters.
_KINDS = {"l": "symbolic link", "h": "hard link", "c": "character device", "b": "block device", "p": "FIFO"}
_TAR_LETTERS = dict(
    zip(
        (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE),
        "lhcbp",
        strict=True,
    )
)


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
        from pipeline.config import DownloadLimitsConfig

        limits = DownloadLimitsConfig()
    destination = os.path.abspath(source)
    work = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.download")
    shutil.rmtree(work, ignore_errors=True)  # a failed or killed earlier run: start over
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    budget = _Budget(limits)
    try:
        _log(f"{source} is missing or empty: fetching {len(archives)} archive(s)")
        for archive in archives:
            with _fetched(archive, work, budget.max_bytes) as path:
                _check_digest(path, archive)
                _extract(path, archive.url, tree, budget)
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
        raise _failure(url, "http:// is refused without a sha256 digest (use https://)")
    opener = urllib.request.build_opener(_PinnedRedirects(bool(archive.sha256)))
    request = urllib.request.Request(url, headers={"User-Agent": "finetune-pipeline"})
    try:
        with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            total = int(response.headers.get("Content-Length") or -1)
            with open(path, "wb") as out:
                received = _copy_with_progress(response, out, _display_name(url), total, max_bytes)
    except urllib.error.HTTPError as exc:
        raise _failure(url, f"the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _failure(url, f"cannot reach the server ({exc.reason})") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, http.client errors
        raise _failure(url, f"the download failed ({type(exc).__name__}: {exc})") from None
    if received > max_bytes:
        raise _over(url, f"the archive is larger than {max_bytes // _MIB} MiB", "max_total_mb")
    if total >= 0 and received != total:
        raise _failure(url, f"the connection closed after {received} of {total} bytes")


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


class _Budget:
    """What the archives of one download have written, against ``data.download_limits``."""

    def __init__(self, limits: DownloadLimitsConfig) -> None:
        self.limits, self.max_bytes = limits, limits.max_total_mb * _MIB
        self.members = self.written = self.expanded = self.size = 0
        self.url = ""

    def start(self, url: str, size: int) -> None:
        """Begins counting ``max_ratio`` for an archive of ``size`` bytes."""
        self.url, self.size, self.expanded = url, size, 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _over(self.url, f"more than {self.limits.max_members} members", "max_members")

    def check(self, total: int, expanded: int) -> None:
        """Raises when ``total`` bytes in all, or ``expanded`` from this archive, are too many."""
        if total > self.max_bytes:
            reached = f"{total / _MIB:.1f} MiB"
            raise _over(
                self.url, f"more than {self.limits.max_total_mb} MiB in all ({reached})", "max_total_mb"
            )
        if expanded > self.limits.max_ratio * max(self.size, RATIO_FLOOR_BYTES):
            reached = f"{expanded / _MIB:.1f} MiB from a {self.size / _MIB:.3f} MiB archive"
            why = f"expands more than {self.limits.max_ratio} times its size ({reached})"
            raise _over(self.url, why, "max_ratio")

    def add(self, count: int) -> None:
        """Counts ``count`` bytes about to be written (raises first when they are too many)."""
        self.check(self.written + count, self.expanded + count)
        self.written, self.expanded = self.written + count, self.expanded + count


def _over(url: str, why: str, key: str) -> StageError:
    return StageError(
        f"data.download: {url}: {why}, over data.download_limits.{key}. Nothing was placed in "
        f"data.source; raise data.download_limits.{key} if the archive is expected to be this large."
    )


def _extract(archive: str, url: str, root: str, budget: _Budget) -> None:
    """Extracts a .zip or tar archive into ``root``: every member is checked (:func:`_plan`)
    before any is written, then regular files are streamed into new files (no
    ``tarfile.extract``: the archive's modes, owners and times are ignored, never setuid).

    Raises:
        StageError: the archive is corrupt, a member is unsafe or already extracted, or a
            limit is reached.
    """
    suffix = archive_suffix(url)
    budget.start(url, os.path.getsize(archive))
    try:
        with _opened(archive, suffix, budget) as (entries, open_member):
            for relative, is_dir, member in _plan(entries, url, budget):
                path = os.path.join(root, relative)
                os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
                if not is_dir:
                    with open_member(member) as source, open(path, "xb") as out:
                        while chunk := source.read(_CHUNK):
                            budget.add(len(chunk))  # the bytes read, never a header's size
                            out.write(chunk)
    except StageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise _failure(url, f"not a valid {suffix} archive ({exc}); the file may be truncated") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise StageError(
            f"data.download: {url}: '{_shown(os.path.relpath(exc.filename or '', root))}' was already "
            "extracted from this or an earlier archive; each path may come from one member only "
            "(check data.download for duplicates)."
        ) from None
    except (OSError, RuntimeError, NotImplementedError) as exc:  # disk full, ...
        raise _failure(url, f"could not extract it ({exc})") from None


def _unsafe(url: str, member: str, why: str) -> StageError:
    return StageError(
        f"data.download: {url}: unsafe archive member '{_shown(member)}': {why}. Nothing was "
        "extracted; check where the archive comes from, or extract it yourself and set data.source."
    )


def _shown(name: str) -> str:
    """``name`` safe to print: escaped when it holds control characters, cut when long."""
    text = name if name.isprintable() else ascii(name)[1:-1]
    return text if len(text) <= 300 else text[:300] + "..."


def name_problem(name: str) -> str:
    """Why member ``name`` cannot be written under the extraction folder, or ``""``.

    Purely lexical (no ``realpath``, no file system): links are never extracted, so a name
    that passes stays inside the folder.
    """
    if any(unicodedata.category(c) == "Cs" for c in name):
        return "a name that is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "a control character in the name"
    if "\\" in name:
        return "a backslash in the name (a Windows separator, or a trick)"
    if name.startswith("/") or re.match(r"^[a-zA-Z]:", name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' path component"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"a name longer than {MAX_NAME_BYTES} bytes"
    if any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        return f"a path component longer than {MAX_COMPONENT_BYTES} bytes"
    return ""


def _plan(entries: Iterable[tuple[str, str, Any]], url: str, budget: _Budget) -> list[tuple[str, bool, Any]]:
    """Checks every member before any is written: ``(name, kind, ref)`` with kind ``file``,
    ``dir`` or why it is refused; returns ``(relative path, is_dir, ref)`` to extract."""
    plan = []
    for name, kind, ref in entries:
        budget.member()
        why = name_problem(name) or ("" if kind in ("file", "dir") else f"{kind} ({_REFUSED})")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if why or (kind == "file" and not parts):
            raise _unsafe(url, name, why or "no file name")
        skipped = parts and (parts[0] in _SKIPPED_FOLDERS or parts[-1] in _SKIPPED_FILES)
        if not skipped:
            plan.append((os.path.join(*parts) if parts else "", kind == "dir", ref))
    return plan


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return _KINDS.get(stat.filemode(mode)[0], "special file")
    if info.flag_bits & 0x1:
        return "an encrypted member"
    return "dir" if info.is_dir() or stat.S_ISDIR(mode) else "file"


def _tar_entries(tf: tarfile.TarFile, budget: _Budget) -> Iterator[tuple[str, str, Any]]:
    """Members with their kind; the sizes in tar headers lay out the stream, so they are
    checked against the limits here, before anything is written."""
    declared = 0
    for info in tf:
        if info.isreg():
            declared += info.size
            budget.check(budget.written + declared, declared)
        kind = (
            "file" if info.isreg() else "dir" if info.isdir() else _KINDS.get(_TAR_LETTERS.get(info.type, ""))
        )
        yield info.name, kind or f"tar type {info.type!r}", info


@contextlib.contextmanager
def _opened(
    archive: str, suffix: str, budget: _Budget
) -> Iterator[tuple[Iterator[Any], Callable[[Any], Any]]]:
    """The members of a zip or tar archive as ``(name, kind, member)``, and their reader."""
    if suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            yield ((m.filename, _zip_kind(m), m) for m in zf.infolist()), zf.open
    else:
        with tarfile.open(archive, "r:*") as tf:
            yield _tar_entries(tf, budget), tf.extractfile


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
