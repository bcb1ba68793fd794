"""Finding the labelled images: class folders, split folders or a CSV/JSONL manifest.

Runs in the driver, before the Beam pipeline: it lists names and sizes only (no image is
read here) and turns every file or manifest row into a :class:`Candidate`. A row that
cannot be a training example (no label, an unknown split) still becomes a candidate, with
the problem recorded, so the pipeline sends it to the dead letters instead of losing it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace

from components.config.data import MANIFEST_SUFFIXES
from components.core import storage
from components.core.errors import ConfigError

# Folder or manifest split names -> the pipeline's split names.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "eval": "eval",
    "validation": "eval",
    "val": "eval",
    "valid": "eval",
    "test": "test",
    "testing": "test",
}
_HEADER_NAMES = {"uri", "path", "image", "file", "filename"}

# Problems found while listing (the pipeline turns them into dead letters).
MISSING_LABEL = "missing_label"
BAD_MANIFEST_ROW = "bad_manifest_row"
BAD_LABEL = "bad_label"
OUTSIDE_SOURCE = "outside_source"
MAX_LABEL_CHARS = 200


def label_problem(label: str) -> str:
    """Why ``label`` cannot be a class name (empty: it can). Refused: control, format and
    line-separator characters (a newline or U+2028 would split the class in the one-per-line
    vocabulary file and shift every later class id), and names over ``MAX_LABEL_CHARS``."""
    if len(label) > MAX_LABEL_CHARS:
        return f"label of {len(label)} characters; at most {MAX_LABEL_CHARS}"
    for char in label:
        if unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp"):
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            return f"label {label!r} holds {name}, not allowed in a class name"
    return ""


@dataclass(frozen=True)
class Candidate:
    """One input image as listed, before it is read.

    Attributes:
        uri: Where the bytes are (local path or gs:// URI).
        label: The class name, or ``""`` when there is none.
        split: The split the source assigned (``train``/``eval``/``test``), or ``""``.
        size: Size in bytes when the listing knows it, else -1.
        problem: A dead-letter reason found while listing, or ``""``.
        detail: Words on the problem.
        id: Position in the sorted listing: tells apart two manifest rows naming one file.
    """

    uri: str
    label: str = ""
    split: str = ""
    size: int = -1
    problem: str = ""
    detail: str = ""
    id: int = -1

    def to_json(self) -> str:
        """One JSON line, the format the pipeline reads candidates in."""
        return json.dumps(self.__dict__, sort_keys=True)  # the fields (asdict copies them deeply)

    @staticmethod
    def from_json(line: str) -> Candidate:
        """Parses a line written by :meth:`to_json`."""
        return Candidate(**json.loads(line))


@dataclass(frozen=True)
class Listing:
    """What :func:`discover` found.

    Attributes:
        layout: ``class_folders``, ``split_folders`` or ``manifest``.
        candidates: Every file or row, sorted by uri.
        has_eval: Whether the source assigns an eval split itself (else it is carved out of
            train, or of everything for class folders).
    """

    layout: str
    candidates: list[Candidate]
    has_eval: bool


def jsonl_chunks(candidates: Sequence[Candidate], per_chunk: int = 4096):
    """The candidate list as JSON lines, a few thousand at a time (never one string of all):
    what a stage writes for its Beam graph to read back, so the driver holds nothing per
    image while the graph runs."""
    for start in range(0, len(candidates), per_chunk):
        yield "".join(c.to_json() + "\n" for c in candidates[start : start + per_chunk]).encode("utf-8")


def discover(source: str, allowed_roots: Sequence[str] = ()) -> Listing:
    """Lists ``source`` and returns one candidate per file or manifest row.

    Every candidate must lie inside the source (a manifest's own folder or bucket prefix, or
    the class folders) or inside one of ``allowed_roots`` (``data.allowed_roots``), once
    ``..`` and, locally, symlinks are resolved: a manifest row naming ``/etc/passwd`` or
    ``../x.jpg``, or a symlink leading out of the folder, is an ``outside_source`` dead letter,
    never read.

    Raises:
        ConfigError: when the source does not exist or holds no files.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES):
        try:
            candidates = _from_manifest(source)
        except FileNotFoundError:
            raise ConfigError(f"data.source: manifest not found: {source}") from None
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        return _listing("manifest", _confine(candidates, [base, *allowed_roots]))
    files = storage.list_files(source, special=True)  # FIFOs, devices, dangling links: dead letters
    if not files:
        raise ConfigError(
            f"data.source: no files under {source}. Expected class folders (<class>/<image>), "
            "split folders (train|validation|test/<class>/<image>) or a .csv/.jsonl manifest."
        )
    base = source.rstrip("/") + "/"
    relative = [(f, f.uri[len(base) :].split("/")) for f in files]
    top = {parts[0] for _, parts in relative if len(parts) > 1}
    roots = [source, *allowed_roots]
    if top and top <= set(SPLIT_ALIASES) and any(SPLIT_ALIASES[t] == "train" for t in top):
        candidates = [_from_path(f, parts, with_split=True) for f, parts in relative]
        return _listing("split_folders", _confine(candidates, roots))
    return _listing(
        "class_folders", _confine([_from_path(f, parts, with_split=False) for f, parts in relative], roots)
    )


