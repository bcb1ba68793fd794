"""``finetune drive``: the run on a cluster, from the driver pod (the driver Job of ``jobs``).

The Kubernetes executor of the one orchestrator (``pipeline.orchestrator``, which decides,
records ``run.json`` and reports, exactly as for ``finetune run``, so a stage is skipped when
it is up to date and a retried driver resumes where the last one stopped). Its own decisions
are pure functions of what the API returns: :func:`job_state` reads a Job (the API's JSON)
into a :class:`JobState`, :func:`next_action` turns it into WAIT, DONE, RESTART or STOP.
:class:`KubernetesJobs` only creates Jobs, polls them and moves their stages' entries.
Imports neither TensorFlow nor Beam.

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
from pipeline import orchestrator
from pipeline import record as run_record
from pipeline.cluster import views
from pipeline.cluster.client import Cluster, ClusterError
from pipeline.cluster.jobs import DEADLINE_GRACE_SECONDS, stage_jobs
from pipeline.cluster.manifests import check, worker_service
from pipeline.cluster.views import FAILED, PENDING, RUNNING, SUCCEEDED, JobState, describe, job_state
from pipeline.orchestrator import StageFailed
from pipeline.record import RunRecord

# Each stage Job and the stages it runs (the evaluate Job also pushes).
JOB_STAGES: dict[str, tuple[str, ...]] = {
    "preprocess": ("preprocess",),
    "train": ("train",),
    "evaluate": ("evaluate", "push"),
}
KEY_ANNOTATION = "finetune/stage-key"  # on the stage Jobs: which inputs they run on
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


@dataclass(frozen=True)
class Poll:
    """How the driver polls a Job: ``first`` seconds after a change, growing 1.5x up to
    ``longest``; a line every ``heartbeat`` seconds when nothing changes; ``api_retries``
    consecutive failed reads (API server restarting) before it gives up."""

    first: float = 2.0
    longest: float = 30.0
    heartbeat: float = 600.0
    api_retries: int = 10


class KubernetesJobs:
    """Runs the stages as Jobs in ``cluster`` (``finetune drive``, in the driver pod): the
    preprocess Job, the Indexed training Job (recreated after a worker group's failure up to
    ``cluster.backoff_limit`` times) and the evaluate Job (evaluate, then push)."""

    name, resume, driver = "drive", "submit again", "kubernetes"

    def __init__(self, cluster: Cluster, poll: Poll | None = None):
        self.cluster, self.poll = cluster, poll or Poll()

    def groups(self, config: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple(JOB_STAGES.items())

    def prepare(self, config: Config) -> None:
        check(config)

    def execute(
        self, config: Config, record: RunRecord, group: tuple[str, str], stages: list[str], why: str
    ) -> None:
        """Creates (or adopts) the stage's Job, waits for it, recreates a failed worker group;
        records the outcome. Raises StageFailed when the stage failed."""
        (job_stage, label), cluster = group, self.cluster
        key = record.stages[stages[-1]].key
        manifest = stage_jobs(config)[job_stage]
        manifest["metadata"].setdefault("annotations", {})[KEY_ANNOTATION] = key
        name = manifest["metadata"]["name"]
        for stage in stages:
            record.stages[stage].start(why, job=name)
        run_record.save(config.run_dir, record)
        _say(f"{label}: Job {name}")
        started, restarts = time.perf_counter(), 0
        _start(config, cluster, manifest, key, label)
        limit = config.cluster.stage_timeout_seconds + DEADLINE_GRACE_SECONDS  # a backstop to the Job's own
        while True:
            state = _wait(cluster, name, label, self.poll, limit)
            decision = next_action(job_stage, state, restarts, config.cluster.backoff_limit)
            if decision.action == DONE:
                break
            pods = cluster.job_pods(name)
            if decision.action == STOP:
                _fail(config, record, stages, pods, decision.why, started, _events(cluster, pods))
            restarts += 1
            record.stages[job_stage].restarts = restarts
            run_record.save(config.run_dir, record)
            _say(f"{label}: {decision.why}")
            cluster.delete_job(name)
            cluster.create(manifest)
        seconds = round(time.perf_counter() - started, 3)
        per_container = next(
            (views.container_seconds(p) for p in cluster.job_pods(name) if _succeeded(p)), {}
        )
        for stage in stages:
            record.stages[stage].done(
                per_container.get(stage, seconds), orchestrator.outputs_of(config, stage)
            )
        _say(f"{label}: done in {seconds:.1f} s" + (f" ({restarts} restarts)" if restarts else ""))


def _say(message: str) -> None:
    orchestrator.say(KubernetesJobs, message)  # the same "[drive]" lines as the orchestrator's


def drive(
    config: Config, cluster: Cluster, if_new_data: bool = False, poll: Poll | None = None
) -> RunRecord | None:
    """Runs the stage Jobs in order and records the run in ``<run_dir>/run.json``
    (``pipeline.orchestrator.orchestrate`` with :class:`KubernetesJobs`).

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
    return orchestrator.orchestrate(config, KubernetesJobs(cluster, poll), if_new_data=if_new_data)


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
    config: Config,
    record: RunRecord,
    stages: list[str],
    pods: list,
    why: str,
    started: float,
    events: list[str],
) -> NoReturn:
    """Records the failed stage (the one whose container failed, what it said, its pods' last
    events) and raises StageFailed. ``started``: when the Job began (``time.perf_counter``)."""
    stage = views.failed_stage(pods, stages)
    error = failure_text(why, views.pod_failures(pods), events)
    ran = {k: v for pod in pods for k, v in views.container_seconds(pod).items()}
    for name in stages:
        entry = record.stages[name]
        if stages.index(name) < stages.index(stage):  # evaluate, when push failed
            entry.done(ran.get(name, 0.0), orchestrator.outputs_of(config, name))
        elif name == stage:
            entry.fail(time.perf_counter() - started, error)
        else:
            entry.hold(f"{stage} failed")
    run_record.save(config.run_dir, record)
    raise StageFailed(stage, error)


def failure_text(why: str, failures: list[str], events: list[str]) -> str:
    """A failed stage in one line: why the Job failed, its pods' failures, their last events (pure)."""
    text = why + (": " + "; ".join(failures[:3]) if failures else "")
    return text + ("; last events: " + "; ".join(events[-4:]) if events else "")
