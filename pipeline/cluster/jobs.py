"""The run's Jobs and CronJob (see ``pipeline.cluster.manifests`` for the design), and the
pieces every Job is built from (:func:`stage_container`, :func:`pod_spec`, :func:`stage_job`),
which the predict Job (``pipeline.cluster.predict_jobs``) shares.

Every container runs ``finetune <stage> --config /etc/finetune/config.yaml`` (``command``
plus ``args`` is the whole argv), as the image's non-root user, on a read-only root file
system, with the configuration mounted read-only, an ``emptyDir`` at ``/tmp`` (scratch space:
Beam's spill files, Matplotlib's cache; on the node's disk, shared by a pod's containers and
deleted with the pod) and the credentials the configuration names; nothing else.
"""

from __future__ import annotations

from typing import Any

from components.config import Config
from components.train import distribute
from pipeline.cluster.manifests import (
    BAD_CONFIG_EXIT,
    CONFIG_DIR,
    CONFIG_PATH,
    DRIVER_ARGS,
    DRIVER_RESOURCES,
    GPU_RESOURCE,
    IF_NEW_DATA,
    KEY_DIR,
    KEY_FILE,
    RUN_AS_UID,
    SCRATCH_DIR,
    STAGE_FAILED_EXIT,
    WORKER_PORT,
    Manifest,
    image,
    labels,
    object_metadata,
    resource_name,
    worker_hosts,
)

