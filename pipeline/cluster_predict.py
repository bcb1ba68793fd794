"""``finetune submit --predict``, ``schedule --predict`` and ``unschedule --predict``: batch
prediction as a Kubernetes Job (the manifests: :mod:`pipeline.cluster.predict_jobs`).

``submit`` creates a Job of a new name each time, with a ConfigMap of its own that it makes the
Job's dependent (Kubernetes deletes it with the Job); ``schedule`` creates or replaces the
CronJob and its ConfigMap; ``unschedule`` deletes both. The cluster is reached through
:mod:`pipeline.cluster.client`, as for the run; :mod:`pipeline.cluster_cli` parses, checks the
configuration before connecting and follows the Job's log (``--wait``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from components.core.errors import FinetuneError
from pipeline.cluster import predict_jobs
from pipeline.cluster.client import ClusterError
from pipeline.cluster.views import run_selector

if TYPE_CHECKING:
    from components.config import Config
    from pipeline.cluster.client import Cluster


def _said(action: str, manifest: dict) -> None:
    print(f"{action} {manifest['kind']} {manifest['metadata']['name']}", flush=True)


def submit(config: Config, cluster: Cluster) -> str:
    """Creates a predict Job of a new name (``<name>-predict-XXXXX``) and its ConfigMap, and
    the stages' service account it runs as; returns the Job's name.

    Raises:
        FinetuneError: a predict Job of this run still writes the same ``predict.output``.
        ClusterError: the API server refused a call; a ConfigMap created for a Job that could
            not be created is deleted again.
    """
    found = cluster.list_jobs(run_selector(config.name, predict_jobs.COMPONENT))
    busy = predict_jobs.writing_to(found, config.predict.output)
    if busy:
        raise FinetuneError(
            f"predict Job {busy[0]} still writes {config.predict.output}; wait for it "
            f"(`finetune status {config.name}`), stop it (`kubectl -n {cluster.namespace} delete job "
            f"{busy[0]}`) or choose another --output"
        )
    name = predict_jobs.submission_name(config)
    account = predict_jobs.service_account(config)
    _said(cluster.apply(account), account)
    config_map = predict_jobs.config_map(config, name)
    cluster.create(config_map)
    _said("created", config_map)
    job = predict_jobs.predict_job(config, name)
    try:
        uid = cluster.create(job)["metadata"]["uid"]
    except ClusterError:
        cluster.delete("ConfigMap", name)
        raise
    _said("created", job)
    try:  # from now on removed with the Job
        cluster.apply(predict_jobs.owned_by(config_map, job, uid))
    except ClusterError as e:  # the Job runs all the same: say so, do not fail
        print(
            f"ConfigMap {name} stays after the Job ({e}); delete it when the Job has finished: "
            f"kubectl -n {cluster.namespace} delete configmap {name}",
            file=sys.stderr,
        )
    p = config.predict
    print(
        f"submitted predict Job {name} in namespace {cluster.namespace} ({cluster.where}): "
        f"{p.model} on {p.input} -> {p.output}"
    )
    return name


def schedule(config: Config, cron_text: str, cluster: Cluster) -> int:
    """Creates or replaces the CronJob ``<name>-predict-schedule``, its ConfigMap and the
    stages' service account; returns the exit code (0)."""
    cron_job = predict_jobs.cron_job(config, cron_text)
    name = cron_job["metadata"]["name"]
    for manifest in (
        predict_jobs.service_account(config),
        predict_jobs.config_map(config, name),
        cron_job,
    ):
        _said(cluster.apply(manifest), manifest)
    p = config.predict
    print(
        f"scheduled predict {config.name}: '{cron_text}' (UTC), CronJob {name} in namespace "
        f"{cluster.namespace}: {p.model} on {p.input} -> {p.output} (each run replaces it)"
    )
    return 0


def unschedule(cluster: Cluster, run: str) -> int:
    """Deletes the CronJob ``<run>-predict-schedule`` (a predict Job it started goes on) and
    its ConfigMap, unless such a Job still runs with it; returns the exit code (0).

    Raises:
        FinetuneError: there is no such CronJob.
    """
    name = f"{run}-{predict_jobs.SCHEDULE_PART}"
    cluster.delete_cron_job(name, f"run '{run}' has no predict schedule")
    print(f"deleted CronJob {name}: no more scheduled predict Jobs of '{run}'")
    running = predict_jobs.started_by(cluster.list_jobs(run_selector(run, predict_jobs.COMPONENT)), name)
    if running:
        print(
            f"kept ConfigMap {name}: predict Job {running[0]} still runs with it; delete it after: "
            f"kubectl -n {cluster.namespace} delete configmap {name}"
        )
    elif cluster.delete("ConfigMap", name):
        print(f"deleted ConfigMap {name}")
    return 0
