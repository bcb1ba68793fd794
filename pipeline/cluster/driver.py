"""``finetune drive``: the run on a cluster, from the driver pod (the driver Job of ``jobs``).

A small state machine whose decisions are pure functions of what the API returns:
:func:`job_state` reads a Job (the API's JSON) into a :class:`JobState`, :func:`next_action`
turns it into WAIT, DONE, RESTART or STOP, :func:`has_new_data` decides whether a scheduled
run has anything to do. The loop in :func:`drive` only creates Jobs, polls them and writes
``<run_dir>/run.json`` in the record format of ``pipeline.run`` (and with its stage keys, so a
stage is skipped when it is up to date, and a retried driver resumes where the last one
stopped).

The stage Jobs run ``preprocess``, ``train`` (the Indexed worker group) and ``evaluate``
(evaluate, then push). Before a Job is created, an earlier Job of that name is deleted with
its pods; a Job of this run still active (same stage key, left by a driver pod that was
evicted) is adopted instead. A training group that fails (``BackoffLimitExceeded``: one pod
failed, so the group did) is deleted and created again up to ``cluster.backoff_limit``
times, resuming from its BackupAndRestore backup; a pod that exits 2 (``PodFailurePolicy``:
a bad configuration) stops the run at once, as does any other failure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from components.config import Config
from components.core import storage
from components.core.stamps import code_version, utc_now
from pipeline.cluster import views
from pipeline.cluster.client import Cluster, ClusterError
from pipeline.cluster.jobs import DEADLINE_GRACE_SECONDS, stage_jobs
from pipeline.cluster.manifests import check, worker_service
from pipeline.cluster.views import FAILED, PENDING, RUNNING, SUCCEEDED, JobState, describe, job_state
from pipeline.run import (
    NO_REGISTRY,
    RUN_FILE,
    STAGE_BY_NAME,
    STAGES,
    decide,
    failed_run,
    input_fingerprint,
    mark_done,
    read_record,
    stage_keys,
    write_record,
)

# Each stage Job and the stages of pipeline.run it runs (the evaluate Job also pushes).
JOB_STAGES: dict[str, tuple[str, ...]] = {
    "preprocess": ("preprocess",),
    "train": ("train",),
    "evaluate": ("evaluate", "push"),
}
KEY_ANNOTATION = "finetune/stage-key"  # on the stage Jobs: which inputs they run on
NO_NEW_DATA = "no new data"
WAIT, DONE, RESTART, STOP = "wait", "done", "restart", "stop"


@dataclass(frozen=True)
class Decision:
    """What the driver does next about one stage Job, and why (for the log and run.json)."""

    action: str
    why: str = ""


def next_action(stage: str, state: JobState, restarts: int, max_restarts: int) -> Decision:
    """The driver's decision for the Job of ``stage`` in ``state`` (pure).

    Args:
        stage: The Job's stage (``preprocess``, ``train``, ``evaluate``).
        state: The Job's state (:func:`views.job_state`).
        restarts: How often this run already recreated the Job.
        max_restarts: ``cluster.backoff_limit``.
    """
    if state.phase in (PENDING, RUNNING):
        return Decision(WAIT)
    if state.phase == SUCCEEDED:
        return Decision(DONE)
    said = f"{state.reason}: {state.message}" if state.message else state.reason or "no reason given"
    if state.reason == "PodFailurePolicy":
        return Decision(STOP, f"a pod exited 2, a bad configuration, which no retry fixes ({said})")
    if stage == "train" and state.reason == "BackoffLimitExceeded":
        if restarts < max_restarts:
            return Decision(
                RESTART,
                f"the worker group failed ({said}); recreating it (restart {restarts + 1} of "
                f"{max_restarts}), it resumes from its backup",
            )
        return Decision(
            STOP, f"the worker group failed {restarts + 1} times (cluster.backoff_limit {max_restarts})"
        )
    return Decision(STOP, said)


def adoptable(job: Mapping[str, Any] | None, key: str) -> bool:
    """Whether an existing Job is this run's stage still at work (same stage key, not finished)."""
    if not job:
        return False
    annotations = job.get("metadata", {}).get("annotations") or {}
    return annotations.get(KEY_ANNOTATION) == key and job_state(job).phase in (PENDING, RUNNING)


