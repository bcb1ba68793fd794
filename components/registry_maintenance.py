"""Pushes in flight and what killed ones leave behind: staging folders, fingerprint claims,
``finetune registry fsck`` and ``finetune registry gc``.

A push (``components.push.stage``) takes these steps, each visible in the registry::

    1. staging/<time>-<id>/            the SavedModel, validated (locally; on GCS a temporary
                                       folder, and later only saved_model.pb is put here)
    2. fingerprints/<sha>.json         this export is being pushed: a second push of it waits
    3. claims/<n>.json                 number n, the digest of every file, the commit record
    4. <n>/ all but saved_model.pb     GCS only (TF Serving loads nothing without it)
    5. versions/<n>.json               the commit record
    6. <n>/saved_model.pb              local: rename staging/<id> -> <n>; GCS: the last upload
    7. fingerprints/<sha>.json removed, staging/<id> removed

So an integer folder holding ``saved_model.pb`` always has its commit record: TF Serving (which
ignores non-integer names) never loads a version that is not committed. A push killed between
steps leaves what ``fsck`` repairs: a version whose files are all there and match its claim's
digests is *completed* (commit record, then ``saved_model.pb``); one that cannot be is
*quarantined* (its files and commit record moved to ``quarantine/<n>-<time>/`` with a
``reason.json``; its claim stays, so the number is never reused). ``gc`` removes dead claims,
staging folders and fingerprint claims older than the grace period.

Both are for an operator to run while no push is running: anything younger than the grace
period (``--grace-hours``, 24 by default) is left alone, which protects a push in flight.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components import registry as reg
from components.core import storage
from components.core.stamps import utc_now

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_STAGING_TIME = "%Y%m%dT%H%M%SZ"
PB = reg.SAVED_MODEL_PB


def parse_time(text: Any, layout: str = _TIME_FORMAT) -> datetime.datetime | None:
    """A time as :func:`components.core.stamps.utc_now` writes it, or None when ``text`` is not one."""
    try:
        return datetime.datetime.strptime(text, layout).replace(tzinfo=datetime.UTC)
    except (TypeError, ValueError):
        return None


def new_staging_id() -> str:
    """A staging folder's name: its creation time (so ``gc`` can age it) and a random part."""
    return datetime.datetime.now(datetime.UTC).strftime(_STAGING_TIME) + "-" + uuid.uuid4().hex[:12]


def staging_uri(registry: str, name: str, staging_id: str, *parts: str) -> str:
    """``<name>/_registry/staging/<id>/<parts>``: a push's files before they are a version."""
    if not re.fullmatch(r"[0-9A-Za-z_-]+", staging_id or ""):
        raise ValueError(f"not a staging id: {staging_id!r}")
    return reg.meta_uri(registry, name, "staging", staging_id, *parts)


def fingerprint_uri(registry: str, name: str, fingerprint: str) -> str:
    """``_registry/fingerprints/<hex>.json``: held by the one push of an export in flight."""
    digest = fingerprint.removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"not a sha256 fingerprint: {fingerprint!r}")
    return reg.meta_uri(registry, name, "fingerprints", f"{digest}.json")


def hold_fingerprint(
    registry: str, name: str, fingerprint: str, claim: dict[str, Any]
) -> dict[str, Any] | None:
    """Takes the fingerprint claim of an export: None when taken, else the holder's claim
    (``{}`` when it does not parse). Of racing pushes of one export exactly one gets it."""
    path = fingerprint_uri(registry, name, fingerprint)
    body = json.dumps({"fingerprint": fingerprint, **claim}, indent=2) + "\n"
    try:
        storage.create_exclusive(path, body.encode())
        return None
    except storage.AlreadyExists:
        return reg.load_record(path, {}) or {}


def release_fingerprint(registry: str, name: str, fingerprint: str) -> None:
    """Gives the fingerprint claim back (after the commit, or when the push failed)."""
    storage.delete_file(fingerprint_uri(registry, name, fingerprint))


