"""The cluster commands without a cluster: the driver's decisions on Job and pod objects built
with the official client's models (and turned into the API's JSON by its own serializer), the
no-new-data check on run.json files that ``pipeline.run`` wrote, cron schedules, the client's
errors when there is no kubeconfig or no API server, and every command's --help.

There is no Kubernetes API server here (DESIGN.md), and no stand-in for one: creating,
polling, deleting and recreating Jobs, following logs and create-or-replace are not run.
"""

from __future__ import annotations

import datetime
import socket
import sys
import types
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from components.config import Config, load_config
from components.core import storage
from components.core.errors import ConfigError, StageError
from pipeline import keys, orchestrator
from pipeline import record as run_record
from pipeline import run as pipeline_run
from pipeline.cli import build_parser, main
from pipeline.cluster import cron, driver, jobs, render, views
from pipeline.cluster.client import connect, to_model
from pipeline.cluster.driver import DONE, RESTART, STOP, WAIT, next_action
from pipeline.cluster.manifests import IF_NEW_DATA
from pipeline.orchestrator import StageFailed

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CONFIG = str(ROOT / "configs" / "beans-cluster.yaml")
T0 = datetime.datetime(2026, 11, 26, 2, 0, 5, tzinfo=datetime.UTC)
SERIALIZE = client.ApiClient().sanitize_for_serialization


def _at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def _condition(kind: str, reason: str = "", message: str = "", status: str = "True") -> client.V1JobCondition:
    return client.V1JobCondition(
        type=kind,
        status=status,
        reason=reason or None,
        message=message or None,
        last_transition_time=_at(300),
    )


def _job(name="beans-train", component="train", created=0, annotations=None, **status) -> dict:
    """A Job as the API returns it: the client's model, serialized by the client."""
    meta = client.V1ObjectMeta(
        name=name,
        namespace="finetune",
        labels={"app.kubernetes.io/instance": "beans", "app.kubernetes.io/component": component},
        annotations=annotations,
        creation_timestamp=_at(created),
    )
    job = client.V1Job(api_version="batch/v1", kind="Job", metadata=meta, status=client.V1JobStatus(**status))
    return SERIALIZE(job)


# -- the driver's decisions ----------------------------------------------------------------------

BACKOFF = "Job has reached the specified backoff limit"
JOB_CASES = {
    "created, no pods yet": ({}, views.PENDING, WAIT),
    "pods starting": ({"start_time": T0, "active": 2, "ready": 0}, views.RUNNING, WAIT),
    "suspended": ({"conditions": [_condition("Suspended", "JobSuspended")]}, views.PENDING, WAIT),
    "failing, pods still stopping": (
        {
            "start_time": T0,
            "active": 1,
            "failed": 1,
            "conditions": [_condition("FailureTarget", "BackoffLimitExceeded")],
        },
        views.RUNNING,
        WAIT,
    ),
    "success criteria met, pods finishing": (
        {"start_time": T0, "active": 1, "succeeded": 1, "conditions": [_condition("SuccessCriteriaMet")]},
        views.RUNNING,
        WAIT,
    ),
    "a condition that is False counts for nothing": (
        {
            "start_time": T0,
            "active": 2,
            "conditions": [_condition("Failed", "BackoffLimitExceeded", status="False")],
        },
        views.RUNNING,
        WAIT,
    ),
    "complete": (
        {
            "start_time": T0,
            "completion_time": _at(252),
            "succeeded": 2,
            "conditions": [_condition("Complete")],
        },
        views.SUCCEEDED,
        DONE,
    ),
}


@pytest.mark.parametrize("case", sorted(JOB_CASES))
def test_job_states_and_what_the_driver_does(case):
    status, phase, action = JOB_CASES[case]
    state = views.job_state(_job(**status))
    assert state.phase == phase
    assert next_action("train", state, restarts=0, max_restarts=2).action == action


def test_progress_lines_say_what_the_job_is_doing():
    running = views.job_state(_job(start_time=T0, active=2, ready=1))
    assert views.describe(running) == "running: 2 pods active, 1 ready"
    done = views.job_state(_job(**JOB_CASES["complete"][0]))
    assert views.describe(done) == "succeeded in 4m12s"
    failing = views.job_state(_job(**JOB_CASES["failing, pods still stopping"][0]))
    assert (
        views.describe(failing) == "running: 1 pod active, 0 ready, 1 failed; failing (BackoffLimitExceeded)"
    )
    failed = views.job_state(_job(conditions=[_condition("Failed", "DeadlineExceeded", "too long")]))
    assert views.describe(failed) == "failed (DeadlineExceeded: too long)"


