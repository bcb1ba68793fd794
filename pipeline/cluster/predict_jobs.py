"""Batch prediction on the cluster: ``finetune predict`` as a Job, on demand or on a schedule;
pure functions of the configuration, as the run's manifests are.

* ``<name>-predict-<5 characters>`` (Job, ``finetune submit --predict``): a new name for each
  submission (:func:`submission_name`), so two submissions never meet: each has its own
  ConfigMap of the same name (its ``predict.model``, ``input`` and ``output``), which
  ``submit`` makes the Job's dependent, so Kubernetes removes it with the Job (after
  ``cluster.ttl_seconds_after_finished``).
* ``<name>-predict-schedule`` (CronJob, ``finetune schedule --predict``) and its ConfigMap of
  the same name: a predict Job on schedule, one at a time (``Forbid``: every run writes the
  same ``predict.output``).
* ``<name>-predict`` (Job and ConfigMap): what ``finetune render --predict`` prints, to read
  or to apply by hand.

The pod is a stage pod: ``finetune predict --config /etc/finetune/config.yaml`` in the stages'
container (:func:`jobs.stage_container`), the stages' service account ``<name>-stage`` (no
Kubernetes API rights; no token unless Workload Identity needs it), the same pod and
container security context, the credentials the configuration names, ``cluster.cpu`` and
``cluster.memory``, ``cluster.node_selector``, ``activeDeadlineSeconds`` from
``cluster.stage_timeout_seconds``, ``cluster.backoff_limit`` retries (a pod that exits 2, a
bad configuration such as a model reference that does not resolve, fails the Job at once).

GPUs: the model runs in the pod only when ``predict.runner`` is a local runner (Beam's
RunInference in the pod's processes); then, with ``cluster.gpus_per_worker`` above 0, the pod
asks for one GPU (the model is called from one TensorFlow process; more would sit idle), with
``cluster.gpu_node_selector`` and the GPU toleration. A pod that only submits the pipeline to
Dataflow, Flink or Spark asks for none: the runner's workers do the work.
"""

from __future__ import annotations

import secrets
from typing import Any

from components.config import Config, parse_model_ref, to_yaml
from components.core.errors import ConfigError
from components.core.storage import is_gcs
from pipeline.cluster import cron, jobs
from pipeline.cluster.manifests import (
    BAD_CONFIG_EXIT,
    CONFIG_PATH,
    MAX_NAME,
    NO_IMAGE,
    Manifest,
    labels,
    object_metadata,
    resource_name,
    service_accounts,
)
from pipeline.cluster.views import PREDICT, PREDICT_ANNOTATIONS, is_active

COMPONENT = PREDICT
ARGS = ("predict", "--config", CONFIG_PATH)
SCHEDULE_PART = "predict-schedule"
MAX_CRON_JOB_NAME = 52  # Kubernetes: a CronJob's Jobs are named <cronjob>-<11 characters at most>
MAX_SCHEDULED_NAME = MAX_CRON_JOB_NAME - len(f"-{SCHEDULE_PART}")  # 35
# Beam runners that run the pipeline in the pod's own processes (``components.preprocess.runners``'
# LOCAL_RUNNERS, which imports Beam; a test keeps the two equal).
IN_POD_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "PrismRunner")
# Kubernetes' generateName alphabet: no vowels (no words), no 0/1/3 (no look-alikes).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
SUFFIX_LENGTH = 5
ANNOTATIONS = PREDICT_ANNOTATIONS  # on the Job (and the CronJob's Job template)


def check(config: Config, schedule: str | None = None) -> None:
    """What a predict Job needs beyond a valid configuration. The run's own needs (``run_dir``,
    ``data.source``, ``model.weights`` on gs://) do not apply: predict reads none of them.

    Raises:
        ConfigError: listing every problem (no image, no model, input or output, a path the
            pod cannot read or write, a name too long for the Job names, a bad schedule).
    """
    problems = [] if config.cluster.image else [NO_IMAGE]
    longest, example = (
        (MAX_SCHEDULED_NAME, schedule_name(config))
        if schedule is not None
        else (MAX_NAME, submission_name(config, "x" * SUFFIX_LENGTH))
    )
    if len(config.name) > longest:
        problems.append(
            f"name: '{config.name}' has {len(config.name)} characters; at most {longest} for a predict "
            f"{'schedule' if schedule is not None else 'Job'} (it names {example})"
        )
    p = config.predict
    for key, value in (("model", p.model), ("input", p.input), ("output", p.output)):
        if not value:
            problems.append(f"predict.{key}: required for a predict Job (--{key} or --set predict.{key}=...)")
    problems += _path_problems(config)
    bad_schedule = None if schedule is None else cron.check_message(schedule, "--schedule")
    if bad_schedule:
        problems.append(bad_schedule)
    if problems:
        raise ConfigError("cannot run predict on a cluster:\n  " + "\n  ".join(problems))


