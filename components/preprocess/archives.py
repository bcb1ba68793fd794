"""Extracts the untrusted archives of ``data.download``: checked first, written file by file.

Only regular files and folders are extracted: a symbolic or hard link, device, FIFO or other
special member (or an encrypted one) fails the whole archive before anything is written, so no
path ever leads through a link (tarfile's ``data`` filter trusts ``os.path.realpath``, which
CVE-2025-4517 defeats). Names are checked as text (:func:`name_problem`). Each file is streamed
into a new file (``open(..., "xb")``; the archive's modes, owners and times are ignored), and a
:class:`Budget` counts the bytes really written (and, first, the sizes tar headers declare)
against ``data.download_limits``. ``components.preprocess.download`` fetches the archives and places what
this module extracted.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from components.core.errors import StageError

if TYPE_CHECKING:
    from components.config import DownloadLimitsConfig

MAX_NAME_BYTES = 1024  # a member's whole path, UTF-8
MAX_COMPONENT_BYTES = 255  # one folder or file name (NAME_MAX)
RATIO_FLOOR_BYTES = 2**20  # max_ratio counts a smaller archive as this large
_MIB = 2**20
_CHUNK = 1024 * 1024
_SKIPPED_FOLDERS = ("__MACOSX",)
_SKIPPED_FILES = (".DS_Store",)
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


def failure(url: str, why: str) -> StageError:
    """The error for a URL that could not be used, with what to do about it."""
    return StageError(
        f"data.download: {url}: {why}. Check the URL and the network and run again, or download "
        "and extract the archives yourself and set data.source to that folder (data.download is "
        "only used while data.source is missing or empty)."
    )


class Budget:
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
            raise over(self.url, f"more than {self.limits.max_members} members", "max_members")

    def check(self, total: int, expanded: int) -> None:
        """Raises when ``total`` bytes in all, or ``expanded`` from this archive, are too many."""
        if total > self.max_bytes:
            reached = f"{total / _MIB:.1f} MiB"
            raise over(
                self.url, f"more than {self.limits.max_total_mb} MiB in all ({reached})", "max_total_mb"
            )
        if expanded > self.limits.max_ratio * max(self.size, RATIO_FLOOR_BYTES):
            reached = f"{expanded / _MIB:.1f} MiB from a {self.size / _MIB:.3f} MiB archive"
            why = f"expands more than {self.limits.max_ratio} times its size ({reached})"
            raise over(self.url, why, "max_ratio")

    def add(self, count: int) -> None:
        """Counts ``count`` bytes about to be written (raises first when they are too many)."""
        self.check(self.written + count, self.expanded + count)
        self.written, self.expanded = self.written + count, self.expanded + count


def over(url: str, why: str, key: str) -> StageError:
    """The error for an archive over a ``data.download_limits`` key."""
    return StageError(
        f"data.download: {url}: {why}, over data.download_limits.{key}. Nothing was placed in "
        f"data.source; raise data.download_limits.{key} if the archive is expected to be this large."
    )


def extract(archive: str, suffix: str, url: str, root: str, budget: Budget) -> None:
    """Extracts a .zip or tar archive into ``root``: every member is checked (:func:`_plan`)
    before any is written, then regular files are streamed into new files (no
    ``tarfile.extract``: the archive's modes, owners and times are ignored, never setuid).

    Raises:
        StageError: the archive is corrupt, a member is unsafe or already extracted, or a
            limit is reached.
    """
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
        raise failure(url, f"not a valid {suffix} archive ({exc}); the file may be truncated") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise StageError(
            f"data.download: {url}: '{_shown(os.path.relpath(exc.filename or '', root))}' was already "
            "extracted from this or an earlier archive; each path may come from one member only "
            "(check data.download for duplicates)."
        ) from None
    except (OSError, RuntimeError, NotImplementedError) as exc:  # disk full, ...
        raise failure(url, f"could not extract it ({exc})") from None


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


def _plan(entries: Iterable[tuple[str, str, Any]], url: str, budget: Budget) -> list[tuple[str, bool, Any]]:
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


def _tar_entries(tf: tarfile.TarFile, budget: Budget) -> Iterator[tuple[str, str, Any]]:
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
    archive: str, suffix: str, budget: Budget
) -> Iterator[tuple[Iterator[Any], Callable[[Any], Any]]]:
    """The members of a zip or tar archive as ``(name, kind, member)``, and their reader."""
    if suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            yield ((m.filename, _zip_kind(m), m) for m in zf.infolist()), zf.open
    else:
        with tarfile.open(archive, "r:*") as tf:
            yield _tar_entries(tf, budget), tf.extractfile
