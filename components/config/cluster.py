"""The ``cluster`` section: the Kubernetes layout of a run, with Kubernetes' rules for its values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from components.config.registry import NAME_RE
from components.core.configtree import option, out_of_range

# Kubernetes: resource quantities, label keys (optional DNS prefix + name) and values, Secret names.
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE_RE = re.compile(rf"^({_LABEL_NAME})?$")
_SECRET_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_GSA_RE = re.compile(r"^[^@\s]+@[^@\s]+\.gserviceaccount\.com$")


@dataclass(frozen=True)
class ClusterConfig:
    """How ``finetune render`` lays the run out on Kubernetes (see ``pipeline.cluster``).

    Every stage runs as a Job in ``namespace`` from ``image`` (``gpu_image``, when set, for
    every pod once ``gpus_per_worker`` is above 0). Training is an Indexed Job of
    ``workers`` pods, each with ``gpus_per_worker`` GPUs; ``cpu`` and ``memory`` are each
    stage pod's requests (memory is also its limit). ``node_selector`` places every stage
    pod; ``gpu_node_selector`` is added to the pods that request GPUs: the training pods, and a
    predict pod that runs its model itself (a local runner), which asks for one.
    Credentials come from the cluster, never from the image: ``workload_identity`` (a Google
    service account email, annotated on the Kubernetes service accounts) or
    ``credentials_secret`` (a Secret holding ``key.json``, mounted into every pod); with
    neither, pods use the node's identity. ``backoff_limit`` is how often a failed stage is
    retried (for training: how often the driver recreates the whole worker group, which
    resumes from its backup). ``ttl_seconds_after_finished`` removes finished Jobs;
    ``starting_deadline_seconds`` is how late a scheduled run may still start.
    ``stage_timeout_seconds`` bounds each stage Job (its ``activeDeadlineSeconds``: a pod stuck
    Pending or a hung stage fails the Job, and the run, instead of holding it and every later
    scheduled run forever); the driver Job's own deadline follows from it.
    """

    image: str = option("", help="the image every pod runs (required by `render`)")
    gpu_image: str = option("", help="when set, replaces `image` in every pod when `gpus_per_worker` > 0")
    namespace: str = option("finetune", help="namespace of every object")
    workers: int = option(1, help="training pods (MultiWorkerMirroredStrategy across them)")
    gpus_per_worker: int = option(
        0,
        help="`nvidia.com/gpu` per training pod (above 0: one for a predict pod that runs its model "
        "itself); adds `gpu_node_selector` and the GPU toleration",
    )
    cpu: str = option("2", help="CPU request of each stage pod")
    memory: str = option("8Gi", help="memory request of each stage pod (also its limit)")
    node_selector: dict[str, str] = option(help="node labels for every stage pod", factory=dict)
    gpu_node_selector: dict[str, str] = option(help="node labels for pods that request GPUs", factory=dict)
    workload_identity: str = option(
        "", help="Google service account email annotated on the Kubernetes service accounts"
    )
    credentials_secret: str = option("", help="instead: a Secret holding `key.json`, mounted into every pod")
    backoff_limit: int = option(
        2, help="retries of a failed stage; for training, restarts of the whole worker group"
    )
    ttl_seconds_after_finished: int = option(86_400, help="finished Jobs are removed after this")
    starting_deadline_seconds: int = option(
        3600, help="a scheduled run that cannot start within this is skipped"
    )
    stage_timeout_seconds: int = option(
        86_400,
        help="a stage Job active longer fails the run (`activeDeadlineSeconds`; the driver's follows)",
    )


def check(c: ClusterConfig) -> list[str]:
    """``cluster``: value checks only; what a cluster run needs beyond these (an image,
    gs:// paths) is checked when manifests are rendered (``pipeline.cluster.check``)."""
    problems = out_of_range(
        "cluster.",
        (
            ("workers", c.workers, 1, 1000),
            ("gpus_per_worker", c.gpus_per_worker, 0, 16),
            ("backoff_limit", c.backoff_limit, 0, 100),
            ("ttl_seconds_after_finished", c.ttl_seconds_after_finished, 0, 10**8),
            ("starting_deadline_seconds", c.starting_deadline_seconds, 10, 10**7),
            ("stage_timeout_seconds", c.stage_timeout_seconds, 60, 10**7),
        ),
    )
    if not NAME_RE.fullmatch(c.namespace):
        problems.append(
            f"cluster.namespace: '{c.namespace}' must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    for key, value, example in (("cpu", c.cpu, "2 or 500m"), ("memory", c.memory, "8Gi or 512Mi")):
        if not _QUANTITY_RE.match(value):
            problems.append(f"cluster.{key}: '{value}' is not a Kubernetes quantity (e.g. {example})")
    for key in ("image", "gpu_image"):
        if any(ch.isspace() for ch in getattr(c, key)):
            problems.append(f"cluster.{key}: '{getattr(c, key)}' must not contain spaces")
    for key in ("node_selector", "gpu_node_selector"):
        problems.extend(_check_labels(f"cluster.{key}", getattr(c, key)))
    return problems + _check_identity(c)


def _check_identity(c: ClusterConfig) -> list[str]:
    """Workload Identity's service account or a key Secret, each well-formed, not both."""
    problems = []
    if c.workload_identity and not _GSA_RE.match(c.workload_identity):
        problems.append(
            f"cluster.workload_identity: '{c.workload_identity}' must be a Google service account "
            "email (NAME@PROJECT.iam.gserviceaccount.com)"
        )
    if c.credentials_secret and not _SECRET_RE.match(c.credentials_secret):
        problems.append(
            f"cluster.credentials_secret: '{c.credentials_secret}' is not a Kubernetes Secret name "
            "(lowercase letters, digits, '-' and '.')"
        )
    if c.workload_identity and c.credentials_secret:
        problems.append(
            "cluster: set workload_identity or credentials_secret, not both (Workload Identity "
            "needs no key; a key Secret is for clusters without it)"
        )
    return problems


def _check_labels(key: str, labels: dict[str, Any]) -> list[str]:
    """Node selector entries: label keys and string values Kubernetes accepts."""
    problems = []
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_KEY_RE.match(name):
            problems.append(
                f"{key}: '{name}' is not a Kubernetes label key (e.g. cloud.google.com/gke-nodepool)"
            )
        elif not isinstance(value, str):
            problems.append(f"{key}.{name}: {value!r} must be a string (quote it in YAML)")
        elif not _LABEL_VALUE_RE.match(value):
            problems.append(
                f"{key}.{name}: '{value}' is not a Kubernetes label value (up to 63 letters, digits, -_.)"
            )
    return problems
