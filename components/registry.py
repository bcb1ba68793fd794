"""The serving registry: TensorFlow Serving's layout, so a server can watch it directly.

::

    <registry.uri>/<name>/<version>/saved_model.pb ...      integer versions, one SavedModel each
    <registry.uri>/<name>/<version>/assets.extra/           what made it: verdict, metrics, config, ...
    <registry.uri>/<name>/_registry/claims/<version>.json   a version number taken by a push, with
                                                            the digest of every file it publishes
    <registry.uri>/<name>/_registry/versions/<version>.json the commit record (written first)
    <registry.uri>/<name>/_registry/aliases/<alias>/<seq>.json  one alias move each, never rewritten
    <registry.uri>/<name>/_registry/fingerprints/<sha>.json one export's push, held while in flight
    <registry.uri>/<name>/_registry/staging/<time>-<id>/    a push's files before they are a version
    <registry.uri>/<name>/_registry/quarantine/<v>-<time>/  what ``fsck`` moved out of the way

TF Serving ignores the non-integer ``_registry`` folder. Every write that two processes could
race on is a :func:`components.core.storage.create_exclusive` (on GCS an ``if_generation_match=0``
upload): a version number, an export's push and an alias's next history entry are each taken
by creating a file, so of two racing writers exactly one wins. A version is *complete* when it
has its commit record and its ``saved_model.pb``; a push writes the record first and makes
``saved_model.pb`` appear last, so TF Serving never loads an uncommitted version, and ``fsck``
(:mod:`components.registry_maintenance`) finishes or quarantines what a killed push left. An
alias is its history: the last entry's version; rollback replays it as a stack.

Every function that builds a path checks the model name (the rule of ``config.name``) and the
alias (``ALIAS_RE``), so ``../outside`` never becomes a path; a record that does not parse is
named on stderr and skipped. The push stage (``components.push``) does the uploading.

Slightly over 400 lines on purpose: the protocol's paths, versions and aliases read best in
one module; its repairs (fsck, gc) live in :mod:`components.registry_maintenance`.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

from components.config.registry import ALIAS_RE, ALIAS_RULE, NAME_RE, NAME_RULE  # the rules, in one place
from components.core import storage
from components.core.errors import ConfigError, StageError
from components.core.stamps import utc_now

META = "_registry"
SAVED_MODEL_PB = "saved_model.pb"
_MAX_CLAIM_TRIES = 1000
_MAX_RECORD_BYTES = 16 << 20
_ENTRY_RE = re.compile(r"(\d+)\.json$")


class AliasConflict(StageError):
    """Another promotion or rollback moved the alias first; nothing was changed."""


def warn(message: str) -> None:
    """One ``finetune: warning: ...`` line on stderr (a record skipped, a version not served)."""
    print(f"finetune: warning: {message}", file=sys.stderr, flush=True)


def _segment(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"{what} {value!r}: use {rule}")
    return value


def check_name(name: str) -> str:
    """Returns ``name`` if it is a valid model name (one path segment), else raises ConfigError."""
    return _segment(name, NAME_RE, "model name", f"{NAME_RULE} (it is a folder of the registry, e.g. beans)")


def check_alias(alias: str) -> str:
    """Returns ``alias`` if it is a valid alias (one path segment), else raises ConfigError."""
    return _segment(alias, ALIAS_RE, "alias", f"{ALIAS_RULE} (e.g. production)")


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"version {version!r}: must be a whole number of at least 1")
    return version


def model_uri(registry: str, name: str) -> str:
    """``<registry>/<name>``: every version of one model (TF Serving's base path)."""
    return storage.join(registry, check_name(name))


def version_uri(registry: str, name: str, version: int) -> str:
    """``<registry>/<name>/<version>``: one published SavedModel."""
    return storage.join(model_uri(registry, name), str(_check_version(version)))


def meta_uri(registry: str, name: str, *parts: str) -> str:
    """``<registry>/<name>/_registry/<parts>``: the bookkeeping TF Serving does not read."""
    return storage.join(model_uri(registry, name), META, *parts)


def who() -> str:
    """``user@host`` of this process, recorded with every push and alias move."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def relative(uri: str, prefix: str) -> list[str]:
    """The path segments of a listed ``uri`` below ``prefix`` (local or remote)."""
    return uri[len(prefix) :].replace("\\", "/").strip("/").split("/")


def numbered(prefix: str) -> dict[int, str]:
    """``{number: uri}`` of the ``<number>.json`` files directly under ``prefix``."""
    found = {}
    for info in storage.list_files(prefix):
        match = _ENTRY_RE.fullmatch("/".join(relative(info.uri, prefix)))
        if match:
            found[int(match.group(1))] = info.uri
    return found


def load_record(uri: str, required: dict[str, type | tuple[type, ...]]) -> dict[str, Any] | None:
    """A JSON object with ``required`` fields of the given types, or None (with a warning
    naming the file) when it is not one; None without a warning when it vanished meanwhile."""
    try:
        data = json.loads(storage.read_bytes(uri, _MAX_RECORD_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, storage.FileTooLarge) as e:  # JSONDecodeError, UnicodeDecodeError
        warn(f"skipped {uri}: not a registry record ({e})")
        return None
    if not isinstance(data, dict):
        warn(f"skipped {uri}: not a registry record (a JSON {type(data).__name__}, not an object)")
        return None
    for key, kinds in required.items():
        value = data.get(key)
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            value = None  # JSON true is not a version number
        if not isinstance(value, kinds):
            warn(f"skipped {uri}: field '{key}' is missing or has the wrong type ({value!r})")
            return None
    return data


# --- models and versions ------------------------------------------------------------------


def model_names(registry: str) -> list[str]:
    """The models of a registry: every valid ``<name>`` with at least one claim or record."""
    names = set()
    for info in storage.list_files(registry):
        parts = relative(info.uri, registry)
        if len(parts) > 2 and parts[1] == META:
            names.add(parts[0])
    for bad in sorted(n for n in names if not NAME_RE.fullmatch(n)):
        warn(f"skipped {storage.join(registry, bad)}: {bad!r} is not a valid model name")
    return sorted(n for n in names if NAME_RE.fullmatch(n))


def _commit_path(registry: str, name: str, version: int) -> str:
    return meta_uri(registry, name, "versions", f"{_check_version(version)}.json")


def _load_commit(uri: str, number: int) -> dict[str, Any] | None:
    record = load_record(uri, {"version": int})
    if record is not None and record["version"] != number:
        warn(f"skipped {uri}: it says version {record['version']}")
        return None
    return record


def versions(registry: str, name: str) -> list[dict[str, Any]]:
    """The committed versions of ``name``, oldest first, as their commit records (a record that
    does not parse is reported and skipped). Committed is not complete: see :func:`is_complete`."""
    records = numbered(meta_uri(registry, name, "versions"))
    loaded = [_load_commit(records[n], n) for n in sorted(records)]
    return [r for r in loaded if r is not None]


def get_version(registry: str, name: str, version: int) -> dict[str, Any]:
    """The commit record of one version.

    Raises:
        StageError: the version is not committed (never pushed, or its push did not finish),
            or its record does not parse.
    """
    path = _commit_path(registry, name, version)
    if not storage.exists(path):
        known = [r["version"] for r in versions(registry, name)]
        raise StageError(
            f"'{name}' has no version {version} in {registry} (committed versions: "
            f"{', '.join(map(str, known)) or 'none'}); see `finetune registry list {name}`"
        )
    record = _load_commit(path, int(version))
    if record is None:
        raise StageError(f"the commit record {path} of version {version} of '{name}' is corrupt (see above)")
    return record


def missing_parts(registry: str, name: str, version: int) -> list[str]:
    """What keeps a version from being complete: its commit record or ``saved_model.pb``."""
    record, graph = _commit_path(registry, name, version), version_uri(registry, name, version)
    missing = [] if storage.exists(record) else [f"no commit record {record}"]
    if not storage.exists(storage.join(graph, SAVED_MODEL_PB)):
        missing.append(f"no {SAVED_MODEL_PB} in {graph}")
    return missing


def is_complete(registry: str, name: str, version: int) -> bool:
    """Whether the version has its commit record and its ``saved_model.pb``."""
    return not missing_parts(registry, name, version)


def check_complete(registry: str, name: str, version: int, doing: str) -> None:
    """Raises StageError naming what is missing when the version is not complete."""
    missing = missing_parts(registry, name, version)
    if missing:
        raise StageError(
            f"cannot {doing}: version {version} of '{name}' is not complete ({'; '.join(missing)}); "
            f"see `finetune registry fsck {name}`"
        )


def find_by_fingerprint(registry: str, name: str, fingerprint: str) -> int | None:
    """The complete version whose export has this content fingerprint, or None."""
    for record in versions(registry, name):
        if record.get("fingerprint") == fingerprint and is_complete(registry, name, record["version"]):
            return int(record["version"])
    return None


def claim_version(registry: str, name: str, claim: dict[str, Any]) -> int:
    """Takes the next free version number for a push; of racing pushes exactly one gets each.

    The candidate number is one above every number claimed, committed or present as a
    folder; when another push creates that claim first, the next number is tried.
    """
    taken = set(numbered(meta_uri(registry, name, "claims")))
    taken |= set(numbered(meta_uri(registry, name, "versions")))
    number = max(taken, default=0) + 1
    for _ in range(_MAX_CLAIM_TRIES):
        while storage.exists(version_uri(registry, name, number)):  # a folder not made by a push
            number += 1
        body = json.dumps({"version": number, **claim}, indent=2) + "\n"
        try:
            storage.create_exclusive(meta_uri(registry, name, "claims", f"{number}.json"), body.encode())
            return number
        except storage.AlreadyExists:
            number += 1
    raise StageError(f"could not claim a version of '{name}' in {registry} after {_MAX_CLAIM_TRIES} tries")


def commit_version(registry: str, name: str, version: int, record: dict[str, Any]) -> dict[str, Any]:
    """Writes the commit record that makes a version count (its files complete); returns it."""
    record = {**record, "version": _check_version(version), "name": check_name(name)}
    path = _commit_path(registry, name, version)
    try:
        storage.create_exclusive(path, (json.dumps(record, indent=2) + "\n").encode())
    except storage.AlreadyExists:
        raise StageError(f"version {version} of '{name}' is already committed ({path})") from None
    return record


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


_MOVE_TYPES: dict[str, type | tuple[type, ...]] = {
    "alias": str, "seq": int, "version": int, "previous": (int, type(None)), "action": str,
    "who": str, "when": str, "reason": str,
}  # fmt: skip


def alias_names(registry: str, name: str) -> list[str]:
    """Every alias that was ever set for ``name`` (a folder that is no alias is reported)."""
    root = meta_uri(registry, name, "aliases")
    found = {relative(info.uri, root)[0] for info in storage.list_files(root)}
    for bad in sorted(a for a in found if not ALIAS_RE.fullmatch(a)):
        warn(f"skipped {storage.join(root, bad)}: {bad!r} is not a valid alias")
    return sorted(a for a in found if ALIAS_RE.fullmatch(a))


def _alias_log(registry: str, name: str, alias: str) -> tuple[list[AliasMove], int]:
    """The valid moves of one alias, oldest first, and the highest entry number on file
    (a corrupt entry is skipped but still takes its number)."""
    entries = numbered(meta_uri(registry, name, "aliases", check_alias(alias)))
    moves = []
    for seq in sorted(entries):
        data = load_record(entries[seq], _MOVE_TYPES)
        if data is None:
            continue
        move = AliasMove(**{k: data[k] for k in _MOVE_TYPES})
        if move.alias != alias or move.seq != seq or move.action not in ("promote", "rollback"):
            warn(f"skipped {entries[seq]}: it does not describe entry {seq} of alias '{alias}'")
            continue
        moves.append(move)
    return moves, max(entries, default=0)


def alias_history(registry: str, name: str, alias: str) -> list[AliasMove]:
    """The moves of one alias, oldest first."""
    return _alias_log(registry, name, alias)[0]


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
        StageError: the alias points at a version that is not complete.
    """
    moves = alias_history(registry, name, alias)
    if not moves:
        return None
    check_complete(registry, name, moves[-1].version, f"use alias '{alias}'")
    return moves[-1].version


def aliases_of(registry: str, name: str) -> dict[str, int]:
    """``{alias: version}`` for every alias of ``name`` that points somewhere."""
    current = {alias: alias_history(registry, name, alias) for alias in alias_names(registry, name)}
    return {alias: moves[-1].version for alias, moves in current.items() if moves}


def _move(
    registry: str, name: str, alias: str, version: int, action: str, reason: str, log: tuple[list, int]
) -> AliasMove:
    """Appends one move after ``log`` (the history as read) by creating the next entry
    exclusively: if anyone appended since that read, this move loses.

    Raises:
        AliasConflict: another move created that entry first (nothing changed here).
    """
    moves, seq = log[0], log[1] + 1
    previous = moves[-1].version if moves else None
    move = AliasMove(alias, seq, int(version), previous, action, who(), utc_now(), reason)
    path = meta_uri(registry, name, "aliases", alias, f"{seq:08d}.json")
    try:
        storage.create_exclusive(path, (json.dumps(move.to_dict(), indent=2) + "\n").encode())
    except storage.AlreadyExists:
        winner = (alias_history(registry, name, alias) or [move])[-1]
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
        ConfigError: ``name``, ``alias`` or ``version`` is not valid.
        StageError: the version is not committed or not complete (the alias is unchanged).
        AliasConflict: a racing move won.
    """
    check_alias(alias)
    get_version(registry, name, version)
    check_complete(registry, name, version, f"promote '{alias}' to version {version}")
    log = _alias_log(registry, name, alias)
    if log[0] and log[0][-1].version == int(version):
        return None
    return _move(registry, name, alias, version, "promote", reason, log)


def rollback(registry: str, name: str, alias: str, reason: str = "") -> AliasMove:
    """Moves ``alias`` back to the version it held before its current one was promoted.

    Raises:
        ConfigError: ``name`` or ``alias`` is not valid.
        StageError: the alias has no earlier version to go back to, or that version is not
            complete (the alias is unchanged).
        AliasConflict: a racing move won.
    """
    log = _alias_log(registry, name, alias)
    stack = _stack(log[0])
    if len(stack) < 2:
        held = f"only version {stack[-1]}" if stack else "no version"
        raise StageError(f"alias '{alias}' of '{name}' has {held} in its history: nothing to roll back to")
    check_complete(registry, name, stack[-2], f"roll '{alias}' back to version {stack[-2]}")
    return _move(registry, name, alias, stack[-2], "rollback", reason, log)
