"""The serving registry: TensorFlow Serving's layout, so a server can watch it directly.

::

    <registry.uri>/<name>/<version>/saved_model.pb ...      integer versions, one SavedModel each
    <registry.uri>/<name>/<version>/assets.extra/           what made it: verdict, metrics, config, ...
    <registry.uri>/<name>/_registry/claims/<version>.json   a version number taken by a push
    <registry.uri>/<name>/_registry/versions/<version>.json the commit record: the version is complete
    <registry.uri>/<name>/_registry/aliases/<alias>/<seq>.json  one alias move each, never rewritten

TF Serving ignores the non-integer ``_registry`` folder. Every write that two processes could
race on is a :func:`pipeline.storage.create_exclusive` (on GCS an ``if_generation_match=0``
upload): a version number is claimed by creating its claim file, and an alias moves by
creating the next entry of its history, so of two racing writers exactly one wins and the
other learns it. A version counts only once its commit record exists, which a push writes
after every file of the SavedModel (``saved_model.pb`` last) is in place. The alias history is
the alias: its current version is the last entry's, and rollback replays the entries as a
stack (promote pushes, rollback pops).

This module is the registry's pure bookkeeping over the storage edge; the push stage
(``components.push``) stages, validates and uploads the SavedModel itself.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any

from pipeline import storage, utc_now
from pipeline.config import ALIAS_RE
from pipeline.errors import ConfigError, StageError

META = "_registry"
SAVED_MODEL_PB = "saved_model.pb"
_MAX_CLAIM_TRIES = 1000
_ENTRY_RE = re.compile(r"(\d+)\.json$")


class AliasConflict(StageError):
    """Another promotion or rollback moved the alias first; nothing was changed."""


def model_uri(registry: str, name: str) -> str:
    """``<registry>/<name>``: every version of one model (TF Serving's base path)."""
    return storage.join(registry, name)


def version_uri(registry: str, name: str, version: int) -> str:
    """``<registry>/<name>/<version>``: one published SavedModel."""
    return storage.join(registry, name, str(int(version)))


def _meta(registry: str, name: str, *parts: str) -> str:
    return storage.join(registry, name, META, *parts)


def who() -> str:
    """``user@host`` of this process, recorded with every push and alias move."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _relative(uri: str, prefix: str) -> list[str]:
    """The path segments of a listed ``uri`` below ``prefix`` (local or remote)."""
    return uri[len(prefix) :].replace("\\", "/").strip("/").split("/")


def _numbered(prefix: str) -> dict[int, str]:
    """``{number: uri}`` of the ``<number>.json`` files directly under ``prefix``."""
    found = {}
    for info in storage.list_files(prefix):
        rest = "/".join(_relative(info.uri, prefix))
        match = _ENTRY_RE.fullmatch(rest)
        if match:
            found[int(match.group(1))] = info.uri
    return found


def _read_json(uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise StageError(
            f"registry file {uri} is not valid JSON ({e}); it was not written by finetune"
        ) from None


# --- models and versions ------------------------------------------------------------------


def model_names(registry: str) -> list[str]:
    """The models of a registry: every ``<name>`` with at least one claim or record."""
    names = set()
    for info in storage.list_files(registry):
        parts = _relative(info.uri, registry)
        if len(parts) > 2 and parts[1] == META:
            names.add(parts[0])
    return sorted(names)


def versions(registry: str, name: str) -> list[dict[str, Any]]:
    """The committed versions of ``name``, oldest first, as their commit records."""
    records = _numbered(_meta(registry, name, "versions"))
    return [_read_json(records[n]) for n in sorted(records)]


def get_version(registry: str, name: str, version: int) -> dict[str, Any]:
    """The commit record of one version.

    Raises:
        StageError: the version is not committed (never pushed, or its push did not finish).
    """
    path = _meta(registry, name, "versions", f"{int(version)}.json")
    if not storage.exists(path):
        known = [r["version"] for r in versions(registry, name)]
        raise StageError(
            f"'{name}' has no version {version} in {registry} (committed versions: "
            f"{', '.join(map(str, known)) or 'none'}); see `finetune registry list {name}`"
        )
    return _read_json(path)


def find_by_fingerprint(registry: str, name: str, fingerprint: str) -> int | None:
    """The committed version whose export has this content fingerprint, or None."""
    for record in versions(registry, name):
        if record.get("fingerprint") == fingerprint:
            return int(record["version"])
    return None


def claim_version(registry: str, name: str, claim: dict[str, Any]) -> int:
    """Takes the next free version number for a push; of racing pushes exactly one gets each.

    The candidate number is one above every number claimed, committed or present as a
    folder; when another push creates that claim first, the next number is tried.
    """
    taken = set(_numbered(_meta(registry, name, "claims")))
    taken |= set(_numbered(_meta(registry, name, "versions")))
    number = max(taken, default=0) + 1
    for _ in range(_MAX_CLAIM_TRIES):
        while storage.exists(version_uri(registry, name, number)):  # a folder not made by a push
            number += 1
        body = json.dumps({"version": number, **claim}, indent=2) + "\n"
        try:
            storage.create_exclusive(_meta(registry, name, "claims", f"{number}.json"), body.encode())
            return number
        except storage.AlreadyExists:
            number += 1
    raise StageError(f"could not claim a version of '{name}' in {registry} after {_MAX_CLAIM_TRIES} tries")


def commit_version(registry: str, name: str, version: int, record: dict[str, Any]) -> dict[str, Any]:
    """Writes the commit record that makes a fully uploaded version count; returns it."""
    record = {"version": int(version), "name": name, **record}
    path = _meta(registry, name, "versions", f"{int(version)}.json")
    try:
        storage.create_exclusive(path, (json.dumps(record, indent=2) + "\n").encode())
    except storage.AlreadyExists:
        raise StageError(f"version {version} of '{name}' is already committed ({path})") from None
    return record


def is_complete(registry: str, name: str, version: int) -> bool:
    """Whether the version's ``saved_model.pb`` is in place (what TF Serving loads)."""
    return storage.exists(storage.join(version_uri(registry, name, version), SAVED_MODEL_PB))


# --- aliases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    """One entry of an alias's history: ``alias`` moved from ``previous`` to ``version``."""

    alias: str
    seq: int
    version: int
    previous: int | None
    action: str  # promote | rollback
    who: str
    when: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alias_names(registry: str, name: str) -> list[str]:
    """Every alias that was ever set for ``name``."""
    root = _meta(registry, name, "aliases")
    found = {_relative(info.uri, root)[0] for info in storage.list_files(root)}
    return sorted(a for a in found if a)


def alias_history(registry: str, name: str, alias: str) -> list[AliasMove]:
    """The moves of one alias, oldest first."""
    entries = _numbered(_meta(registry, name, "aliases", alias))
    return [AliasMove(**_read_json(entries[seq])) for seq in sorted(entries)]


def history(registry: str, name: str) -> list[AliasMove]:
    """The moves of every alias of ``name``, oldest first."""
    moves = [m for alias in alias_names(registry, name) for m in alias_history(registry, name, alias)]
    return sorted(moves, key=lambda m: (m.when, m.alias, m.seq))


def _stack(moves: list[AliasMove]) -> list[int]:
    """Replays an alias's history: a promote pushes its version, a rollback pops one."""
    stack: list[int] = []
    for move in moves:
        if move.action == "rollback":
            stack = stack[:-1]
        else:
            stack.append(move.version)
    return stack


def resolve_alias(registry: str, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, or None when the alias was never set.

    Raises:
        StageError: the alias points at a version whose SavedModel is gone.
    """
    moves = alias_history(registry, name, alias)
    if not moves:
        return None
    version = moves[-1].version
    if not is_complete(registry, name, version):
        raise StageError(
            f"alias '{alias}' of '{name}' points at version {version}, which has no saved_model.pb "
            f"in {version_uri(registry, name, version)}"
        )
    return version


def aliases_of(registry: str, name: str) -> dict[str, int]:
    """``{alias: version}`` for every alias of ``name`` that points somewhere."""
    current = {alias: alias_history(registry, name, alias) for alias in alias_names(registry, name)}
    return {alias: moves[-1].version for alias, moves in current.items() if moves}


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias):
        raise ConfigError(
            f"alias '{alias}': use 1-63 lowercase letters, digits, '-' or '_', starting with a letter"
        )


def _move(
    registry: str, name: str, alias: str, version: int, action: str, reason: str, moves: list[AliasMove]
) -> AliasMove:
    """Appends one move after ``moves`` (the history as read) by creating the next entry
    exclusively: if anyone appended since that read, this move loses.

    Raises:
        AliasConflict: another move created that entry first (nothing changed here).
    """
    last = moves[-1] if moves else None
    seq = last.seq + 1 if last else 1
    move = AliasMove(
        alias, seq, int(version), last.version if last else None, action, who(), utc_now(), reason
    )
    path = _meta(registry, name, "aliases", alias, f"{seq:08d}.json")
    try:
        storage.create_exclusive(path, (json.dumps(move.to_dict(), indent=2) + "\n").encode())
    except storage.AlreadyExists:
        winner = alias_history(registry, name, alias)[-1]
        raise AliasConflict(
            f"alias '{alias}' of '{name}' was moved by {winner.who} at {winner.when} (to version "
            f"{winner.version}) while this {action} ran; nothing was changed. Check "
            f"`finetune registry history {name}` and re-run if you still want version {version}"
        ) from None
    return move


def promote(registry: str, name: str, alias: str, version: int, reason: str = "") -> AliasMove | None:
    """Points ``alias`` at a committed, complete ``version`` (compare-and-swap).

    Returns:
        The recorded move, or None when the alias already points at ``version``.

    Raises:
        StageError: the version is not committed or its SavedModel is incomplete.
        AliasConflict: a racing move won.
    """
    _check_alias(alias)
    get_version(registry, name, version)
    if not is_complete(registry, name, version):
        raise StageError(f"version {version} of '{name}' has no saved_model.pb; it cannot be promoted")
    moves = alias_history(registry, name, alias)
    if moves and moves[-1].version == int(version):
        return None
    return _move(registry, name, alias, version, "promote", reason, moves)


def rollback(registry: str, name: str, alias: str, reason: str = "") -> AliasMove:
    """Moves ``alias`` back to the version it held before its current one was promoted.

    Raises:
        StageError: the alias has no earlier version to go back to.
        AliasConflict: a racing move won.
    """
    _check_alias(alias)
    moves = alias_history(registry, name, alias)
    stack = _stack(moves)
    if len(stack) < 2:
        held = f"only version {stack[-1]}" if stack else "no version"
        raise StageError(f"alias '{alias}' of '{name}' has {held} in its history: nothing to roll back to")
    return _move(registry, name, alias, stack[-2], "rollback", reason, moves)