def _failed(reason: str, message: str = "") -> views.JobState:
    state = views.job_state(_job(start_time=T0, failed=1, conditions=[_condition("Failed", reason, message)]))
    assert state.phase == views.FAILED and state.reason == reason
    return state


@pytest.mark.parametrize(
    "stage, reason, restarts, action, why",
    [
        (
            "train",
            "BackoffLimitExceeded",
            0,
            RESTART,
            "recreating it (restart 1 of 2), it resumes from its backup",
        ),
        ("train", "BackoffLimitExceeded", 1, RESTART, "(restart 2 of 2)"),
        (
            "train",
            "BackoffLimitExceeded",
            2,
            STOP,
            "the worker group failed 3 times (cluster.backoff_limit 2)",
        ),
        ("train", "PodFailurePolicy", 0, STOP, "a pod exited 2, a bad configuration, which no retry fixes"),
        ("train", "DeadlineExceeded", 0, STOP, "DeadlineExceeded"),
        # the other stages' pods were already retried by their Job (backoffLimit): final
        ("preprocess", "BackoffLimitExceeded", 0, STOP, f"BackoffLimitExceeded: {BACKOFF}"),
        ("evaluate", "PodFailurePolicy", 0, STOP, "a bad configuration"),
    ],
)
def test_a_failed_job_is_retried_only_when_a_new_worker_group_can_help(stage, reason, restarts, action, why):
    decision = next_action(stage, _failed(reason, BACKOFF), restarts=restarts, max_restarts=2)
    assert decision.action == action and why in decision.why


def test_a_vanished_job_stops_the_run_and_says_why():
    decision = next_action("preprocess", views.deleted("beans-preprocess"), 0, 2)
    assert decision.action == STOP and "ttl_seconds_after_finished" in decision.why


def test_only_a_running_job_of_the_same_inputs_is_adopted():
    mine = {driver.KEY_ANNOTATION: "k1"}
    assert driver.adoptable(_job(annotations=mine, start_time=T0, active=2), "k1")
    assert not driver.adoptable(_job(annotations=mine, start_time=T0, active=2), "k2")  # other inputs
    assert not driver.adoptable(_job(annotations=mine, **JOB_CASES["complete"][0]), "k1")  # finished
    assert not driver.adoptable(_job(start_time=T0, active=2), "k1")  # created by hand
    assert not driver.adoptable(None, "k1")


# -- pods: which stage failed, what it said, how long each container ran ------------------------


def _terminated(
    name: str, code: int, start: float, end: float, reason="", message=""
) -> client.V1ContainerStatus:
    state = client.V1ContainerStateTerminated(
        exit_code=code, reason=reason or ("Completed" if code == 0 else "Error"), message=message or None,
        started_at=_at(start), finished_at=_at(end),
    )  # fmt: skip
    return client.V1ContainerStatus(
        name=name, image="finetune:0.1.0", image_id="", ready=False, restart_count=0,
        state=client.V1ContainerState(terminated=state),
    )  # fmt: skip


def _pod(name: str, job: dict, created: float = 0, index: str | None = None, **status) -> dict:
    """A pod of a rendered Job (its containers), with a status as the kubelet reports it."""
    spec = job["spec"]["template"]["spec"]
    meta = client.V1ObjectMeta(
        name=name,
        creation_timestamp=_at(created),
        annotations={views.INDEX_ANNOTATION: index} if index is not None else None,
    )
    pod = client.V1Pod(
        metadata=meta, spec=client.V1PodSpec.from_dict(spec), status=client.V1PodStatus(**status)
    )
    return SERIALIZE(pod)