def _path_problems(config: Config) -> list[str]:
    """predict.input, predict.output and the model must be on gs://: the pod has no other disk
    that outlives it, and none of the user's."""
    p, problems = config.predict, []
    for key, value, why in (
        ("input", p.input, "cannot read this machine's disk: copy the images to a bucket first"),
        ("output", p.output, "cannot write this machine's disk, and its own goes with it"),
    ):
        if value and not is_gcs(value):
            problems.append(f"predict.{key}: '{value}' must be a gs:// URI on a cluster (the pod {why})")
    if not p.model:
        return problems
    ref = parse_model_ref(p.model)  # the configuration is valid: the reference parses
    if ref.in_registry and not is_gcs(config.registry.uri):
        problems.append(
            f"registry.uri: '{config.registry.uri}' must be a gs:// URI on a cluster to resolve "
            f"predict.model {p.model} (e.g. --set registry.uri=gs://bucket/registry)"
        )
    elif not ref.in_registry and not is_gcs(ref.uri):
        problems.append(
            f"predict.model: '{p.model}' must be registry://NAME@ALIAS, registry://NAME/VERSION or a "
            "gs:// URI of a SavedModel on a cluster (the pod cannot read this machine's disk)"
        )
    return problems


def rendered_name(config: Config) -> str:
    """``<name>-predict``: the Job and ConfigMap ``finetune render --predict`` prints."""
    return resource_name(config, COMPONENT)


def submission_name(config: Config, suffix: str | None = None) -> str:
    """``<name>-predict-<suffix>``: a submitted Job and its ConfigMap; ``suffix`` None: five
    random characters (27**5, about 14 million, names)."""
    if suffix is None:
        suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(SUFFIX_LENGTH))
    return resource_name(config, f"{COMPONENT}-{suffix}")


def schedule_name(config: Config) -> str:
    """``<name>-predict-schedule``: the CronJob and its ConfigMap."""
    return resource_name(config, SCHEDULE_PART)


def service_account(config: Config) -> Manifest:
    """The stages' service account ``<name>-stage``, which the predict pod runs as."""
    (account,) = [
        a for a in service_accounts(config) if a["metadata"]["name"] == resource_name(config, "stage")
    ]
    return account


def config_map(config: Config, name: str) -> Manifest:
    """The configuration of one predict Job (or of the schedule's), mounted at ``CONFIG_PATH``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(config, name, COMPONENT),
        "data": {"config.yaml": to_yaml(config)},
    }


def gpus(config: Config) -> int:
    """The GPUs the predict pod asks for: one when the model runs in the pod and
    ``cluster.gpus_per_worker`` is above 0, else none (see the module's docstring)."""
    in_pod = config.predict.runner in IN_POD_RUNNERS
    return 1 if in_pod and config.cluster.gpus_per_worker else 0


def _annotations(config: Config) -> dict[str, str]:
    p = config.predict
    return {ANNOTATIONS["model"]: p.model, ANNOTATIONS["input"]: p.input, ANNOTATIONS["output"]: p.output}


def predict_job(config: Config, name: str | None = None) -> Manifest:
    """The Job ``name`` (default ``<name>-predict``) running ``finetune predict`` with the
    ConfigMap of the same name. A retry is safe: the stage publishes its outputs whole."""
    name = name or rendered_name(config)
    n = gpus(config)
    container = jobs.stage_container(config, COMPONENT, list(ARGS), resources=jobs.resources(config, n))
    extra: Manifest = jobs.node_selector(config, n) | ({"tolerations": [jobs.GPU_TOLERATION]} if n else {})
    pod = jobs.pod_spec(config, "stage", [container], config_map=name, **extra)
    rules = {"rules": [jobs.fail_on_exit(BAD_CONFIG_EXIT)]}
    job = jobs.stage_job(config, COMPONENT, pod, name=name, podFailurePolicy=rules)
    job["metadata"]["annotations"] = _annotations(config)
    return job


def cron_job(config: Config, schedule: str) -> Manifest:
    """The CronJob ``<name>-predict-schedule``: the predict Job on ``schedule`` (UTC), with
    the ConfigMap of the same name. Each run writes the same ``predict.output`` (replaced
    whole when it finishes), so one still going makes the next skip (``Forbid``); one that
    could not start within ``cluster.starting_deadline_seconds`` is skipped too."""
    name = schedule_name(config)
    template = {"labels": labels(config, COMPONENT), "annotations": _annotations(config)}
    return jobs.cron_envelope(config, name, COMPONENT, schedule, template, predict_job(config, name))


def owned_by(manifest: Manifest, owner: Manifest, uid: str) -> Manifest:
    """``manifest`` (a submission's ConfigMap) as a dependent of ``owner`` (its Job, created with
    ``uid``): Kubernetes' garbage collector deletes it with the Job."""
    reference = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"]}
    dependent: dict[str, Any] = {**manifest, "metadata": dict(manifest["metadata"])}
    dependent["metadata"]["ownerReferences"] = [reference | {"uid": uid}]
    return dependent


def writing_to(jobs_found: list[Manifest], output: str) -> list[str]:
    """The names of the predict Jobs among ``jobs_found`` (as the API returns them) still at
    work on ``output``: a second Job would only redo their work."""
    key = ANNOTATIONS["output"]
    return [
        job["metadata"]["name"]
        for job in jobs_found
        if is_active(job)
        and ((job["metadata"].get("annotations") or {}).get(key) or "").rstrip("/") == output.rstrip("/")
    ]


def started_by(jobs_found: list[Manifest], cron_job_name: str) -> list[str]:
    """The names of the Jobs among ``jobs_found`` that CronJob ``cron_job_name`` started (named
    ``<cron_job_name>-<minutes>``) and that are still at work."""
    return [
        job["metadata"]["name"]
        for job in jobs_found
        if job["metadata"]["name"].startswith(f"{cron_job_name}-") and is_active(job)
    ]