@dataclass(frozen=True)
class Action:
    """One thing ``fsck`` or ``gc`` did (or in a dry run would do), or left alone, and why."""

    verb: str  # completed | quarantined | removed | kept
    target: str
    reason: str
    apply: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def line(self, dry_run: bool) -> str:
        verb = f"would be {self.verb}" if dry_run and self.apply else self.verb
        return f"{verb}: {self.target}: {self.reason}"


@dataclass
class _Survey:
    """Everything of one model that fsck and gc look at, from one listing."""

    registry: str
    name: str
    grace: datetime.timedelta
    now: datetime.datetime
    claims: dict[int, dict[str, Any] | None] = field(default_factory=dict)  # None: does not parse
    records: set[int] = field(default_factory=set)  # a commit record file exists
    committed: set[int] = field(default_factory=set)  # ... and parses
    folders: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    staging: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def old(self, when: datetime.datetime | None) -> bool:
        """Older than the grace period (an unknown time counts as old)."""
        return when is None or self.now - when >= self.grace

    def claim_time(self, number: int) -> datetime.datetime | None:
        return parse_time((self.claims.get(number) or {}).get("claimed"))

    def staging_of(self, number: int) -> str | None:
        """The staging folder of a version's claim, when it is still there."""
        staging_id = (self.claims.get(number) or {}).get("staging")
        return staging_id if staging_id in self.staging else None

    def unfinished(self) -> list[int]:
        """Every number with a commit record, a folder or a staging folder, but not complete."""
        seen = self.records | set(self.folders) | {n for n in self.claims if self.staging_of(n)}
        return sorted(n for n in seen if not (n in self.committed and PB in self.folders.get(n, ())))


def _survey(registry: str, name: str, grace_hours: float) -> _Survey:
    now = datetime.datetime.now(datetime.UTC)
    s = _Survey(registry, name, datetime.timedelta(hours=grace_hours), now)
    base = reg.model_uri(registry, name)
    for info in storage.list_files(base):
        parts = reg.relative(info.uri, base)
        if len(parts) > 1 and parts[0].isdigit() and str(int(parts[0])) == parts[0] != "0":
            s.folders[int(parts[0])].add("/".join(parts[1:]))
        elif len(parts) > 3 and parts[:2] == [reg.META, "staging"]:
            s.staging[parts[2]].add("/".join(parts[3:]))
    claims = reg.numbered(reg.meta_uri(registry, name, "claims"))
    s.claims = {n: reg.load_record(uri, {"version": int}) for n, uri in claims.items()}
    s.records = set(reg.numbered(reg.meta_uri(registry, name, "versions")))
    s.committed = {int(r["version"]) for r in reg.versions(registry, name)}
    return s


# --- fsck ---------------------------------------------------------------------------------


def fsck(registry: str, name: str, grace_hours: float = 24.0, dry_run: bool = False) -> list[Action]:
    """Completes or quarantines every version of ``name`` that a killed push left unfinished.

    Looks at every number with a commit record, an integer folder, or a claim whose staging
    folder is still there. Run it while no push is running; younger claims are left alone.

    Returns:
        What was done (or, with ``dry_run``, would be done) and what was left alone, and why.
    """
    s = _survey(registry, name, grace_hours)
    actions = [_fsck_version(s, number) for number in s.unfinished()]
    for action in actions:
        if action.apply and not dry_run:
            action.apply()
    return actions


def _fsck_version(s: _Survey, number: int) -> Action:
    target = reg.version_uri(s.registry, s.name, number)
    files, claim = s.folders.get(number, set()), s.claims.get(number)
    if number in s.records - s.committed:
        return Action("kept", target, "its commit record does not parse (see above): fix or move it by hand")
    if claim is None and number not in s.records:
        why = "its claim does not parse" if number in s.claims else "no claim: not made by a push"
        return Action("kept", target, f"{why}; left alone")
    if not s.old(s.claim_time(number)):
        return Action("kept", target, f"claimed at {claim['claimed']}, within the grace period")
    plan = _completion(s, number, claim or {}, files)
    if isinstance(plan, dict):
        what = "committed, " if number not in s.committed else ""
        return Action(
            "completed",
            target,
            f"{what}{len(plan)} file(s) checked against its claim, {PB} last",
            lambda: _complete(s, number, claim or {}, plan),
        )
    pinned = sorted(a for a, v in reg.aliases_of(s.registry, s.name).items() if v == number)
    if pinned:
        plan += f" (alias {', '.join(pinned)} points at it: promote or roll back)"
    return Action("quarantined", target, plan, lambda: _quarantine(s, number, files, plan))