def test_the_failed_container_names_the_stage_and_its_last_log_line_the_cause():
    evaluate_job = jobs.evaluate_job(load_config(CLUSTER_CONFIG))
    log = "pushing version 3\nfinetune push: failed: infra validation: the model did not load\n"
    pod = _pod(
        "beans-evaluate-x7k2p",
        evaluate_job,
        phase="Failed",
        init_container_statuses=[_terminated("evaluate", 0, 10, 76)],
        container_statuses=[_terminated("push", 1, 77, 80, message=log)],
    )
    assert views.failed_stage([pod], ["evaluate", "push"]) == "push"
    assert views.pod_failures([pod]) == [
        "beans-evaluate-x7k2p/push exited 1 (Error): "
        "finetune push: failed: infra validation: the model did not load"
    ]
    assert views.container_seconds(pod) == {"evaluate": 66.0, "push": 3.0}
    init_failed = _pod(
        "beans-evaluate-a1",
        evaluate_job,
        phase="Failed",
        init_container_statuses=[_terminated("evaluate", 2, 1, 2)],
    )
    assert views.failed_stage([init_failed], ["evaluate", "push"]) == "evaluate"
    assert views.failed_stage([], ["evaluate", "push"]) == "evaluate"


def test_the_first_worker_to_fail_comes_first_and_an_eviction_is_reported():
    train_job = jobs.train_job(load_config(CLUSTER_CONFIG))
    stopped = _pod("beans-train-0-aaaaa", train_job, index="0", phase="Failed",
                   container_statuses=[_terminated("train", 143, 0, 200)])  # fmt: skip
    cause = _pod("beans-train-1-bbbbb", train_job, index="1", phase="Failed",
                 container_statuses=[_terminated("train", 137, 0, 190, reason="OOMKilled")])  # fmt: skip
    evicted = _pod("beans-train-1-ccccc", train_job, index="1", phase="Failed", reason="Evicted",
                   message="The node was low on resource: memory.")  # fmt: skip
    assert views.pod_failures([stopped, cause, evicted]) == [
        "beans-train-1-ccccc: Evicted: The node was low on resource: memory.",
        "beans-train-1-bbbbb/train exited 137 (OOMKilled)",
        "beans-train-0-aaaaa/train exited 143 (Error)",
    ]


def test_a_pod_stuck_pending_says_why():
    train_job = jobs.train_job(load_config(CLUSTER_CONFIG))
    unschedulable = client.V1PodCondition(
        type="PodScheduled",
        status="False",
        reason="Unschedulable",
        message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )
    stuck = _pod("beans-train-0-aaaaa", train_job, index="0", phase="Pending", conditions=[unschedulable])
    waiting = client.V1ContainerState(
        waiting=client.V1ContainerStateWaiting(reason="ImagePullBackOff", message="Back-off pulling image")
    )
    status = client.V1ContainerStatus(
        name="train", image="i", image_id="", ready=False, restart_count=0, state=waiting
    )
    pulling = _pod("beans-train-1-bbbbb", train_job, index="1", phase="Pending", container_statuses=[status])
    starting = _pod("beans-train-1-ccccc", train_job, index="1", phase="Pending")  # says nothing yet
    assert views.pod_failures([stuck, pulling, starting]) == [
        "beans-train-0-aaaaa: still pending: Unschedulable: 0/3 nodes are available: 3 Insufficient "
        "nvidia.com/gpu.",
        "beans-train-1-bbbbb: still pending: train ImagePullBackOff: Back-off pulling image",
    ]


# -- finetune logs: which containers, with which prefix ------------------------------------------


def test_log_lines_of_an_indexed_job_are_prefixed_with_the_index_and_the_try():
    train_job = jobs.train_job(load_config(CLUSTER_CONFIG))
    running = {"container_statuses": [client.V1ContainerStatus(
        name="train", image="i", image_id="", ready=True, restart_count=0,
        state=client.V1ContainerState(running=client.V1ContainerStateRunning(started_at=T0)),
    )]}  # fmt: skip
    pods = [
        _pod("beans-train-1-second", train_job, created=60, index="1", phase="Running", **running),
        _pod("beans-train-0-aaaaa", train_job, created=0, index="0", phase="Running", **running),
        _pod("beans-train-1-first", train_job, created=0, index="1", phase="Failed",
             container_statuses=[_terminated("train", 1, 0, 50)]),
        _pod("beans-train-2-ccccc", train_job, created=0, index="2", phase="Pending"),
    ]  # fmt: skip
    sources = views.log_sources(pods)
    assert [(s.pod, s.prefix, s.started) for s in sources] == [
        ("beans-train-0-aaaaa", "[0] ", True),
        ("beans-train-1-first", "[1 try 1] ", True),
        ("beans-train-1-second", "[1 try 2] ", True),
        ("beans-train-2-ccccc", "[2] ", False),
    ]


