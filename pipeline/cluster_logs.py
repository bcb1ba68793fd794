"""``finetune logs`` and ``finetune submit --wait``: the logs of a run's pods, printed or
followed as they come (:mod:`pipeline.cluster_cli` parses and connects; the pods' containers
and the prefixes of their lines come from :func:`pipeline.cluster.views.log_sources`).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

from components.core.errors import FinetuneError

if TYPE_CHECKING:
    from pipeline.cluster.client import Cluster
    from pipeline.cluster.views import LogSource


def follow_job(cluster: Cluster, job: str, what: str) -> int:
    """Prints the logs of the pods of Job ``job`` (the ``what`` Job: driver, predict) as they
    come (a retried pod's too) until the Job ends; 0 when it succeeded, 1 when it failed."""
    from pipeline.cluster.views import FAILED, SUCCEEDED, describe, job_state, log_sources

    followed: set[str] = set()
    waiting_said = False
    while True:
        found = cluster.read("Job", job)
        if found is None:
            raise FinetuneError(f"the {what} Job {job} was deleted")
        state = job_state(found)
        sources = log_sources(cluster.job_pods(job))
        if not waiting_said and not any(s.started for s in sources):
            print(f"waiting for the {what} pod of {job} to start ...", flush=True)
            waiting_said = True
        for source in sources:
            if source.started and source.pod not in followed:
                followed.add(source.pod)
                for line in cluster.log_lines(source.pod, source.container, follow=True):
                    print(line, flush=True)
        if state.phase in (SUCCEEDED, FAILED):
            print(f"{what} Job {job}: {describe(state)}")
            return 0 if state.phase == SUCCEEDED else 1
        time.sleep(2)


def print_logs(cluster: Cluster, run: str, stage: str, follow: bool) -> int:
    """``finetune logs``: the newest driver's (or predict Job's) log, or every pod of one stage's
    Job, printed, or followed (``follow``) until the containers end; returns the exit code."""
    from pipeline.cluster.views import log_sources

    job = (
        _newest(cluster, run, stage)
        if stage in ("driver", "predict")
        else f"{run}-{'evaluate' if stage == 'push' else stage}"
    )
    sources = log_sources(cluster.job_pods(job), "push" if stage == "push" else None)
    if not sources:
        raise FinetuneError(
            f"Job {job} has no pods in namespace {cluster.namespace} (not started, or removed "
            f"after cluster.ttl_seconds_after_finished); see `finetune status {run}`"
        )
    if not follow:
        for s in sources:
            lines = cluster.log_lines(s.pod, s.container) if s.started else ["(not started yet)"]
            for line in lines:
                print(s.prefix + line)
        return 0
    lock = threading.Lock()
    pods = sorted({s.pod for s in sources}, key=[s.pod for s in sources].index)
    threads = [
        threading.Thread(
            target=_follow_pod, args=(cluster, [s for s in sources if s.pod == p], lock), daemon=True
        )
        for p in pods
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


def _follow_pod(cluster: Cluster, sources: list[LogSource], lock: threading.Lock) -> None:
    """Follows a pod's containers in order, each once it has started (init containers first);
    runs in a thread of its own, so errors are printed, not raised."""
    from pipeline.cluster.views import log_sources

    try:
        for source in sources:
            started = source.started
            while not started:  # e.g. push, while evaluate (its init container) runs
                time.sleep(2)
                pod = cluster.read("Pod", source.pod)
                if pod is None:
                    return
                started = _began(log_sources([pod]), source.container)
                if not started and (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return  # the pod ended before this container ran
            for line in cluster.log_lines(source.pod, source.container, follow=True):
                with lock:
                    print(source.prefix + line, flush=True)
    except FinetuneError as e:
        with lock:
            print(f"finetune logs: {source.pod}/{source.container}: {e}", file=sys.stderr, flush=True)


def _began(sources: list[LogSource], container: str) -> bool:
    return any(s.started for s in sources if s.container == container)


def _newest(cluster: Cluster, run: str, component: str) -> str:
    """The name of the run's newest ``component`` Job (driver, predict: several may exist)."""
    from pipeline.cluster.views import run_selector

    found = cluster.list_jobs(run_selector(run, component))
    if not found:
        raise FinetuneError(
            f"run '{run}' has no {component} Job in namespace {cluster.namespace}; "
            f"see `finetune status {run}`"
        )
    return max(found, key=lambda j: j["metadata"].get("creationTimestamp") or "")["metadata"]["name"]