def _completion(s: _Survey, number: int, claim: dict[str, Any], files: set[str]) -> dict[str, str] | str:
    """``{relative name: where it is now}`` for every file of the version, each checked against
    its claim's digest, or why the version cannot be completed."""
    manifest = claim.get("files")
    if not isinstance(manifest, dict) or PB not in manifest:
        return "its claim lists no file digests to check against (not pushed by this finetune)"
    if number not in s.committed and not isinstance(claim.get("record"), dict):
        return "its claim holds no commit record"
    if files - set(manifest):
        return f"{sorted(files - set(manifest))[0]} in the folder is not in its claim"
    staging_id, sources = claim.get("staging"), {}
    for rel, digest in sorted(manifest.items()):
        if rel in files:
            sources[rel] = storage.join(reg.version_uri(s.registry, s.name, number), rel)
        elif rel in s.staging.get(staging_id, ()):
            sources[rel] = staging_uri(s.registry, s.name, staging_id, rel)
        else:
            return f"{rel} is missing (neither in the version folder nor in its staging folder)"
        if storage.sha256(sources[rel])[1] != digest:
            return f"{sources[rel]} does not match the digest in its claim"
    return sources


def _complete(s: _Survey, number: int, claim: dict[str, Any], sources: dict[str, str]) -> None:
    """Commit record first, then the missing files, ``saved_model.pb`` last (as a push does)."""
    target = reg.version_uri(s.registry, s.name, number)
    if number not in s.committed:
        reg.commit_version(s.registry, s.name, number, claim["record"])
    staging_id = s.staging_of(number)
    staged = staging_uri(s.registry, s.name, staging_id) if staging_id else None
    if staged and not storage.is_gcs(target) and all(v.startswith(staged) for v in sources.values()):
        storage.move_tree(staged, target)  # one rename, as the push would have done
        return
    for rel in sorted(sources, key=lambda r: r == PB):
        if not sources[rel].startswith(target):
            storage.copy_file(sources[rel], storage.join(target, rel))
    if staged:
        _delete_prefix(staged)


def _quarantine(s: _Survey, number: int, files: set[str], reason: str) -> None:
    """Moves the version's files (``saved_model.pb`` first), its staging folder and its commit
    record to ``quarantine/<n>-<time>/``, with a ``reason.json``; keeps the claim."""
    stamp = datetime.datetime.now(datetime.UTC).strftime(_STAGING_TIME)
    dest = reg.meta_uri(s.registry, s.name, "quarantine", f"{number}-{stamp}")
    body = {"version": number, "reason": reason, "files": sorted(files), "who": reg.who(), "when": utc_now()}
    storage.write_text(storage.join(dest, "reason.json"), json.dumps(body, indent=2) + "\n")
    _move(reg.version_uri(s.registry, s.name, number), storage.join(dest, "version"), files)
    staging_id = s.staging_of(number)
    if staging_id:
        source = staging_uri(s.registry, s.name, staging_id)
        _move(source, storage.join(dest, "staging"), s.staging[staging_id])
    if number in s.records:
        record = reg.meta_uri(s.registry, s.name, "versions", f"{number}.json")
        storage.copy_file(record, storage.join(dest, "commit.json"))
        storage.delete_file(record)


def _move(source: str, dest: str, files: set[str]) -> None:
    """Locally one rename; on GCS file by file, ``saved_model.pb`` first (no batch request)."""
    if not files:
        return
    if not storage.is_gcs(source):
        storage.move_tree(source, dest)
        return
    for rel in sorted(files, key=lambda r: r != PB):
        storage.copy_file(storage.join(source, rel), storage.join(dest, rel))
        storage.delete_file(storage.join(source, rel))