def test_log_lines_of_evaluate_and_push_are_prefixed_with_the_container():
    evaluate_job = jobs.evaluate_job(load_config(CLUSTER_CONFIG))
    pod = _pod("beans-evaluate-x", evaluate_job, phase="Succeeded",
               init_container_statuses=[_terminated("evaluate", 0, 0, 9)],
               container_statuses=[_terminated("push", 0, 9, 12)])  # fmt: skip
    assert [(s.container, s.prefix) for s in views.log_sources([pod])] == [
        ("evaluate", "[evaluate] "),
        ("push", "[push] "),
    ]
    assert [(s.container, s.prefix) for s in views.log_sources([pod], "push")] == [("push", "[push] ")]
    driver_pod = _pod("beans-driver-q", jobs.driver_job(load_config(CLUSTER_CONFIG)), phase="Pending")
    assert [(s.container, s.prefix, s.started) for s in views.log_sources([driver_pod])] == [
        ("driver", "", False)
    ]


# -- finetune status -----------------------------------------------------------------------------


def test_status_shows_the_drivers_then_each_stage_and_the_schedule():
    now = _at(600)
    found = [
        _job("beans-train", "train", created=30, start_time=_at(30), active=2, ready=2),
        _job("beans-driver", "driver", created=0, start_time=T0, active=1, ready=1),
        _job("beans-preprocess", "preprocess", created=5, start_time=_at(5), completion_time=_at(24),
             succeeded=1, conditions=[_condition("Complete")]),
        _job("beans-schedule-29411280", "driver", created=-86400, start_time=_at(-86400),
             conditions=[_condition("Failed", "PodFailurePolicy", "Container driver exited with 1")]),
    ]  # fmt: skip
    cron_job = jobs.cron_job(load_config(CLUSTER_CONFIG), "0 2 * * *")
    schedule = SERIALIZE(to_model(cron_job | {"status": {"lastScheduleTime": "2026-11-26T02:00:00Z"}}))
    lines = views.status_lines("beans", found, schedule, now, tuple(driver.JOB_STAGES))
    rows = [line.split() for line in lines[1:5]]
    assert lines[0].split() == ["JOB", "STATUS", "START", "DURATION", "DETAIL"]
    assert rows[0][:2] == ["beans-schedule-29411280", "failed"] and "PodFailurePolicy" in lines[1]
    assert rows[1][:6] == ["beans-driver", "active", "2026-11-26", "02:00:05Z", "10m00s", "running:"]
    assert rows[2] == ["beans-preprocess", "succeeded", "2026-11-26", "02:00:10Z", "19s"]
    assert rows[3][:5] == ["beans-train", "active", "2026-11-26", "02:00:35Z", "9m30s"]
    assert lines[5].split()[:3] == ["beans-evaluate", "not", "created"]
    assert lines[6] == "schedule beans-schedule: '0 2 * * *' (Etc/UTC), last run 2026-11-26 02:00:00Z"


# -- the scheduled run: no new data --------------------------------------------------------------


def _stub_stages(monkeypatch, fail: str | None = None) -> None:
    """The orchestrator's stage table with each stage's TensorFlow work replaced by writing its
    summary.json (``fail``: that stage raises): the record code that writes run.json is real."""
    stages = []
    for stage in orchestrator.STAGES:
        module = types.ModuleType(f"k8s_test_stage_{stage.name}")

        def run(config: Config, name: str = stage.name) -> None:
            if name == fail:
                raise StageError(f"{name} broke")
            storage.write_text(storage.join(config.run_dir, name, "summary.json"), '{"status": "ok"}')

        module.run = run
        monkeypatch.setitem(sys.modules, module.__name__, module)

        def finished(config: Config, name: str = stage.name) -> dict | None:
            folder = storage.join(config.run_dir, name)
            return {"dir": folder} if storage.exists(storage.join(folder, "summary.json")) else None

        stages.append(orchestrator.Stage(stage.name, module.__name__, finished))
    monkeypatch.setattr(orchestrator, "STAGES", tuple(stages))


