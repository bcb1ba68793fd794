"""What the API says about a run's Jobs and pods, read into plain facts and lines: pure
functions of the API's JSON (the shape ``kubectl get -o json`` prints and the client's
``sanitize_for_serialization`` returns), shared by the driver, ``finetune status`` and
``finetune logs``. Nothing here talks to a cluster.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"  # on the pods of an Indexed Job
COMPONENT_LABEL = "app.kubernetes.io/component"
PREDICT = "predict"  # the component of predict Jobs (``pipeline.cluster.predict_jobs``)
# On a predict Job: what it predicts with, from and to (``finetune status``, submit's busy check).
PREDICT_ANNOTATIONS = {key: f"finetune/predict-{key}" for key in ("model", "input", "output")}
Obj = Mapping[str, Any]


@dataclass(frozen=True)
class JobState:
    """A Job as the driver sees it: ``phase`` (pending, running, succeeded, failed), the
    reason and message of its failure (or of the failure it is heading for), its pod counts
    and its start and end (ISO 8601, as the API gives them)."""

    phase: str
    reason: str = ""
    message: str = ""
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    started: str | None = None
    finished: str | None = None


def job_state(job: Obj) -> JobState:
    """The state of a Job from its ``status`` (pure).

    ``Complete`` and ``Failed`` are final; ``FailureTarget`` (set as soon as the Job must
    fail, while its pods are still being stopped) and ``SuccessCriteriaMet`` are not yet,
    so the Job stays running until its pods are gone.
    """
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    counts = {k: int(status.get(k) or 0) for k in ("active", "ready", "succeeded", "failed")}
    started = status.get("startTime")
    if "Complete" in true:
        end = status.get("completionTime") or true["Complete"].get("lastTransitionTime")
        return JobState(SUCCEEDED, started=started, finished=end, **counts)
    for kind, phase in (("Failed", FAILED), ("FailureTarget", RUNNING)):
        if kind in true:
            c = true[kind]
            end = c.get("lastTransitionTime") if phase == FAILED else None
            reason, message = c.get("reason") or "", c.get("message") or ""
            return JobState(phase, reason, message, started=started, finished=end, **counts)
    if "Suspended" in true:
        return JobState(PENDING, "Suspended", true["Suspended"].get("message") or "", **counts)
    return JobState(RUNNING if started else PENDING, started=started, **counts)


def is_active(job: Obj) -> bool:
    """Whether a Job (as the API returns it) has not finished: pending or running."""
    return job_state(job).phase in (PENDING, RUNNING)


def run_selector(run: str, component: str | None = None) -> str:
    """The label selector of run ``run``'s objects (``manifests.labels``), or of one component's."""
    selector = f"app.kubernetes.io/name=finetune,app.kubernetes.io/instance={run}"
    return selector + (f",{COMPONENT_LABEL}={component}" if component else "")


def deleted(name: str) -> JobState:
    """The state of a Job that vanished while the driver waited for it."""
    return JobState(
        FAILED,
        "Deleted",
        f"Job {name} was deleted while the driver waited for it (by hand, or "
        "cluster.ttl_seconds_after_finished is too short for the driver to see it finish)",
    )


def describe(state: JobState) -> str:
    """One line: ``running: 2 pods active, 2 ready``, ``succeeded in 4m12s``, ``failed (...)``."""
    if state.phase == PENDING:
        return "waiting to start" + (f" ({state.reason})" if state.reason else "")
    if state.phase == SUCCEEDED:
        took = seconds_between(state.started, state.finished)
        return "succeeded" + (f" in {duration(took)}" if took is not None else "")
    if state.phase == FAILED:
        return f"failed ({state.reason}{': ' + state.message if state.message else ''})"
    line = f"running: {state.active} pod{'s' * (state.active != 1)} active, {state.ready} ready"
    line += f", {state.succeeded} succeeded" if state.succeeded else ""
    line += f", {state.failed} failed" if state.failed else ""
    return line + (f"; failing ({state.reason})" if state.reason else "")


def parse_time(value: str | None) -> datetime.datetime | None:
    """An API time (``2026-11-26T09:30:00Z`` or with ``+00:00``) as an aware datetime."""
    return datetime.datetime.fromisoformat(value) if value else None


def seconds_between(start: str | None, end: str | datetime.datetime | None) -> float | None:
    """Seconds from ``start`` to ``end`` (None when either is unknown)."""
    begin = parse_time(start)
    stop = parse_time(end) if isinstance(end, str) or end is None else end
    return None if begin is None or stop is None else round((stop - begin).total_seconds(), 3)


def duration(seconds: float | None) -> str:
    """``19s``, ``12m04s``, ``2h03m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _statuses(pod: Obj) -> list[Obj]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