def _delete_prefix(prefix: str) -> None:
    """Deletes every file under ``prefix`` one by one (no batch request), then, locally, the folders."""
    for info in storage.list_files(prefix):
        storage.delete_file(info.uri)
    if not storage.is_gcs(prefix):
        storage.delete_tree(prefix)


# --- gc -----------------------------------------------------------------------------------


def gc(registry: str, name: str, grace_hours: float = 24.0, dry_run: bool = False) -> list[Action]:
    """Removes dead claims, staging folders and fingerprint claims older than the grace period.

    A claim is dead when its version has no commit record and no folder; the highest claim
    is kept so that its number is never reused. A staging folder that an unfinished version
    still needs is kept for ``fsck``.

    Returns:
        What was removed (or, with ``dry_run``, would be) and what was kept, and why.
    """
    s = _survey(registry, name, grace_hours)
    actions = _gc_claims(s) + _gc_staging(s) + _gc_fingerprints(s)
    for action in actions:
        if action.apply and not dry_run:
            action.apply()
    return actions


def _gc_claims(s: _Survey) -> list[Action]:
    highest = max(set(s.claims) | s.records, default=0)
    unfinished = set(s.unfinished())
    actions = []
    for number, claim in sorted(s.claims.items()):
        uri = reg.meta_uri(s.registry, s.name, "claims", f"{number}.json")
        if number in s.records and number not in unfinished:
            continue  # the claim of a complete version
        if number in unfinished:
            actions.append(Action("kept", uri, f"version {number} is unfinished: run fsck first"))
        elif claim is None:
            actions.append(Action("kept", uri, "does not parse (see above); left alone"))
        elif not s.old(s.claim_time(number)):
            actions.append(Action("kept", uri, f"claimed at {claim['claimed']}, within the grace period"))
        elif number == highest:
            actions.append(Action("kept", uri, "the highest number: kept so that it is never reused"))
        else:
            actions.append(Action("removed", uri, "dead claim", lambda u=uri: storage.delete_file(u)))
    return actions


def _gc_staging(s: _Survey) -> list[Action]:
    needed = {s.staging_of(n): n for n in s.unfinished() if s.staging_of(n)}
    actions = []
    for staging_id, files in sorted(s.staging.items()):
        uri = reg.meta_uri(s.registry, s.name, "staging", staging_id)
        when = parse_time(staging_id.split("-")[0], _STAGING_TIME) or _modified(uri, files)
        if staging_id in needed:
            actions.append(Action("kept", uri, f"unfinished version {needed[staging_id]} needs it: run fsck"))
        elif not s.old(when):
            actions.append(Action("kept", uri, "within the grace period (a push may be running)"))
        else:
            actions.append(Action("removed", uri, "staging folder", lambda u=uri: _delete_prefix(u)))
    return actions


def _gc_fingerprints(s: _Survey) -> list[Action]:
    root = reg.meta_uri(s.registry, s.name, "fingerprints")
    actions = []
    for info in storage.list_files(root):
        if not re.fullmatch(r"[0-9a-f]{64}\.json", "/".join(reg.relative(info.uri, root))):
            continue
        claim = reg.load_record(info.uri, {}) or {}
        when = parse_time(claim.get("claimed")) or _modified(info.uri, {""})
        if not s.old(when):
            actions.append(Action("kept", info.uri, "within the grace period (a push may be running)"))
        else:
            gone = lambda u=info.uri: storage.delete_file(u)  # noqa: E731
            actions.append(Action("removed", info.uri, "fingerprint claim of a push that ended", gone))
    return actions


def _modified(prefix: str, files: set[str]) -> datetime.datetime | None:
    """When the newest of ``files`` under ``prefix`` was written, or None."""
    times = []
    for rel in files:
        try:
            times.append(storage.modified(storage.join(prefix, rel) if rel else prefix))
        except (OSError, ValueError):
            continue
    return datetime.datetime.fromtimestamp(max(times), datetime.UTC) if times else None