def _data_config(tmp_path: Path) -> tuple[Config, Path]:
    source = tmp_path / "images"
    for label, data in (("healthy", b"leaf-1"), ("rust", b"leaf-2")):
        (source / label).mkdir(parents=True, exist_ok=True)
        (source / label / "1.jpg").write_bytes(data)
    return load_config(None, [f"data.source={source}", f"run_dir={tmp_path / 'run'}"]), source


def test_a_scheduled_run_has_no_new_data_when_the_last_successful_run_saw_the_same(tmp_path, monkeypatch):
    config, source = _data_config(tmp_path)
    assert run_record.has_new_data(run_record.load(config.run_dir), "anything")  # no run yet
    _stub_stages(monkeypatch)
    pipeline_run.run(config)
    record = run_record.load(config.run_dir)
    assert record.status == "ok"
    fingerprint = keys.input_fingerprint(config)  # the content of data.source, wherever it lies
    assert record.input_fingerprint == fingerprint
    assert not run_record.has_new_data(record, fingerprint)
    (source / "rust" / "2.jpg").write_bytes(b"leaf-3")  # a new image
    assert run_record.has_new_data(record, keys.input_fingerprint(config))


class _EvaluateFailsInJobs:
    """An executor that records what the Kubernetes executor records when the evaluate Job
    fails (the orchestrator's loop and run.json are real; only the cluster is absent)."""

    name, resume, driver = "drive", "submit again", "kubernetes"

    def groups(self, config):
        return (("preprocess", ("preprocess",)), ("train", ("train",)), ("evaluate", ("evaluate", "push")))

    def prepare(self, config):
        pass

    def execute(self, config, record, group, stages, why):
        for stage in stages:
            record.stages[stage].start(why, job=f"beans-{group[0]}")
        if group[0] == "evaluate":
            record.stages["evaluate"].fail(1.0, "DeadlineExceeded")
            raise StageFailed("evaluate", "DeadlineExceeded")
        for stage in stages:
            record.stages[stage].done(1.0, orchestrator.outputs_of(config, stage))


def test_a_failed_run_keeps_the_last_success_so_a_failure_is_not_mistaken_for_news(tmp_path, monkeypatch):
    config, source = _data_config(tmp_path)
    _stub_stages(monkeypatch)
    pipeline_run.run(config)
    ok = run_record.load(config.run_dir)
    fingerprint = ok.input_fingerprint
    # the driver's record of the next run carries the last success forward, and fails
    with pytest.raises(StageError, match="stage 'evaluate' failed: DeadlineExceeded.*submit again"):
        orchestrator.orchestrate(config, _EvaluateFailsInJobs(), force=True)
    failed = run_record.load(config.run_dir)
    assert failed.status == "failed" and failed.driver == "kubernetes"
    assert failed.last_success == {"input_fingerprint": fingerprint, "finished": ok.finished}
    assert not run_record.has_new_data(failed, fingerprint)
    assert failed.stages["push"].reason == orchestrator.NO_REGISTRY  # as pipeline.run records it
    assert set(failed.stages) == {s.name for s in orchestrator.STAGES}
    # a failed `finetune run` (pipeline.run's own record) knows no success: the next run goes ahead
    _stub_stages(monkeypatch, fail="train")
    with pytest.raises(StageError, match="stage 'train' failed: train broke"):
        pipeline_run.run(config, force=True)
    assert run_record.load(config.run_dir).status == "failed"
    assert run_record.has_new_data(run_record.load(config.run_dir), fingerprint)


def test_the_cron_job_runs_the_driver_with_if_new_data_and_a_submitted_run_without():
    config = load_config(CLUSTER_CONFIG)
    scheduled = jobs.cron_job(config, "0 2 * * *")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    submitted = jobs.driver_job(config)["spec"]["template"]["spec"]
    for pod, expected in ((scheduled, True), (submitted, False)):
        (container,) = pod["containers"]
        args = build_parser().parse_args(container["args"])  # the pod's argv, read by this CLI
        assert args.command == "drive" and args.if_new_data is expected
    assert IF_NEW_DATA in (ROOT / "k8s" / "overlays" / "cpu" / "schedule.yaml").read_text()