# The driver stops waiting for a stage Job this long after the Job's own activeDeadlineSeconds
# (cluster.stage_timeout_seconds), should the Job controller not have ended it by then.
DEADLINE_GRACE_SECONDS = 600
POD_NAMESPACE = {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
LOCKED_DOWN = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def stage_container(config: Config, name: str, args: list[str], **extra: Any) -> Manifest:
    """One ``finetune`` container with the configuration and the credentials mounted."""
    env = list(extra.pop("env", []))
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if config.cluster.credentials_secret:
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{KEY_DIR}/{KEY_FILE}"})
        mounts.append({"name": "credentials", "mountPath": KEY_DIR, "readOnly": True})
    container = {
        "name": name,
        "image": image(config),
        "imagePullPolicy": "IfNotPresent",
        "command": ["finetune"],
        "args": args,
        # a failed container's last log lines become its termination message (the driver reports it)
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    container |= ({"env": env} if env else {}) | extra
    return container | {"volumeMounts": mounts, "securityContext": LOCKED_DOWN}


def stage_args(stage: str) -> list[str]:
    return [stage, "--config", CONFIG_PATH]


def resources(config: Config, gpus: int = 0) -> Manifest:
    """A stage container's requests and limits: ``cluster.cpu`` and ``cluster.memory``, and
    ``gpus`` GPUs. Quantities are strings: the client's models refuse a number (an ``int`` GPU
    count made creating a GPU Job fail before anything was sent)."""
    c = config.cluster
    limits: dict[str, Any] = {"memory": c.memory} | ({GPU_RESOURCE: str(gpus)} if gpus else {})
    return {"requests": {"cpu": c.cpu, "memory": c.memory}, "limits": limits}


def pod_spec(
    config: Config,
    account: str,
    containers: list[Manifest],
    *,
    config_map: str | None = None,
    **extra: Any,
) -> Manifest:
    """A pod that runs once (``restartPolicy: Never``: the Job decides about retries), with
    the ConfigMap ``config_map`` (default: the run's, ``<name>-config``) at :data:`CONFIG_DIR`.

    Stage pods never call the Kubernetes API, so they get no API token, unless Workload
    Identity is on: GKE's metadata server exchanges the pod's service-account token for
    Google credentials, and pods without it cannot reach the bucket."""
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": config_map or resource_name(config, "config")}},
        {"name": "scratch", "emptyDir": {}},
    ]
    if config.cluster.credentials_secret:
        volumes.append({"name": "credentials", "secret": {"secretName": config.cluster.credentials_secret}})
    spec: Manifest = {"serviceAccountName": resource_name(config, account)}
    if account == "stage" and not config.cluster.workload_identity:
        spec["automountServiceAccountToken"] = False
    spec |= {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return spec | extra | {"containers": containers, "volumes": volumes}


def stage_job(config: Config, stage: str, pod: Manifest, *, name: str | None = None, **spec: Any) -> Manifest:
    """A Job of ``pod`` named after ``stage`` (or ``name``), labelled with ``stage`` as its
    component, failed by Kubernetes once it has been active for
    ``cluster.stage_timeout_seconds`` (``DeadlineExceeded``: the driver stops the run and says
    so); ``spec`` keys override the defaults."""
    c = config.cluster
    spec = (
        {"backoffLimit": c.backoff_limit, "activeDeadlineSeconds": c.stage_timeout_seconds}
        | spec
        | {"ttlSecondsAfterFinished": c.ttl_seconds_after_finished}
    )
    spec["template"] = {"metadata": {"labels": labels(config, stage)}, "spec": pod}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_metadata(config, name or resource_name(config, stage), stage),
        "spec": spec,
    }


def fail_on_exit(*codes: int, container: str | None = None) -> Manifest:
    """A podFailurePolicy rule that fails the Job at once when a container exits with one of
    ``codes`` (2: a bad configuration, which a retry cannot fix); ``container`` None: any."""
    exits: Manifest = {"containerName": container} if container else {}
    return {"action": "FailJob", "onExitCodes": exits | {"operator": "In", "values": list(codes)}}


def node_selector(config: Config, gpus: int = 0) -> Manifest:
    selector = dict(config.cluster.node_selector) | (dict(config.cluster.gpu_node_selector) if gpus else {})
    return {"nodeSelector": selector} if selector else {}


def preprocess_job(config: Config) -> Manifest:
    """``finetune preprocess``: Beam's local runner in the pod, or a submission to Dataflow or
    Flink. A retry is safe: the stage publishes its outputs atomically."""
    container = stage_container(config, "preprocess", stage_args("preprocess"), resources=resources(config))
    pod = pod_spec(config, "stage", [container], **node_selector(config))
    return stage_job(config, "preprocess", pod, podFailurePolicy={"rules": [fail_on_exit(BAD_CONFIG_EXIT)]})


def train_job(config: Config) -> Manifest:
    """The worker group: an Indexed Job of ``cluster.workers`` pods that all start together,
    fail together (``backoffLimit: 0``) and find each other through the headless Service."""
    gpus, n = config.cluster.gpus_per_worker, config.cluster.workers
    env = [POD_NAMESPACE, {"name": distribute.HOSTS_ENV, "value": ",".join(worker_hosts(config))}]
    container = stage_container(
        config,
        "train",
        stage_args("train"),
        env=env,
        ports=[{"name": "grpc", "containerPort": WORKER_PORT}],
        resources=resources(config, gpus),
    )
    extra: Manifest = {"subdomain": resource_name(config, "train")} | node_selector(config, gpus)
    if gpus:
        extra["tolerations"] = [GPU_TOLERATION]
    return stage_job(
        config,
        "train",
        pod_spec(config, "stage", [container], **extra),
        backoffLimit=0,
        completionMode="Indexed",
        completions=n,
        parallelism=n,
        podFailurePolicy={"rules": [fail_on_exit(BAD_CONFIG_EXIT, container="train")]},
    )


def evaluate_job(config: Config) -> Manifest:
    """``finetune evaluate`` (gate and export) as an init container, then ``finetune push``
    when ``registry.uri`` is set; without it, evaluate is the only container."""
    requests = resources(config)
    evaluate = stage_container(config, "evaluate", stage_args("evaluate"), resources=requests)
    policy = {"podFailurePolicy": {"rules": [fail_on_exit(BAD_CONFIG_EXIT)]}}
    if not config.registry.uri:
        pod = pod_spec(config, "stage", [evaluate], **node_selector(config))
        return stage_job(config, "evaluate", pod, **policy)
    push = stage_container(config, "push", stage_args("push"), resources=requests)
    pod = pod_spec(config, "stage", [push], initContainers=[evaluate], **node_selector(config))
    return stage_job(config, "evaluate", pod, **policy)


def driver_job(config: Config, scheduled: bool = False) -> Manifest:
    """The driver: runs the stages in order by creating their Jobs and waiting for each,
    and writes ``run.json`` (``pipeline.cluster.driver``).

    A driver pod that crashed or was evicted is retried and resumes after the last finished
    stage (adopting a stage Job still running); one that stopped the run at a failed stage
    (exit 1) or on a bad configuration (exit 2) is final. ``scheduled``: the CronJob's
    driver, which ends early when the input data did not change since the last successful run.
    """
    args = list(DRIVER_ARGS) + ([IF_NEW_DATA] if scheduled else [])
    container = stage_container(config, "driver", args, env=[POD_NAMESPACE], resources=DRIVER_RESOURCES)
    rules = [
        fail_on_exit(STAGE_FAILED_EXIT, BAD_CONFIG_EXIT, container="driver"),
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    pod = pod_spec(config, "driver", [container])
    return stage_job(
        config,
        "driver",
        pod,
        podFailurePolicy={"rules": rules},
        activeDeadlineSeconds=driver_deadline(config),
    )


def driver_deadline(config: Config) -> int:
    """The driver Job's ``activeDeadlineSeconds``: every stage Job at its deadline (plus the
    grace the driver gives it), the worker group recreated ``cluster.backoff_limit`` times,
    and an hour for the driver's own work."""
    c = config.cluster
    per_job = c.stage_timeout_seconds + DEADLINE_GRACE_SECONDS
    return per_job * (len(stage_jobs(config)) + c.backoff_limit) + 3600


def cron_job(config: Config, schedule: str) -> Manifest:
    """The CronJob that creates the driver Job on ``schedule`` (UTC). A run still going
    when the next is due makes that one skip (``Forbid``: the stage Jobs' names are
    fixed); a run that could not start within ``cluster.starting_deadline_seconds`` is
    skipped too. Its driver ends early, with "no new data", when the input data's
    fingerprint equals that of the last successful run."""
    driver = driver_job(config, scheduled=True)
    name = resource_name(config, "schedule")
    return cron_envelope(config, name, "schedule", schedule, {"labels": labels(config, "driver")}, driver)


def cron_envelope(
    config: Config, name: str, component: str, schedule: str, template: Manifest, job: Manifest
) -> Manifest:
    """A CronJob named ``name`` that creates ``job`` (its spec, with ``template`` as the Jobs'
    metadata) on ``schedule`` (UTC). ``Forbid``: a run still going makes the next skip, since
    each writes the same outputs; one that could not start within
    ``cluster.starting_deadline_seconds`` is skipped too; the last 3 of each outcome stay."""
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_metadata(config, name, component),
        "spec": {
            "schedule": schedule.strip(),
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": config.cluster.starting_deadline_seconds,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": template, "spec": job["spec"]},
        },
    }


def stage_jobs(config: Config) -> dict[str, Manifest]:
    """The Jobs the driver creates, in order, by the stage they run first."""
    return {
        "preprocess": preprocess_job(config),
        "train": train_job(config),
        "evaluate": evaluate_job(config),
    }
