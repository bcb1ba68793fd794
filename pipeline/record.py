"""``<run_dir>/run.json``: the typed record of one run, and the only code that reads or writes it.

A :class:`RunRecord` holds the run's status and one :class:`StageEntry` per stage. Entries
change only through their transitions (``pending -> running -> ok | failed``,
``pending -> skipped``, ``running -> pending`` for a stage held back by an earlier failure in
the same Job), each of which checks the state it starts from, so a record on disk always
tells the truth about where a run stopped. The orchestrator saves it at every transition.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from components.core import storage
from components.core.errors import StageError
from components.core.stamps import code_version, utc_now

RUN_FILE = "run.json"
PENDING, RUNNING, OK, SKIPPED, FAILED = "pending", "running", "ok", "skipped", "failed"


class TransitionError(RuntimeError):
    """A stage was moved from a state it cannot leave that way (a bug, never user input)."""


@dataclass
class StageEntry:
    """One stage of a run, as run.json records it.

    Attributes:
        key: The stage's key (``pipeline.keys.stage_keys``): what its results depend on.
        status: pending, running, ok, skipped or failed.
        started, completed: UTC times; ``completed`` is when the outputs were made (kept
            from the run that made them when the stage is skipped).
        seconds: How long it ran (0.0 when skipped).
        reason: Why it ran, or was skipped, or is still pending.
        error, traceback: What failed.
        outputs: The facts of its outputs (folders, files, verdict, version).
        job, restarts: The Kubernetes Job that ran it, and how often it was recreated.
    """

    key: str
    status: str = PENDING
    started: str | None = None
    seconds: float | None = None
    reason: str | None = None
    completed: str | None = None
    outputs: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    job: str | None = None
    restarts: int | None = None

    def _expect(self, *states: str) -> None:
        if self.status not in states:
            raise TransitionError(
                f"a {self.status} stage cannot move this way (expected {' or '.join(states)})"
            )

    def start(self, why: str, job: str | None = None) -> None:
        """pending -> running."""
        self._expect(PENDING)
        self.status, self.started, self.seconds, self.reason, self.job = RUNNING, utc_now(), None, why, job

    def done(self, seconds: float, outputs: dict[str, Any]) -> None:
        """running -> ok, with the facts of the outputs it made."""
        self._expect(RUNNING)
        self.status, self.seconds, self.completed, self.outputs = OK, round(seconds, 3), utc_now(), outputs

    def skip(self, why: str, completed: str | None, outputs: dict[str, Any]) -> None:
        """pending -> skipped: up to date (``completed``: when its outputs were made) or not
        configured to run (``completed`` None)."""
        self._expect(PENDING)
        self.status, self.started, self.seconds, self.reason = SKIPPED, utc_now(), 0.0, why
        self.completed, self.outputs = completed, outputs

    def fail(self, seconds: float, error: str, traceback: str | None = None) -> None:
        """running -> failed."""
        self._expect(RUNNING)
        self.status, self.seconds, self.error, self.traceback = FAILED, round(seconds, 3), error, traceback

    def hold(self, reason: str) -> None:
        """running -> pending: a later stage of a Job whose earlier stage failed never ran."""
        self._expect(RUNNING)
        self.status, self.reason = PENDING, reason

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageEntry:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names} | {"key": str(data.get("key", ""))})


@dataclass
class RunRecord:
    """One run: its status, the input data's fingerprint, and every stage in order.

    ``last_success`` (kept by the Kubernetes driver, whose scheduled runs skip when the data
    has not changed) is the fingerprint and end of the last run that succeeded.
    """

    input_fingerprint: str
    stages: dict[str, StageEntry]
    status: str = RUNNING
    started: str = field(default_factory=utc_now)
    finished: str | None = None
    seconds: float | None = None
    force: bool = False
    version: str = field(default_factory=code_version)
    driver: str | None = None
    last_success: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def new(
        cls,
        fingerprint: str,
        keys: Mapping[str, str],
        force: bool = False,
        driver: str | None = None,
        previous: RunRecord | None = None,
    ) -> RunRecord:
        """A running record, every stage pending; the driver's carries the last success forward."""
        record = cls(fingerprint, {name: StageEntry(key) for name, key in keys.items()}, force=force)
        if driver:
            record.driver, record.last_success = driver, last_success(previous)
        return record

    def finish(self, seconds: float) -> None:
        """running -> ok."""
        self.status, self.finished, self.seconds = OK, utc_now(), round(seconds, 3)

    def abort(self, error: str) -> None:
        """running -> failed, when the orchestrator itself failed (not a stage)."""
        self.status, self.finished, self.error = FAILED, utc_now(), error

    def fail(self, stage: str, error: str, seconds: float, resume: str) -> StageError:
        """running -> failed at ``stage``; returns the StageError that names the stage, the
        outputs kept and how to resume (``resume``: "re-run", "submit again")."""
        kept = [n for n, e in self.stages.items() if e.status in (OK, SKIPPED) and e.completed]
        error = f"stage '{stage}' failed: {error}"
        self.status, self.finished, self.seconds, self.error = FAILED, utc_now(), round(seconds, 3), error
        kept_text = f"outputs of {', '.join(kept)} are kept; " if kept else ""
        return StageError(f"{error}; {kept_text}{resume} to resume from {stage}")

    def to_json(self) -> dict[str, Any]:
        data = {
            "status": self.status,
            "started": self.started,
            "finished": self.finished,
            "seconds": self.seconds,
            "force": self.force,
            "input_fingerprint": self.input_fingerprint,
            "version": self.version,
        }
        if self.driver:
            data |= {"driver": self.driver, "last_success": self.last_success}
        data["stages"] = {name: entry.to_json() for name, entry in self.stages.items()}
        return data | ({"error": self.error} if self.error else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        stages = {
            n: StageEntry.from_json(e) for n, e in (data.get("stages") or {}).items() if isinstance(e, dict)
        }
        names = {f.name for f in dataclasses.fields(cls)} - {"stages", "input_fingerprint"}
        kept = {k: v for k, v in data.items() if k in names}
        return cls(str(data.get("input_fingerprint") or ""), stages, **kept)


def path(run_dir: str) -> str:
    return storage.join(run_dir, RUN_FILE)


def save(run_dir: str, record: RunRecord) -> None:
    """Rewrites ``<run_dir>/run.json`` (atomically, through the storage edge)."""
    storage.write_text(path(run_dir), json.dumps(record.to_json(), indent=2) + "\n")


def load(run_dir: str, say=print) -> RunRecord | None:
    """The last ``<run_dir>/run.json``, or None when there is none or it cannot be read
    (``say`` tells why: every stage will then run)."""
    try:
        data = json.loads(storage.read_text(path(run_dir)))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return RunRecord.from_json(data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        say(f"ignoring {path(run_dir)}: not a run record ({e}); every stage will run")
        return None


def last_success(record: RunRecord | None) -> dict[str, Any] | None:
    """The input fingerprint and end of the last successful run ``record`` knows: its own when
    it succeeded, else the one it carried forward (pure)."""
    if not record:
        return None
    if record.status == OK and record.input_fingerprint:
        return {"input_fingerprint": record.input_fingerprint, "finished": record.finished}
    return record.last_success


def has_new_data(record: RunRecord | None, fingerprint: str) -> bool:
    """False when ``fingerprint`` equals that of the last successful run (pure)."""
    done = last_success(record)
    return not done or done.get("input_fingerprint") != fingerprint