def test_the_driver_job_is_retried_only_when_it_crashed():
    """Exit 1 (a stage failed) and 2 (bad configuration) are final; an evicted driver pod does
    not count; the stage Jobs never retry a bad configuration."""
    config = load_config(CLUSTER_CONFIG)
    rules = jobs.driver_job(config)["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "driver", "operator": "In", "values": [1, 2]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    for stage in ("preprocess", "evaluate"):
        (rule,) = jobs.stage_jobs(config)[stage]["spec"]["podFailurePolicy"]["rules"]
        assert rule == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}


@pytest.mark.parametrize("gpus", [0, 2])
def test_every_manifest_sent_is_the_rendered_one(gpus):
    """The typed calls take the client's models: each rendered manifest survives the trip (a
    GPU count too: the models take quantities only as strings)."""
    config = load_config(CLUSTER_CONFIG, [f"cluster.gpus_per_worker={gpus}"])
    for file in render.manifest_files(config, "0 2 * * *"):
        for doc in file.documents:
            assert SERIALIZE(to_model(doc)) == doc, f"{file.name}: {doc['kind']}"


# -- cron schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    ["0 2 * * *", "*/15 * * * *", "30 1 * * MON-FRI", "0 0 1,15 jan-jun ?", "5 4 * * 0-6/2", "@daily"],
)
def test_good_cron_schedules(schedule):
    assert cron.problem(schedule) is None


@pytest.mark.parametrize(
    "schedule, problem",
    [
        ("nightly", "1 field, expected 5"),
        ("0 2 * *", "4 fields, expected 5"),
        ("0 2 * * * *", "6 fields, expected 5"),
        ("60 2 * * *", "minute '60': 60 is outside 0-59"),
        ("0 24 * * *", "hour '24': 24 is outside 0-23"),
        ("0 2 0 * *", "day of month '0': 0 is outside 1-31"),
        ("0 2 * 13 *", "month '13': 13 is outside 1-12"),
        ("0 2 * * 7", "day of week '7': 7 is outside 0-6"),
        ("0 2 * * FRI-MON", "the range 'FRI-MON' runs backwards"),
        ("*/0 2 * * *", "step '0' must be a whole number above 0"),
        ("0 2 L * *", "'L' is not a value 1-31"),
        ("0 2 * * SUNDAY", "'SUNDAY' is not a value 0-6 or SUN-SAT"),
        ("TZ=UTC 0 2 * * *", "no TZ= prefix"),
        ("@every 1h", "2 fields, expected 5"),
    ],
)
def test_bad_cron_schedules_say_what_is_wrong(schedule, problem):
    assert problem in cron.problem(schedule)


def test_schedule_checks_the_cron_expression_before_looking_for_a_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["schedule", "--config", CLUSTER_CONFIG, "--cron", "0 25 * * *"]) == 2
    err = capsys.readouterr().err
    assert "--cron: '0 25 * * *' is not a cron schedule: five fields" in err and "hour '25'" in err
    assert main(["render", "--config", CLUSTER_CONFIG, "--schedule", "0 2 * * 8"]) == 2
    assert "--schedule: '0 2 * * 8' is not a cron schedule" in capsys.readouterr().err


# -- reaching the cluster ------------------------------------------------------------------------


@pytest.fixture
def no_pod(monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_without_a_kubeconfig_each_command_says_what_to_check(tmp_path, monkeypatch, capsys, no_pod):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none" / "config"))
    with pytest.raises(ConfigError, match="no kubeconfig: .*none/config does not exist"):
        connect()
    for argv in (
        ["status", "beans"],
        ["logs", "beans", "--stage", "train"],
        ["unschedule", "beans"],
        ["submit", "--config", CLUSTER_CONFIG],
        ["schedule", "--config", CLUSTER_CONFIG, "--cron", "0 2 * * *"],
        ["drive", "--config", CLUSTER_CONFIG],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("finetune: error: no kubeconfig:") and "Traceback" not in err
        assert "kubectl config get-contexts" in err and err.count("\n") == 1


def _kubeconfig(tmp_path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "dev",
            }
        )
    )
    return path


def test_an_unknown_context_is_a_configuration_error(tmp_path, monkeypatch, capsys, no_pod):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, "https://127.0.0.1:6443")))
    assert main(["status", "beans", "--context", "prod"]) == 2
    assert "has no context 'prod'; see `kubectl config get-contexts`" in capsys.readouterr().err


