"""``finetune submit | status | logs | schedule | unschedule | drive``: a run on Kubernetes.

``submit`` and ``schedule`` create what ``finetune render`` marks as applied (configuration,
accounts, Role, Service) plus the driver Job or the CronJob; the driver Job then runs
``finetune drive`` in the cluster (:mod:`pipeline.cluster.driver`). With ``--predict`` they
create a predict Job or its CronJob instead (:mod:`pipeline.cluster_predict`), and
``unschedule --predict`` deletes that CronJob. ``status`` and ``logs`` read a run's Jobs
(its predict Jobs too) and pods by its name. The cluster is reached through
:mod:`pipeline.cluster.client` (kubeconfig and ``--context`` here, the service account in a
pod); this module only parses, calls and prints.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import textwrap
from typing import TYPE_CHECKING

from components.core.errors import ConfigError, FinetuneError
from pipeline import cluster_logs

if TYPE_CHECKING:
    from components.config import Config
    from pipeline.cluster.client import Cluster
    from pipeline.cluster.render import ManifestFile

WITH_CONFIG = ("submit", "schedule", "drive")
BY_NAME = ("status", "logs", "unschedule")
PREDICT_COMMANDS = ("render", "submit", "schedule")  # take --predict, --model, --input, --output
DEFAULT_NAMESPACE = "finetune"  # ClusterConfig.namespace's default
LOG_STAGES = ("driver", "preprocess", "train", "evaluate", "push", "predict")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_RAW = argparse.RawDescriptionHelpFormatter


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds the cluster commands to the ``finetune`` parser (``common``: --config, --set, -v)."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--context", metavar="CTX", help="kubeconfig context (default: the current one)")
    where.add_argument(
        "--namespace", "-n", metavar="NS", help="namespace (default: cluster.namespace of the config)"
    )
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--context", metavar="CTX", help="kubeconfig context (default: the current one)")
    named.add_argument(
        "--namespace", "-n", metavar="NS", default=DEFAULT_NAMESPACE, help="namespace (default: %(default)s)"
    )
    named.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    predict = predict_flags()
    p = sub.add_parser("submit", parents=[common, where, predict], formatter_class=_RAW, **_texts("submit"))
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the driver's (the predict Job's) log; exit 0 on success, 1 on failure",
    )
    p = sub.add_parser("status", parents=[named], formatter_class=_RAW, **_texts("status"))
    p.add_argument("run", metavar="RUN", help="the run's name (the configuration's `name`)")
    p = sub.add_parser("logs", parents=[named], formatter_class=_RAW, **_texts("logs"))
    p.add_argument("run", metavar="RUN", help="the run's name (the configuration's `name`)")
    p.add_argument("--stage", choices=LOG_STAGES, default="driver", help="whose logs (default: %(default)s)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the containers end")
    p = sub.add_parser(
        "schedule", parents=[common, where, predict], formatter_class=_RAW, **_texts("schedule")
    )
    p.add_argument(
        "--cron", required=True, metavar="CRON", help="five-field cron schedule in UTC, e.g. '0 2 * * *'"
    )
    p = sub.add_parser("unschedule", parents=[named], formatter_class=_RAW, **_texts("unschedule"))
    p.add_argument("run", metavar="NAME", help="the run's name: its CronJob is NAME-schedule")
    p.add_argument(
        "--predict", action="store_true", help="delete the predict CronJob NAME-predict-schedule instead"
    )
    p = sub.add_parser("drive", parents=[common], formatter_class=_RAW, **_texts("drive"))
    p.add_argument(
        "--if-new-data",
        action="store_true",
        help="end at once ('no new data', exit 0) when the input data equals the last successful run's",
    )
    p.add_argument("--context", metavar="CTX", help="kubeconfig context, to drive from outside the cluster")


def predict_flags() -> argparse.ArgumentParser:
    """``--predict`` and the predict section's flags, for ``render``, ``submit`` and ``schedule``."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("batch prediction (finetune predict as a Job)")
    group.add_argument(
        "--predict", action="store_true", help="a predict Job (or its CronJob) instead of the run"
    )
    group.add_argument("--model", metavar="REF", help="predict.model: registry://NAME@ALIAS, ... or gs://")
    group.add_argument("--input", metavar="SOURCE", help="predict.input: a gs:// prefix or manifest")
    group.add_argument("--output", metavar="URI", help="predict.output: a gs:// prefix")
    return parent