def discover_images(source: str, allowed_roots: Sequence[str] = ()) -> Listing:
    """Lists unlabelled images to classify (``finetune predict``): every file under a folder
    or gs:// prefix, recursively, or every row of a CSV/JSONL manifest (its ``uri``/``path``
    column or key, or a CSV's first column; labels and splits are not read). The same rules as
    :func:`discover`: rows confined to the source or ``allowed_roots``, special files and bad
    rows kept as candidates with their problem, the layout ``folder`` or ``manifest``.

    Raises:
        ConfigError: when the source does not exist or holds no files.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES):
        try:
            text = storage.read_text(source)
        except FileNotFoundError:
            raise ConfigError(f"predict.input: manifest not found: {source}") from None
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        rows = _csv_rows(text) if source.lower().endswith(".csv") else _jsonl_rows(text)
        candidates = [_image_row(source, base, n, row) for n, row in rows]
        return _listing("manifest", _confine(candidates, [base, *allowed_roots]))
    files = storage.list_files(source, special=True)
    if not files:
        raise ConfigError(
            f"predict.input: no files under {source}; expected a folder of images or a .csv/.jsonl manifest"
        )
    candidates = [Candidate(f.uri, size=f.size) for f in files]
    return _listing("folder", _confine(candidates, [source, *allowed_roots]))


def _image_row(manifest: str, base: str, line: int, row: dict | str) -> Candidate:
    if isinstance(row, str):
        return Candidate(f"{manifest}#L{line}", problem=BAD_MANIFEST_ROW, detail=row)
    path = str(row.get("uri") or row.get("path") or "").strip()
    if not path:
        return Candidate(f"{manifest}#L{line}", problem=BAD_MANIFEST_ROW, detail=f"line {line}: no uri")
    return Candidate(path if storage.is_absolute(path) else storage.join(base, path))


def _confine(candidates: list[Candidate], roots: Sequence[str]) -> list[Candidate]:
    """The candidates, those outside every root turned into ``outside_source`` problems."""
    resolved = [_resolved(r) for r in roots]
    confined = []
    for c in candidates:
        where = _resolved(c.uri)
        if c.problem or c.uri.startswith(tuple(f"{r}#" for r in roots)) or _inside(where, resolved):
            confined.append(c)
            continue
        detail = (
            f"'{c.uri}' resolves to '{where}', outside {roots[0]}; add the folder or prefix to "
            "data.allowed_roots to allow it"
        )
        confined.append(replace(c, label="", problem=OUTSIDE_SOURCE, detail=detail))
    return confined


def _resolved(uri: str) -> str:
    """``uri`` with ``.``, ``..`` and (locally) symlinks resolved."""
    if storage.is_gcs(uri):
        return "gs://" + posixpath.normpath(uri[len("gs://") :])
    return os.path.realpath(uri)


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _listing(layout: str, candidates: list[Candidate]) -> Listing:
    ordered = sorted(candidates, key=lambda c: (c.uri, c.label, c.split))
    candidates = [replace(c, id=i) for i, c in enumerate(ordered)]
    return Listing(layout, candidates, has_eval=any(c.split == "eval" for c in candidates))


def _from_path(info: storage.FileInfo, parts: list[str], with_split: bool) -> Candidate:
    """``<class>/.../<file>`` or ``<split>/<class>/.../<file>``; deeper folders keep the class."""
    if with_split:
        split, parts = SPLIT_ALIASES.get(parts[0], ""), parts[1:]
        if not split:
            return Candidate(
                info.uri,
                size=info.size,
                problem=MISSING_LABEL,
                detail=f"'{parts[0]}' is not a split folder ({', '.join(SPLIT_ALIASES)})",
            )
    else:
        split = ""
    if len(parts) < 2:
        where = "split folder" if with_split else "source folder"
        return Candidate(
            info.uri,
            split=split,
            size=info.size,
            problem=MISSING_LABEL,
            detail=f"file lies directly in the {where}, not in a class folder",
        )
    problem = label_problem(parts[0])
    if problem:
        return Candidate(info.uri, split=split, size=info.size, problem=BAD_LABEL, detail=problem)
    return Candidate(info.uri, label=parts[0], split=split, size=info.size)


def _from_manifest(uri: str) -> list[Candidate]:
    text = storage.read_text(uri)
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    if uri.lower().endswith(".csv"):
        rows = _csv_rows(text)
    else:
        rows = _jsonl_rows(text)
    return [_manifest_candidate(uri, base, n, row) for n, row in rows]


def _csv_rows(text: str) -> list[tuple[int, dict | str]]:
    reader = list(csv.reader(io.StringIO(text)))
    header = ["uri", "label", "split"]
    start = 0
    if reader and reader[0] and reader[0][0].strip().lower() in _HEADER_NAMES:
        header = [h.strip().lower() for h in reader[0]]
        header[0] = "uri"
        start = 1
    rows: list[tuple[int, dict | str]] = []
    for n, cells in enumerate(reader[start:], start=start + 1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            rows.append((n, f"{len(cells)} columns, expected at most {len(header)}: {cells}"))
            continue
        rows.append((n, dict(zip(header, (c.strip() for c in cells), strict=False))))
    return rows


def _jsonl_rows(text: str) -> list[tuple[int, dict | str]]:
    rows: list[tuple[int, dict | str]] = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is valid inside JSON
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, f"not valid JSON: {e}"))
            continue
        rows.append((n, row if isinstance(row, dict) else f"expected an object, got {line[:80]}"))
    return rows


def _manifest_candidate(manifest: str, base: str, line: int, row: dict | str) -> Candidate:
    if isinstance(row, str):
        return Candidate(f"{manifest}#L{line}", problem=BAD_MANIFEST_ROW, detail=row)
    path = str(row.get("uri") or row.get("path") or "").strip()
    if not path:
        return Candidate(f"{manifest}#L{line}", problem=BAD_MANIFEST_ROW, detail="no uri")
    uri = path if storage.is_absolute(path) else storage.join(base, path)
    label = str(row.get("label") or "").strip()
    raw_split = str(row.get("split") or "").strip().lower()
    split = SPLIT_ALIASES.get(raw_split, "")
    if raw_split and not split:
        return Candidate(
            uri,
            label=label,
            problem=BAD_MANIFEST_ROW,
            detail=f"line {line}: unknown split '{raw_split}' ({', '.join(SPLIT_ALIASES)})",
        )
    if not label:
        return Candidate(uri, split=split, problem=MISSING_LABEL, detail=f"line {line}: empty label")
    if label_problem(label):
        return Candidate(uri, split=split, problem=BAD_LABEL, detail=f"line {line}: {label_problem(label)}")
    return Candidate(uri, label=label, split=split)