def test_an_unreachable_api_server_is_one_line_and_exit_code_1(tmp_path, monkeypatch, capsys, no_pod):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, f"https://127.0.0.1:{port}")))
    assert main(["status", "beans", "--context", "dev"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"finetune status: failed: cannot reach the Kubernetes API server at https://127.0.0.1:{port}"
    )
    assert "context 'dev'" in err and "kubectl cluster-info" in err
    assert "Traceback" not in err and "Retrying" not in err and err.count("\n") == 1


@pytest.mark.skipif(Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists(), reason="in a pod")
def test_in_a_pod_without_a_service_account_token_says_so(monkeypatch, capsys):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert main(["status", "beans"]) == 2
    assert "its service account cannot be used: Service token file does not exist" in capsys.readouterr().err


def test_the_driver_checks_the_configuration_before_the_cluster(tmp_path, monkeypatch, capsys, no_pod):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert main(["drive", "--config", str(ROOT / "configs" / "beans.yaml")]) == 2
    assert "run_dir: 'runs/beans' must be a gs:// URI on a cluster" in capsys.readouterr().err


def test_a_bad_run_name_is_refused_before_connecting(capsys):
    assert main(["status", "Beans_1"]) == 2
    assert "'Beans_1' is not a run name" in capsys.readouterr().err


# -- --help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            "submit",
            [
                "--wait",
                "--context CTX",
                "--namespace NS",
                "finetune submit --config configs/beans-cluster.yaml",
            ],
        ),
        ("status", ["RUN", "finetune status beans"]),
        (
            "logs",
            [
                "--stage {driver,preprocess,train,evaluate,push,predict}",
                "--follow",
                "finetune logs beans --follow",
            ],
        ),
        (
            "schedule",
            ["--cron CRON", "'no new data'", "finetune schedule --config configs/beans-cluster.yaml"],
        ),
        ("unschedule", ["NAME", "finetune unschedule beans"]),
        ("drive", ["--if-new-data", "cluster.backoff_limit", "examples:"]),
    ],
)
def test_each_cluster_command_explains_itself(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for text in expected:
        assert text in out, text
    main_help = build_parser().format_help()
    assert command in main_help


# -- a stage stuck past its deadline ---------------------------------------------------------------


def test_a_stage_past_its_deadline_stops_the_run_with_its_pods_last_events():
    waiting = views.JobState(views.PENDING, active=1, started="2026-12-05T01:00:00Z")
    overdue = views.overdue(waiting, seconds=87000, limit=86400 + 600)
    assert overdue.phase == views.FAILED and overdue.reason == "DeadlineExceeded"
    assert (
        overdue.message == "still waiting to start after 24h10m, over cluster.stage_timeout_seconds (24h10m)"
    )
    decision = driver.next_action("train", overdue, restarts=0, max_restarts=3)
    assert decision.action == driver.STOP  # no new worker group helps a pod that cannot be scheduled

    def event(pod, reason, message, at, count=1):
        return {"involvedObject": {"kind": "Pod", "name": pod}, "reason": reason, "message": message,
                "lastTimestamp": at, "count": count}  # fmt: skip

    events = [
        event("beans-train-1-b", "Pulled", "image pulled", "2026-12-05T01:00:03Z"),
        event(
            "beans-train-0-a",
            "FailedScheduling",
            "0/3 nodes: 3 Insufficient nvidia.com/gpu.",
            "2026-12-05T02:00:00Z",
            count=42,
        ),  # fmt: skip
        event("beans-train-0-a", "Scheduled", "never", "2026-12-05T00:59:00Z"),
        event("beans-train-0-a", "NotTriggerScaleUp", "pod didn't trigger scale-up", "2026-12-05T01:30:00Z"),
    ]
    lines = views.last_events(events)
    assert lines == [  # pods in the order their first event came, each with its last two
        "beans-train-0-a: NotTriggerScaleUp: pod didn't trigger scale-up",
        "beans-train-0-a: FailedScheduling: 0/3 nodes: 3 Insufficient nvidia.com/gpu. (x42)",
        "beans-train-1-b: Pulled: image pulled",
    ]
    text = driver.failure_text(
        f"{overdue.reason}: {overdue.message}", ["beans-train-0-a: still pending"], lines
    )
    assert text.startswith("DeadlineExceeded: still waiting to start after 24h10m")
    assert text.endswith("; last events: " + "; ".join(lines))
