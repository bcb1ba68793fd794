"""Kubernetes manifests for one run, as plain dicts: pure functions of the configuration.

Every stage runs as its own Job, named ``<name>-<stage>`` (the stable stage names of
``pipeline.orchestrator.STAGES``), from one image whose entry point is ``finetune``; each pod reads
the resolved configuration from the ConfigMap ``<name>-config`` at :data:`CONFIG_PATH`.

* ``<name>-driver`` (Job, service account ``<name>-driver``): runs the stages in order,
  creating each stage's Job from these same functions and waiting for it, and writes
  ``run.json``. Its Role lets it create, watch and delete Jobs and Services and read pods
  and their logs, in its namespace only.
* ``<name>-preprocess``: Beam on its local runner inside the pod, or the submission of the
  pipeline to Dataflow or Flink (``preprocess.runner``, ``preprocess.pipeline_options``).
* ``<name>-train``: an Indexed Job of ``cluster.workers`` pods plus the headless Service
  ``<name>-train``; each pod derives TF_CONFIG from its index and the Service's DNS names
  (``components.train.distribute``). MultiWorkerMirroredStrategy cannot lose a worker and go
  on, so a failure must restart the whole group: ``backoffLimit: 0`` (with
  ``restartPolicy: Never``) fails the Job at the first failed pod, the Job controller then
  stops the others, and the driver deletes the Job and creates it again (up to
  ``cluster.backoff_limit`` times); the new group resumes from ``<run_dir>/train/backup``
  on gs://. Per-index retries (``backoffLimitPerIndex``) would restart one pod into a
  group that cannot take it back. A pod that exits 2 (a bad configuration) fails the Job
  through ``podFailurePolicy`` instead, with reason ``PodFailurePolicy``: the driver does
  not retry what cannot succeed.
* ``<name>-evaluate``: ``finetune evaluate`` (an init container), then ``finetune push``
  when ``registry.uri`` is set.
* ``<name>-schedule`` (CronJob, only with a schedule): creates the driver Job.
* ``<name>-predict-*`` (Jobs, CronJob and their ConfigMaps): batch prediction, apart from the
  run (``pipeline.cluster.predict_jobs``).

Credentials come from the cluster, never the image: a Workload Identity annotation on the
service accounts, or the key Secret ``cluster.credentials_secret`` mounted in every pod.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from components.config import Config, to_yaml
from components.core.errors import ConfigError
from components.core.storage import is_gcs
from pipeline.cluster import cron

Manifest = dict[str, Any]

CONFIG_DIR = "/etc/finetune"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
SCRATCH_DIR = "/tmp"  # an emptyDir: the only writable path besides the outputs (root fs read-only)
KEY_DIR = "/var/secrets/google"
KEY_FILE = "key.json"
WORKER_PORT = 2222
RUN_AS_UID = 1000  # the Dockerfile's user
MAX_NAME = 40  # <name>-preprocess (Job), <name>-train-<index> (hostname) and <name>-schedule (CronJob)
BAD_CONFIG_EXIT = 2  # pipeline.cli: a bad configuration; retrying cannot help
DRIVER_ARGS = ("drive", "--config", CONFIG_PATH)
IF_NEW_DATA = "--if-new-data"  # the scheduled driver's flag: end early when the data did not change
STAGE_FAILED_EXIT = 1  # pipeline.cli: the driver stopped the run at a failed stage; final
DRIVER_RESOURCES = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"
GPU_RESOURCE = "nvidia.com/gpu"
NO_IMAGE = (
    "cluster.image: required to run on a cluster: the image built from the Dockerfile, "
    "e.g. europe-docker.pkg.dev/PROJECT/REPO/finetune:0.1.0"
)


def check(config: Config, schedule: str | None = None) -> None:
    """What a cluster run needs beyond a valid configuration.

    Raises:
        ConfigError: listing every problem (no image, local paths the pods cannot read, a
            name too long for the Job names, a bad schedule).
    """
    problems = [] if config.cluster.image else [NO_IMAGE]
    if len(config.name) > MAX_NAME:
        problems.append(
            f"name: '{config.name}' has {len(config.name)} characters; on a cluster at most {MAX_NAME} "
            f"(it prefixes Job names such as {config.name}-preprocess, limited to 63)"
        )
    for key, value in (("run_dir", config.run_dir), ("data.source", config.data.source)):
        if not is_gcs(value):
            problems.append(f"{key}: '{value}' must be a gs:// URI on a cluster (pods share no local disk)")
    if config.registry.uri and not is_gcs(config.registry.uri):
        problems.append(f"registry.uri: '{config.registry.uri}' must be a gs:// URI (or empty) on a cluster")
    weights = config.model.weights
    if weights.lower() not in ("imagenet", "none") and not is_gcs(weights):
        problems.append(f"model.weights: '{weights}' must be imagenet, none or a gs:// URI on a cluster")
    bad_schedule = None if schedule is None else cron.check_message(schedule, "--schedule")
    if bad_schedule:
        problems.append(bad_schedule)
    if problems:
        raise ConfigError("cannot run on a cluster:\n  " + "\n  ".join(problems))


def resource_name(config: Config, part: str) -> str:
    """``<name>-<part>``: the stable name of a run's Job, Service or account."""
    return f"{config.name}-{part}"