def _terminated(container_status: Obj) -> Obj:
    return (container_status.get("state") or {}).get("terminated") or {}


def container_seconds(pod: Obj) -> dict[str, float]:
    """How long each finished container of a pod ran (evaluate and push of one pod)."""
    found = {}
    for status in _statuses(pod):
        done = _terminated(status)
        took = seconds_between(done.get("startedAt"), done.get("finishedAt"))
        if took is not None:
            found[status["name"]] = took
    return found


def failed_stage(pods: Sequence[Obj], stages: Sequence[str]) -> str:
    """Which of ``stages`` (the containers of the Job's pods, in order) failed: the first one
    that did not exit 0 in the newest pod; the first stage when there are no pods."""
    if not pods:
        return stages[0]
    newest = max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    exits = {s["name"]: _terminated(s).get("exitCode") for s in _statuses(newest)}
    return next((stage for stage in stages if exits.get(stage) != 0), stages[0])


def pod_failures(pods: Iterable[Obj]) -> list[str]:
    """Each failed container (``pod/container exited 1 (Error): <its last log line>``), failed
    pod without one (evicted), or pod still pending and why (unschedulable, image pull), the
    earliest first: the first is usually the cause, the rest were stopped because of it."""
    found: list[tuple[str, str]] = []
    for pod in pods:
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        failed = [s for s in _statuses(pod) if _terminated(s).get("exitCode") not in (None, 0)]
        for s in failed:
            done = _terminated(s)
            said = (done.get("message") or "").strip().splitlines()
            line = f"{name}/{s['name']} exited {done['exitCode']} ({done.get('reason') or 'Error'})"
            found.append((done.get("finishedAt") or "", line + (f": {said[-1][:300]}" if said else "")))
        if not failed and status.get("phase") == "Failed":
            found.append(
                ("", f"{name}: {status.get('reason') or 'Failed'}: {status.get('message') or ''}".strip())
            )
        if status.get("phase") == "Pending" and _pending_reason(status):
            found.append(("~", f"{name}: still pending: {_pending_reason(status)}"))
    return [line for _, line in sorted(found, key=lambda f: f[0])]


def _pending_reason(status: Obj) -> str:
    """Why a pod has not started: not scheduled (``Unschedulable: 0/3 nodes ...``) or a
    container waiting (``ImagePullBackOff: ...``); empty when the pod says nothing."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason') or 'not scheduled'}: {condition.get('message') or ''}".strip(
                ": "
            )
    for s in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (s.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"{s['name']} {waiting['reason']}: {waiting.get('message') or ''}".strip(": ")
    return ""


def last_events(events: Iterable[Obj], per_pod: int = 2) -> list[str]:
    """The last ``per_pod`` events of each pod, oldest pod first: ``pod: Reason: message``
    (repeats counted), what ``kubectl describe pod`` ends with (pure)."""
    by_pod: dict[str, list[Obj]] = {}
    for event in sorted(events, key=_event_time):
        by_pod.setdefault((event.get("involvedObject") or {}).get("name", "?"), []).append(event)
    lines = []
    for pod, found in by_pod.items():
        for event in found[-per_pod:]:
            count = event.get("count") or 1
            times = f" (x{count})" if count > 1 else ""
            lines.append(
                f"{pod}: {event.get('reason') or '?'}: {(event.get('message') or '').strip()}{times}"
            )
    return lines


def _event_time(event: Obj) -> str:
    return event.get("lastTimestamp") or event.get("eventTime") or _created(event)


def overdue(state: JobState, seconds: float, limit: float) -> JobState:
    """A Job the driver stops waiting for: still ``state`` after ``seconds``, over ``limit``
    (the Job's own deadline plus a grace the Job controller did not act in) (pure)."""
    return JobState(
        FAILED,
        "DeadlineExceeded",
        f"still {describe(state)} after {duration(seconds)}, over cluster.stage_timeout_seconds "
        f"({duration(limit)})",
        active=state.active,
        ready=state.ready,
        succeeded=state.succeeded,
        failed=state.failed,
        started=state.started,
    )


def _created(obj: Obj) -> str:
    return obj.get("metadata", {}).get("creationTimestamp") or ""


def status_lines(
    run: str,
    jobs: Sequence[Obj],
    cron: Obj | None,
    now: datetime.datetime,
    stages: Sequence[str],
    predict_cron: Obj | None = None,
) -> list[str]:
    """``finetune status``: a table of the run's driver Jobs (manual and scheduled, oldest
    first) and its stage Jobs in order (``not created`` when absent; left out when the run
    has only predict Jobs), then its predict Jobs (each with what it predicts), then its
    schedule and its predict schedule."""
    by_component: dict[str, list[Obj]] = {}
    for job in sorted(jobs, key=_created):
        component = (job["metadata"].get("labels") or {}).get(COMPONENT_LABEL, "")
        by_component.setdefault(component, []).append(job)
    rows = [("JOB", "STATUS", "START", "DURATION", "DETAIL")]
    for job in by_component.get("driver", []):
        rows.append(_row(job, now))
    predicts = by_component.get(PREDICT, [])
    for stage in stages if set(by_component) - {PREDICT} or not predicts else ():
        found = by_component.get(stage)
        rows += [_row(j, now) for j in found] if found else [(f"{run}-{stage}", "not created", "-", "-", "")]
    rows += [_row(job, now, _predicted(job)) for job in predicts]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + f"  {r[4]}" for r in rows]
    lines = [line.rstrip() for line in lines]
    lines += [schedule_line(c) for c in (cron, predict_cron) if c is not None]
    return lines