def last_success(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The input fingerprint and end of the last successful run a ``run.json`` knows: its own
    when it succeeded, else the one it carried forward (``last_success``)."""
    if not record:
        return None
    if record.get("status") == "ok" and record.get("input_fingerprint"):
        return {"input_fingerprint": record["input_fingerprint"], "finished": record.get("finished")}
    return record.get("last_success")


def has_new_data(record: Mapping[str, Any] | None, fingerprint: str) -> bool:
    """False when ``fingerprint`` equals that of the last successful run (pure)."""
    done = last_success(record)
    return not done or done.get("input_fingerprint") != fingerprint


def new_record(config: Config, fingerprint: str, keys: Mapping[str, str], last: Mapping | None) -> dict:
    """A ``run.json`` record in ``pipeline.run``'s format, every stage pending."""
    stages: dict[str, dict[str, Any]] = {s.name: {"status": "pending", "key": keys[s.name]} for s in STAGES}
    if not config.registry.uri:
        stages["push"].update(
            status="skipped", started=utc_now(), seconds=0.0, reason=NO_REGISTRY, outputs={}
        )
    return {
        "status": "running",
        "started": utc_now(),
        "finished": None,
        "seconds": None,
        "force": False,
        "input_fingerprint": fingerprint,
        "version": code_version(),
        "driver": "kubernetes",
        "last_success": last_success(last),
        "stages": stages,
    }


@dataclass(frozen=True)
class Poll:
    """How the driver polls a Job: ``first`` seconds after a change, growing 1.5x up to
    ``longest``; a line every ``heartbeat`` seconds when nothing changes; ``api_retries``
    consecutive failed reads (API server restarting) before it gives up."""

    first: float = 2.0
    longest: float = 30.0
    heartbeat: float = 600.0
    api_retries: int = 10


def _say(message: str) -> None:
    print(f"[drive] {message}", flush=True)


def drive(
    config: Config, cluster: Cluster, if_new_data: bool = False, poll: Poll | None = None
) -> dict[str, Any] | None:
    """Runs the stage Jobs in order and records the run in ``<run_dir>/run.json``.

    Args:
        config: The validated configuration (the pod's mounted ConfigMap).
        cluster: The namespace to create the Jobs in.
        if_new_data: End early, with "no new data", when the input data's fingerprint equals
            that of the last successful run (the scheduled runs).
        poll: Polling intervals (default :class:`Poll`).

    Returns:
        The record written, or None when there was no new data.

    Raises:
        ConfigError: the configuration cannot run on a cluster.
        StageError: a stage failed; names it.
        ClusterError: the API server failed the driver.
    """
    check(config)
    poll = poll or Poll()
    clock = time.perf_counter()
    fingerprint = input_fingerprint(config)
    previous = read_record(config.run_dir)
    if if_new_data and not has_new_data(previous, fingerprint):
        finished = (last_success(previous) or {}).get("finished")
        _say(
            f"{NO_NEW_DATA}: the input data ({fingerprint[:12]}) is that of the last successful run "
            f"({finished}); nothing to do"
        )
        return None
    _say(f"input data fingerprint {fingerprint[:12]} ({time.perf_counter() - clock:.1f} s)")
    keys = stage_keys(config, fingerprint)
    last = (previous or {}).get("stages", {})
    record = new_record(config, fingerprint, keys, previous)
    write_record(config, record)
    earlier_ran = False
    for number, job_stage in enumerate(JOB_STAGES, start=1):
        label = f"{number}/{len(JOB_STAGES)} {job_stage}"
        skip, why = _skip(config, record, last, keys, job_stage, earlier_ran)
        if skip:
            _say(f"{label}: {why}, skipped")
        else:
            key = keys[_covered(config, job_stage)[-1]]
            try:
                _run_stage(config, cluster, record, job_stage, (label, why), key, poll)
            except ClusterError as e:  # the API server failed the driver: say so in run.json too
                record.update(status="failed", finished=utc_now(), error=f"stage '{job_stage}': {e}")
                write_record(config, record)
                raise
            earlier_ran = True
        write_record(config, record)
    record.update(status="ok", finished=utc_now(), seconds=round(time.perf_counter() - clock, 3))
    write_record(config, record)
    _summary(config, record)
    return record


def _covered(config: Config, job_stage: str) -> list[str]:
    """The stages a Job runs here (push only with ``registry.uri``)."""
    return [s for s in JOB_STAGES[job_stage] if s != "push" or config.registry.uri]


def _skip(
    config: Config, record: dict, last: dict, keys: Mapping[str, str], job_stage: str, earlier_ran: bool
) -> tuple[bool, str]:
    """Whether the Job can be skipped (each stage it runs is up to date, its outputs there)
    and why; records the skipped stages as ``pipeline.run`` does."""
    found = {}
    for name in _covered(config, job_stage):
        ok, why = decide(last.get(name), keys[name], earlier_ran, force=False)
        facts = STAGE_BY_NAME[name].finished(config) if ok else None
        if facts is None:
            return False, why if not ok else "its outputs are gone"
        found[name] = (why, facts)
    for name, (why, facts) in found.items():
        record["stages"][name].update(
            status="skipped", started=utc_now(), seconds=0.0, reason=why, completed=last[name]["completed"]
        )
        record["stages"][name]["outputs"] = facts
    return True, next(iter(found.values()))[0]


def _run_stage(
    config: Config,
    cluster: Cluster,
    record: dict,
    job_stage: str,
    said: tuple[str, str],
    key: str,
    poll: Poll,
) -> None:
    """Creates (or adopts) the stage's Job, waits for it, recreates a failed worker group;
    records the outcome. ``said``: the stage's label and why it runs; ``key``: the stage key
    of the last stage the Job runs. Raises StageError when the stage failed."""
    label, why = said
    covered = _covered(config, job_stage)
    manifest = stage_jobs(config)[job_stage]
    manifest["metadata"].setdefault("annotations", {})[KEY_ANNOTATION] = key
    name = manifest["metadata"]["name"]
    for stage in covered:
        record["stages"][stage].update(
            status="running", started=utc_now(), seconds=None, reason=why, job=name
        )
    write_record(config, record)
    _say(f"{label}: running ({why}): Job {name}")
    started, restarts = time.perf_counter(), 0
    _start(config, cluster, manifest, key, label)
    limit = config.cluster.stage_timeout_seconds + DEADLINE_GRACE_SECONDS  # a backstop to the Job's own
    while True:
        state = _wait(cluster, name, label, poll, limit)
        decision = next_action(job_stage, state, restarts, config.cluster.backoff_limit)
        if decision.action == DONE:
            break
        pods = cluster.job_pods(name)
        if decision.action == STOP:
            _fail(config, record, job_stage, pods, decision.why, started, _events(cluster, pods))
        restarts += 1
        record["stages"][job_stage]["restarts"] = restarts
        write_record(config, record)
        _say(f"{label}: {decision.why}")
        cluster.delete_job(name)
        cluster.create(manifest)
    seconds = round(time.perf_counter() - started, 3)
    per_container = next((views.container_seconds(p) for p in cluster.job_pods(name) if _succeeded(p)), {})
    for stage in covered:
        mark_done(config, record["stages"][stage], stage, per_container.get(stage, seconds))
    _say(f"{label}: done in {seconds:.1f} s" + (f" ({restarts} restarts)" if restarts else ""))


def _start(config: Config, cluster: Cluster, manifest: dict, key: str, label: str) -> None:
    """Adopts this run's Job still at work, or deletes any earlier Job of the name and creates it."""
    name = manifest["metadata"]["name"]
    if manifest["spec"].get("completionMode") == "Indexed":  # the worker group needs its Service
        service = worker_service(config)
        if cluster.read("Service", service["metadata"]["name"]) is None:
            cluster.create(service)
    existing = cluster.read("Job", name)
    if adoptable(existing, key):
        _say(
            f"{label}: Job {name} of these inputs is still running (an earlier driver started it); "
            "waiting for it"
        )
        return
    if existing is not None:
        _say(f"{label}: deleting the earlier Job {name} ({describe(job_state(existing))}) and its pods")
    cluster.delete_job(name)  # also waits for pods of a Job deleted earlier, still stopping
    cluster.create(manifest)


def _events(cluster: Cluster, pods: list) -> list[str]:
    """The failed stage's pods' last events, for its record; none when they cannot be read
    (a Role from before events were granted): the failure itself must still be recorded."""
    try:
        return views.last_events(cluster.pod_events([p["metadata"]["name"] for p in pods]))
    except ClusterError as e:
        _say(f"cannot read the pods' events ({e})")
        return []


def _wait(cluster: Cluster, name: str, label: str, poll: Poll, limit: float) -> JobState:
    """Polls Job ``name`` until it finishes, printing a line at each change (pods active, ready,
    failed) and a heartbeat; survives an API server that does not answer for a while. After
    ``limit`` seconds it stops waiting: the Job's own deadline should have ended it by then."""
    pause, shown, since, failures = poll.first, "", time.monotonic(), 0
    began = since
    while True:
        try:
            job = cluster.read("Job", name)
            failures = 0
        except ClusterError as e:
            if (e.status is not None and e.status < 500 and e.status != 429) or failures >= poll.api_retries:
                raise
            failures += 1
            _say(f"{label}: {e} (retry {failures} of {poll.api_retries})")
            time.sleep(pause)
            pause = min(pause * 2, poll.longest)
            continue
        state = job_state(job) if job else views.deleted(name)
        line, now = describe(state), time.monotonic()
        if line != shown:
            _say(f"{label}: {line}")
            shown, since, pause = line, now, poll.first
        elif now - since >= poll.heartbeat:
            _say(f"{label}: still {line}")
            since = now
        if state.phase in (SUCCEEDED, FAILED):
            return state
        if now - began > limit:
            return views.overdue(state, now - began, limit)
        time.sleep(pause)
        pause = min(pause * 1.5, poll.longest)


def _succeeded(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Succeeded"


def _fail(
    config: Config, record: dict, job_stage: str, pods: list, why: str, started: float, events: list[str]
) -> NoReturn:
    """Records the failed run (the stage whose container failed, what it said, its pods' last
    events) and raises the StageError that names it. ``started``: when the stage began
    (``time.perf_counter``)."""
    covered = _covered(config, job_stage)
    stage = views.failed_stage(pods, covered)
    error = failure_text(why, views.pod_failures(pods), events)
    ran = {k: v for pod in pods for k, v in views.container_seconds(pod).items()}
    for name in covered:
        entry = record["stages"][name]
        if covered.index(name) < covered.index(stage):  # evaluate, when push failed
            mark_done(config, entry, name, ran.get(name, 0.0))
        elif name == stage:
            entry.update(status="failed", seconds=round(time.perf_counter() - started, 3), error=error)
        else:
            entry.update(status="pending", reason=f"{stage} failed")
    seconds = views.seconds_between(record["started"], utc_now()) or 0.0
    raise failed_run(config, record, stage, error, seconds, "submit again")


def failure_text(why: str, failures: list[str], events: list[str]) -> str:
    """A failed stage in one line: why the Job failed, its pods' failures, their last events (pure)."""
    text = why + (": " + "; ".join(failures[:3]) if failures else "")
    return text + ("; last events: " + "; ".join(events[-4:]) if events else "")


def _summary(config: Config, record: dict[str, Any]) -> None:
    """The end of the run in the driver's log: the verdict, the registry version, the record."""
    evaluate = record["stages"]["evaluate"].get("outputs", {})
    blessed = "BLESSED" if evaluate.get("blessed") else "NOT BLESSED"
    _say(f"verdict: {blessed}: {evaluate.get('reason', '')}")
    pushed = record["stages"]["push"].get("outputs", {})
    if pushed.get("version") is not None:
        _say(f"registry: version {pushed['version']} of '{config.name}' in {config.registry.uri}")
    else:
        _say(f"registry: no version ({pushed.get('reason') or record['stages']['push'].get('reason', '')})")
    _say(f"record: {storage.join(config.run_dir, RUN_FILE)} ({record['seconds']:.1f} s)")