def labels(config: Config, component: str) -> dict[str, str]:
    """The labels of every object and pod of the run (the Service selects training pods)."""
    return {
        "app.kubernetes.io/name": "finetune",
        "app.kubernetes.io/instance": config.name,
        "app.kubernetes.io/component": component,
    }


def object_metadata(config: Config, name: str, component: str, **extra: Any) -> Manifest:
    meta = {"name": name, "namespace": config.cluster.namespace, "labels": labels(config, component)}
    return meta | extra


def image(config: Config) -> str:
    """``cluster.gpu_image`` (when set) for a run with GPUs, else ``cluster.image``."""
    c = config.cluster
    return c.gpu_image if c.gpus_per_worker and c.gpu_image else c.image


def config_map(config: Config) -> Manifest:
    """The resolved configuration, mounted by every pod at :data:`CONFIG_PATH`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(config, resource_name(config, "config"), "config"),
        "data": {"config.yaml": to_yaml(config)},
    }


def service_accounts(config: Config) -> list[Manifest]:
    """``<name>-driver`` (bound to the driver's Role) and ``<name>-stage`` (stage pods; no
    Kubernetes rights, storage access only), both annotated for Workload Identity."""
    gsa = config.cluster.workload_identity
    annotations = {"annotations": {WORKLOAD_IDENTITY: gsa}} if gsa else {}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": object_metadata(config, resource_name(config, part), part, **annotations),
        }
        for part in ("driver", "stage")
    ]


# Pod Security admission labels: pods that break the restricted standard are refused (enforce),
# and reported (warn, audit). Every pod this package renders meets it (tests/test_k8s_render.py).
POD_SECURITY_LABELS = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")
} | {f"pod-security.kubernetes.io/{mode}-version": "latest" for mode in ("enforce", "audit", "warn")}


def namespace(config: Config) -> Manifest:
    """The run's namespace, labelled for the ``restricted`` Pod Security Standard. Not applied
    by ``kubectl apply -k`` (that would relabel a namespace shared with other workloads):
    apply it once, when creating the namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": config.cluster.namespace, "labels": dict(POD_SECURITY_LABELS)},
    }


def driver_role(config: Config) -> list[Manifest]:
    """The driver's least rights, in its namespace only: create, watch and delete Jobs (a
    failed worker group is deleted and created again) and Services, follow pods and logs,
    list events (a failed stage's record names its pods' last events)."""
    name = resource_name(config, "driver")
    watch = ["get", "list", "watch"]
    rules = [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": [*watch, "create", "delete"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": [*watch, "create", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": watch},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # why a stuck pod is stuck
    ]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_metadata(config, name, "driver"),
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_metadata(config, name, "driver"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": config.cluster.namespace}],
    }
    return [role, binding]


def worker_service(config: Config) -> Manifest:
    """The headless Service that gives each training pod the DNS name
    ``<name>-train-<index>.<name>-train`` (published before the pods are ready, since the
    workers must find each other to start)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(config, resource_name(config, "train"), "train"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels(config, "train"),
            "ports": [{"name": "grpc", "port": WORKER_PORT, "targetPort": WORKER_PORT}],
        },
    }


def worker_hosts(config: Config, namespace: str = "$(POD_NAMESPACE)") -> list[str]:
    """Every training pod's ``host:port``, in index order. The default namespace is
    Kubernetes' expansion of the pod's own ``POD_NAMESPACE`` variable."""
    job = resource_name(config, "train")
    return [f"{job}-{i}.{job}.{namespace}.svc:{WORKER_PORT}" for i in range(config.cluster.workers)]


def with_cluster(config: Config, **changes: Any) -> Config:
    """``config`` with ``cluster`` keys replaced (e.g. the GPU variant of a CPU config)."""
    return dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, **changes))