def _predicted(job: Obj) -> str:
    """``MODEL: INPUT -> OUTPUT`` of a predict Job, from its annotations (``predict_jobs``)."""
    said = job["metadata"].get("annotations") or {}
    model, source, output = (said.get(key, "?") for key in PREDICT_ANNOTATIONS.values())
    return f"{model}: {source} -> {output}"


def _row(job: Obj, now: datetime.datetime, about: str = "") -> tuple[str, str, str, str, str]:
    """A Job's row; ``about`` (what a predict Job predicts) leads its detail."""
    state = job_state(job)
    status = {PENDING: "pending", RUNNING: "active", SUCCEEDED: "succeeded", FAILED: "failed"}[state.phase]
    when = _clock(state.started) or "-"
    took = duration(seconds_between(state.started, state.finished or now))
    detail = describe(state) if state.phase == RUNNING else ""
    if state.phase == FAILED:
        detail = state.reason + (f": {state.message}" if state.message else "")
    return job["metadata"]["name"], status, when, took, "; ".join(d for d in (about, detail) if d)


def _clock(value: str | None) -> str:
    """An API time as ``2026-11-26 02:00:00Z`` ("" when unknown)."""
    when = parse_time(value)
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if when else ""


def schedule_line(cron: Obj) -> str:
    """``schedule beans-schedule: '0 2 * * *' (Etc/UTC), last run ..., active 0``."""
    spec, status = cron.get("spec") or {}, cron.get("status") or {}
    line = f"schedule {cron['metadata']['name']}: '{spec.get('schedule')}' ({spec.get('timeZone') or 'UTC'})"
    line += f", last run {_clock(status.get('lastScheduleTime')) or 'never'}"
    if status.get("lastSuccessfulTime"):
        line += f", last success {_clock(status['lastSuccessfulTime'])}"
    return line + (", suspended" if spec.get("suspend") else "")


@dataclass(frozen=True)
class LogSource:
    """One container whose log ``finetune logs`` prints, and the prefix of its lines."""

    pod: str
    container: str
    prefix: str
    started: bool


def log_sources(pods: Sequence[Obj], container: str | None = None) -> list[LogSource]:
    """The containers of a Job's pods in order (index, then attempt; init containers first),
    each line prefixed ``[<index>]`` for an Indexed Job, ``try N`` when an index ran more than
    once, and the container when a pod has several (evaluate, push). ``container``: only it."""

    def index(pod: Obj) -> str | None:
        meta = pod.get("metadata") or {}
        return (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(
            INDEX_ANNOTATION
        )

    ordered = sorted(pods, key=lambda p: (int(index(p) or -1), _created(p)))
    tries, seen = Counter(index(p) for p in ordered), Counter[str | None]()
    sources = []
    for pod in ordered:
        spec, key = pod.get("spec") or {}, index(pod)
        seen[key] += 1
        names = [
            c["name"] for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
        ]
        begun = {s["name"] for s in _statuses(pod) if set(s.get("state") or {}) & {"running", "terminated"}}
        for name in names if container is None else [n for n in names if n == container]:
            parts = [key] if key is not None else []
            parts += [f"try {seen[key]}"] if tries[key] > 1 else []
            parts += [name] if len(names) > 1 else []
            prefix = f"[{' '.join(parts)}] " if parts else ""
            sources.append(LogSource(pod["metadata"]["name"], name, prefix, name in begun))
    return sources