def predicts(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for a predict Job (``--predict`` of render, submit or schedule): its
    configuration is loaded as ``finetune predict``'s (``--model``, ``--input`` and ``--output``
    as overrides, no ``run_dir`` or ``data.source`` needed).

    Raises:
        ConfigError: --model, --input or --output without --predict.
    """
    if args.command not in PREDICT_COMMANDS:
        return False
    flags = (("--model", args.model), ("--input", args.input), ("--output", args.output))
    given = [flag for flag, value in flags if value]
    if given and not args.predict:
        raise ConfigError(
            f"{', '.join(given)}: only with --predict (the predict Job's settings); add --predict"
        )
    return bool(args.predict)


def _texts(command: str) -> dict[str, str]:
    help_text, description, examples = _HELP[command]
    return {
        "help": help_text,
        "description": textwrap.fill(description, 96),
        "epilog": "examples:\n" + examples,
    }


_HELP = {
    "submit": (
        "start a run on Kubernetes: configuration, accounts, Role, Service, then the driver Job",
        "Create (or replace) in the cluster what `finetune render` marks as applied: the ConfigMap "
        "holding the configuration, the service accounts, the driver's Role and RoleBinding, the "
        "training Service, and the driver Job, which runs the stages as Jobs and writes "
        "<run_dir>/run.json. An earlier driver Job of the run is deleted first; a run still going "
        "is refused. Prints the run's name; --wait follows the driver's log and exits with the "
        "run's outcome (0 succeeded, 1 failed). With --predict: a predict Job instead, `finetune "
        "predict` in one stage pod (predict.model, input and output, or --model, --input, --output, "
        "on gs://), named <name>-predict-XXXXX anew each time with a ConfigMap of its own, removed "
        "with the Job; run_dir and data.source are not needed. A predict Job of the run still "
        "writing the same output is refused.",
        "  finetune submit --config configs/beans-cluster.yaml\n"
        "  finetune submit --config my.yaml --context gke_proj_europe-west4_ml --namespace ml --wait\n"
        "  finetune submit --config my.yaml --set cluster.workers=4 --set cluster.gpus_per_worker=1\n"
        "  finetune submit --predict --config configs/beans-cluster.yaml \\\n"
        "      --model registry://beans@production --input gs://BUCKET/uploads/ \\\n"
        "      --output gs://BUCKET/predictions/today --wait\n",
    ),
    "status": (
        "a run's Jobs on Kubernetes: driver, stages and predict Jobs, status, start, duration; schedules",
        "One line per Job of the run (the drivers, manual and scheduled, then preprocess, train, "
        "evaluate, then its predict Jobs with their model, input and output): active, succeeded or "
        "failed (with the reason), when it started and how long it ran; then the run's schedule and "
        "its predict schedule, if any. Exit code 1 when the run has no Jobs and no schedule.",
        "  finetune status beans\n  finetune status beans --context staging --namespace ml\n",
    ),
    "logs": (
        "print (or follow) the logs of a run's driver, of one stage's pods or of its predict Job",
        "The log of the run's newest driver Job (default) or newest predict Job (--stage predict), "
        "or of every pod of one stage's Job: "
        "each line of a training pod is prefixed with its index ([0], [1], ...), and a retried pod "
        "with its try; evaluate shows evaluate's and push's containers. --follow keeps printing "
        "until the containers end.",
        "  finetune logs beans --follow\n  finetune logs beans --stage train\n"
        "  finetune logs beans --stage evaluate -n ml\n  finetune logs beans --stage predict -f\n",
    ),
    "schedule": (
        "create or update the CronJob that starts a run on a cron schedule (UTC)",
        "Create (or replace) the CronJob <name>-schedule and what its runs need (ConfigMap, "
        "accounts, Role, Service). Each scheduled run ends early with 'no new data' when the input "
        "data's fingerprint equals that of the last successful run; one still going makes the next "
        "skip. The cron expression is checked first: five fields (minute hour day month weekday) or "
        "@daily, @hourly, ... With --predict: the CronJob <name>-predict-schedule and its ConfigMap "
        "instead, a predict Job on schedule (as `submit --predict`; one at a time, each run "
        "replacing predict.output); the name may have at most 35 characters.",
        "  finetune schedule --config configs/beans-cluster.yaml --cron '0 2 * * *'   # 02:00 UTC\n"
        "  finetune schedule --config my.yaml --cron '30 1 * * MON-FRI' --context prod\n"
        "  finetune schedule --predict --config my.yaml --cron '0 6 * * *' \\\n"
        "      --model registry://beans@production --input gs://BUCKET/uploads/ \\\n"
        "      --output gs://BUCKET/predictions/latest\n",
    ),
    "unschedule": (
        "delete a run's CronJob: no more scheduled runs (a run already started goes on)",
        "Delete the CronJob NAME-schedule. A run it already started goes on; its Jobs stay until "
        "cluster.ttl_seconds_after_finished. With --predict: the CronJob NAME-predict-schedule, and "
        "its ConfigMap unless a predict Job it started still runs. Exit code 1 when there is no such "
        "CronJob.",
        "  finetune unschedule beans\n  finetune unschedule beans --namespace ml\n"
        "  finetune unschedule beans --predict\n",
    ),
    "drive": (
        "run the stages as Kubernetes Jobs in order (what the driver Job runs in the cluster)",
        "The driver: for preprocess, train and evaluate (+ push) in order, delete any earlier Job "
        "of the stage, create it, wait for it and print its progress; recreate a failed training "
        "group up to cluster.backoff_limit times (it resumes from its backup); stop at the first "
        "failed stage (exit code 1) or a bad configuration (2). Stages whose inputs did not change "
        "are skipped, as in `finetune run`; <run_dir>/run.json records the run. Inside a pod it "
        "uses the pod's service account; elsewhere the kubeconfig.",
        "  finetune drive --config /etc/finetune/config.yaml                 # the driver Job\n"
        "  finetune drive --config /etc/finetune/config.yaml --if-new-data   # the CronJob's runs\n",
    ),
}


def with_config(config: Config, args: argparse.Namespace) -> int:
    """Runs ``submit``, ``schedule`` or ``drive`` for ``config`` (a predict Job's with
    ``--predict``); returns the exit code. What a cluster run needs (an image, gs:// paths, a
    good schedule) is checked before connecting."""
    from pipeline.cluster import cron, render
    from pipeline.cluster.client import connect
    from pipeline.cluster.manifests import check

    _quiet(args.verbose)
    if args.command == "drive":
        from pipeline.cluster import driver  # the Kubernetes client: only here

        check(config)
        driver.drive(config, connect(args.context, config.cluster.namespace), if_new_data=args.if_new_data)
        return 0
    config = _in_namespace(config, args.namespace, training=not args.predict)
    schedule = args.cron.strip() if args.command == "schedule" else None
    problem = cron.check_message(schedule, "--cron") if schedule is not None else None
    if problem:  # before the other checks, naming the flag given
        raise ConfigError(problem)
    if args.predict:
        return _predict(config, args, schedule)
    files = render.manifest_files(config, schedule)
    cluster = connect(args.context, config.cluster.namespace)
    if schedule is not None:
        return _schedule(config, schedule, files, cluster)
    return _submit(config, files, cluster, args.wait)


def _predict(config: Config, args: argparse.Namespace, schedule: str | None) -> int:
    """``submit --predict [--wait]`` or ``schedule --predict``, checked before connecting."""
    from pipeline import cluster_predict
    from pipeline.cluster import predict_jobs
    from pipeline.cluster.client import connect

    predict_jobs.check(config, schedule)  # before connecting
    cluster = connect(args.context, config.cluster.namespace)
    if schedule is not None:
        return cluster_predict.schedule(config, schedule, cluster)
    job = cluster_predict.submit(config, cluster)
    if not args.wait:
        name, where = config.name, f"-n {cluster.namespace}"
        print(f"follow it: finetune status {name} {where}; finetune logs {name} --stage predict -f {where}")
        return 0
    return cluster_logs.follow_job(cluster, job, "predict")


def by_name(args: argparse.Namespace) -> int:
    """Runs ``status``, ``logs`` or ``unschedule`` of run ``args.run``; returns the exit code."""
    from pipeline.cluster.client import connect

    _quiet(args.verbose)

    if not _NAME_RE.match(args.run):
        raise ConfigError(
            f"'{args.run}' is not a run name (the configuration's `name`: lowercase letters, -)"
        )
    cluster = connect(args.context, args.namespace)
    if args.command == "status":
        return _status(cluster, args.run)
    if args.command == "logs":
        return cluster_logs.print_logs(cluster, args.run, args.stage, args.follow)
    if args.predict:
        from pipeline import cluster_predict

        return cluster_predict.unschedule(cluster, args.run)
    name = f"{args.run}-schedule"
    cluster.delete_cron_job(name, f"run '{args.run}' has no schedule")
    print(f"deleted CronJob {name}: no more scheduled runs of '{args.run}' (a run already started goes on)")
    return 0


def _quiet(verbose: bool) -> None:
    """urllib3 logs each retry of an unanswered call; the error that follows says it all."""
    logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO if verbose else logging.ERROR)


def _in_namespace(config: Config, namespace: str | None, training: bool = True) -> Config:
    from components.config import validate
    from pipeline.cluster.manifests import with_cluster

    return validate(with_cluster(config, namespace=namespace), training) if namespace else config


def _apply(cluster: Cluster, documents: list[dict]) -> None:
    for doc in documents:
        print(f"{cluster.apply(doc)} {doc['kind']} {doc['metadata']['name']}", flush=True)


def _submit(config: Config, files: list[ManifestFile], cluster: Cluster, wait: bool) -> int:
    from pipeline.cluster.views import is_active, run_selector

    documents = [doc for f in files if f.applied for doc in f.documents]
    busy = [j for j in cluster.list_jobs(run_selector(config.name, "driver")) if is_active(j)]
    if busy:
        name = busy[0]["metadata"]["name"]
        raise FinetuneError(
            f"run '{config.name}' is still going (driver Job {name} is active); wait for it "
            f"(`finetune status {config.name}`) or stop it: "
            f"`kubectl -n {cluster.namespace} delete job {name}`"
        )
    _apply(cluster, documents)
    driver = next(d["metadata"]["name"] for d in documents if d["kind"] == "Job")
    print(
        f"submitted run {config.name}: driver Job {driver} in namespace {cluster.namespace} ({cluster.where})"
    )
    if not wait:
        print(
            f"follow it: finetune status {config.name} -n {cluster.namespace}; finetune logs {config.name} -f"
        )
        return 0
    return cluster_logs.follow_job(cluster, driver, "driver")


def _schedule(config: Config, cron_text: str, files: list[ManifestFile], cluster: Cluster) -> int:
    from pipeline.cluster import jobs

    documents = [d for f in files if f.applied for d in f.documents if d["kind"] != "Job"]
    cron_job = jobs.cron_job(config, cron_text)
    _apply(cluster, [*documents, cron_job])
    print(
        f"scheduled run {config.name}: '{cron_text}' (UTC), CronJob {cron_job['metadata']['name']} "
        f"in namespace {cluster.namespace}; a run whose input data did not change ends with 'no new data'"
    )
    return 0


def _status(cluster: Cluster, run: str) -> int:
    from pipeline.cluster.driver import JOB_STAGES
    from pipeline.cluster.predict_jobs import SCHEDULE_PART
    from pipeline.cluster.views import run_selector, status_lines

    jobs = cluster.list_jobs(run_selector(run))
    schedule = cluster.read("CronJob", f"{run}-schedule")
    predict_schedule = cluster.read("CronJob", f"{run}-{SCHEDULE_PART}")
    if not jobs and schedule is None and predict_schedule is None:
        raise FinetuneError(
            f"run '{run}' has no Jobs and no schedule in namespace {cluster.namespace} ({cluster.where}); "
            "start it with `finetune submit --config FILE` (add --predict for a predict Job)"
        )
    print(f"run {run} in namespace {cluster.namespace}:")
    now = datetime.datetime.now(datetime.UTC)
    for line in status_lines(run, jobs, schedule, now, tuple(JOB_STAGES), predict_schedule):
        print(line)
    return 0
