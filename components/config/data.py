"""The ``data`` section: where the labelled images are, the archives that fill it, and their rules."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from components.core.configtree import option, out_of_range
from components.core.errors import did_you_mean

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DOWNLOAD_SCHEMES = ("", "https", "http", "gs")  # "": a local path
DOWNLOAD_ENTRY_KEYS = ("url", "sha256")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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


@dataclass(frozen=True)
class SplitConfig:
    """Fractions used when the source has no split folders or manifest column."""

    train: float = option(0.8, help="fraction of the images for training when the source has no splits")
    eval: float = option(0.1, help="fraction for evaluation during training (early stopping, checkpoints)")
    test: float = option(0.1, help="fraction held out for the gate; the three must sum to 1")


@dataclass(frozen=True)
class DownloadLimitsConfig:
    """Bounds on what the archives of ``data.download`` may write (see ``components.preprocess.download``).

    Counted from the bytes actually written, never from the archives' headers:
    ``max_total_mb`` (MiB) for all archives together (a download also stops there),
    ``max_ratio`` for each archive's bytes written over its own size (an archive under 1 MiB
    counts as 1 MiB: a decompression bomb), ``max_members`` entries in all archives together.
    """

    max_total_mb: int = option(
        10_000, help="MiB all archives together may write, counted as written (a download also stops there)"
    )
    max_ratio: int = option(
        100, help="bytes each archive may write over its own size (under 1 MiB counts as 1 MiB)"
    )
    max_members: int = option(100_000, help="entries all archives together may hold")


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled images are.

    ``source`` is a directory of class folders, a directory of split folders, or a CSV or
    JSONL manifest of ``uri,label[,split]``; a local path or a gs:// URI. ``download`` lists
    .zip / .tar / .tar.gz / .tgz archives that fill a local ``source`` directory when it is
    missing or empty (see ``components.preprocess.download``); a ``source`` that holds files is used as it
    is. Each entry is an https:// or gs:// URL or a local path, or ``{url: ..., sha256: ...}``
    with the archive's pinned digest, which http:// needs; ``download_limits`` bound what the
    archives may write. Inputs must lie inside ``source`` (for a manifest: its own folder or
    bucket prefix), after ``..`` and symlinks are resolved, or inside one of
    ``allowed_roots``; others are dead letters.
    """

    source: str = option(
        "", help="required: class folders, split folders, or a CSV/JSONL manifest; local or gs://"
    )
    download: list[str | dict[str, str]] = option(
        help="archives (`https://`, `gs://` or a local path; `.zip .tar .tar.gz .tgz`), or "
        "`{url: ..., sha256: ...}` to pin one (required for `http://`; checked before extraction), "
        "extracted into `data.source` when that local folder is missing or empty (nothing appears "
        "there until every archive extracted; progress on stderr); only regular files and folders "
        "with plain names are extracted, links and devices fail the download; nothing is fetched "
        "when it holds files; not allowed with a gs:// or manifest source",
        factory=list,
    )
    download_limits: DownloadLimitsConfig = option(
        help="bounds on what the archives of `data.download` may write", factory=DownloadLimitsConfig
    )
    allowed_roots: list[str] = option(
        help="folders or gs:// prefixes outside `data.source` (a manifest's own folder) that inputs "
        "may also come from; anything else, after `..` and symlinks are resolved, is an "
        "`outside_source` dead letter, never read",
        factory=list,
    )
    split: SplitConfig = option(help="fractions when the source has no splits", factory=SplitConfig)


def check(d: DataConfig, needs_source: bool = True) -> list[str]:
    """Every problem of the ``data`` section (an empty ``source`` only when ``needs_source``)."""
    problems = []
    if needs_source and not d.source:
        problems.append("data.source: required (image folder, split folders, or CSV/JSONL manifest)")
    problems += _check_download(d)
    split = d.split
    fractions = {"train": split.train, "eval": split.eval, "test": split.test}
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"data.split.{key}: {value} must be between 0 and 1")
    if split.train <= 0:
        problems.append("data.split.train: must be above 0 (the label vocabulary comes from train)")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        problems.append(f"data.split: fractions {fractions} must sum to 1")
    return problems


def _check_download(d: DataConfig) -> list[str]:
    """``data.download``: archive entries (a URL, or ``{url, sha256}``), known suffixes and
    schemes, http:// only with a pinned sha256, only for a local folder; ``download_limits``."""
    problems = out_of_range(
        "data.download_limits.",
        (
            ("max_total_mb", d.download_limits.max_total_mb, 1, 10**8),
            ("max_ratio", d.download_limits.max_ratio, 1, 10**6),
            ("max_members", d.download_limits.max_members, 1, 10**9),
        ),
    )
    if not d.download:
        return problems
    for i, entry in enumerate(d.download):
        problems.extend(_check_archive_entry(f"data.download[{i}]", entry))
    if d.source and (url_scheme(d.source) or d.source.lower().endswith(MANIFEST_SUFFIXES)):
        problems.append(
            f"data.download: only fills a local data.source folder, but data.source is '{d.source}'; "
            "put the extracted images there yourself, or set data.download to []"
        )
    return problems


def _check_archive_entry(key: str, entry: str | dict[str, Any]) -> list[str]:
    """One ``data.download`` entry: a URL string, or a mapping with ``url`` and ``sha256``."""
    if isinstance(entry, dict):
        unknown = [str(k) for k in entry if k not in DOWNLOAD_ENTRY_KEYS]
        if unknown:
            return [
                f"{key}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], DOWNLOAD_ENTRY_KEYS)} "
                f"Valid keys: {', '.join(DOWNLOAD_ENTRY_KEYS)}"
            ]
        url, digest = entry.get("url"), entry.get("sha256")
        if not isinstance(url, str) or not url:
            return [f"{key}.url: required, the archive's URL or path (got {url!r})"]
        if digest is None:
            return [f"{key}.sha256: required in a mapping (or give the URL alone, as a string)"]
        if not isinstance(digest, str) or not SHA256_RE.match(digest.lower()):
            return [f"{key}.sha256: {digest!r} must be 64 hexadecimal characters (quote it in YAML)"]
    else:
        url, digest = entry, ""
    if url_scheme(url) not in DOWNLOAD_SCHEMES:
        return [f"{key}: '{url}' must be an https://, http:// or gs:// URL, or a local path"]
    if not archive_suffix(url):
        return [f"{key}: '{url}' is not an archive; expected a name ending in {', '.join(ARCHIVE_SUFFIXES)}"]
    if url_scheme(url) == "http" and not digest:
        return [
            f"{key}: '{url}' is plain http://, which anyone on the way can change: use https://, "
            "or pin the archive as {url: ..., sha256: <its 64-hex sha256>}"
        ]
    return []
