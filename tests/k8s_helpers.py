"""Rendered pods as local processes: a container's argv and the environment Kubernetes would
give it, with the cluster's addresses swapped for loopback, and :class:`LocalWorkerGroup`,
the one launcher of the training workers on this machine.

Used by tests and by the benchmarks (``python -m benchmarks.bench_train``, from the repository
root, imports it as ``tests.k8s_helpers``); neither ships in the wheel. Imports only the
project and the standard library: no pytest.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

from components.config import load_config
from components.train import distribute
from pipeline.cluster import jobs
from pipeline.cluster.manifests import CONFIG_PATH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cluster configuration whose training Job the local workers stand for.
CLUSTER_CONFIG = os.path.join(REPO, "configs", "beans-cluster.yaml")


def pod_environment(
    container: dict[str, Any], index: int | None = None, namespace: str = "finetune"
) -> dict[str, str]:
    """The variables Kubernetes sets in ``container``: its ``env`` with ``$(VAR)`` expanded,
    the downward API's namespace, and ``JOB_COMPLETION_INDEX`` for pod ``index`` of an
    Indexed Job."""
    env = {} if index is None else {distribute.INDEX_ENV: str(index)}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
    return env


def local_workers(
    train_job: dict[str, Any], ports: list[int], config_path: str
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, environment) of each pod of a rendered training Job, to run as local processes:
    the mounted configuration replaced by ``config_path`` and the workers' DNS names by
    ``127.0.0.1:<port>``. Add ``os.environ`` (PATH, ...) before starting them."""
    spec = train_job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert spec["completions"] == spec["parallelism"] == len(ports)
    argv = [config_path if a == CONFIG_PATH else a for a in container["command"] + container["args"]]
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return [
        (argv, pod_environment(container, index) | {distribute.HOSTS_ENV: hosts})
        for index in range(len(ports))
    ]


class WorkersFailed(RuntimeError):
    """A worker of a :class:`LocalWorkerGroup` exited non-zero, or the group ran too long."""


class LocalWorkerGroup:
    """The rendered training Job's pods as ``python -m pipeline.cli train`` processes on
    loopback: what tests and benchmarks start to train with several workers on one machine.

    Each process gets its pod's arguments and environment (:func:`local_workers`: the
    Indexed Job's ``JOB_COMPLETION_INDEX`` and the workers' addresses, from which
    ``finetune train`` derives TF_CONFIG), with the mounted configuration replaced by
    ``config_path`` and ``FINETUNE_WORKER_RECORDS`` set to :attr:`records`, where every
    worker records the digests of the weights it ended each phase with
    (``components.train.distribute.record_phase``). One worker is a pod of a one-pod Job:
    TF_CONFIG with a single task, the default strategy, as a one-process run.

    The workers' output (stdout and stderr) goes to ``<folder>/worker-<index>.log``; a second
    :meth:`start` (a restart after :meth:`kill`) appends to the logs and keeps the records.
    """

    def __init__(self, config_path: str, workers: int, folder: str, threads: int | None = None) -> None:
        """
        Args:
            config_path: The configuration every worker reads (its ``run_dir`` included).
            workers: Processes, as ``cluster.workers`` pods.
            folder: Where the logs and the records go (created).
            threads: TensorFlow's intra- and inter-op threads per worker; default: the
                machine's cores split between the workers (not set for one worker).
        """
        self.config_path, self.workers, self.folder = config_path, workers, folder
        self.records = os.path.join(folder, "records")
        self.logs = [os.path.join(folder, f"worker-{i}.log") for i in range(workers)]
        self.threads = threads if threads else max(1, (os.cpu_count() or 1) // workers)
        os.makedirs(self.records, exist_ok=True)
        self._job = jobs.train_job(load_config(CLUSTER_CONFIG, [f"cluster.workers={workers}"]))
        self.procs: list[subprocess.Popen] = []
        self.seconds = 0.0  # from the last start to the end of the last wait

    def start(self) -> None:
        """Starts every worker, on new loopback ports."""
        base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        base |= {
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            distribute.RECORDS_ENV: self.records,
        }
        if self.workers > 1:  # processes sharing this machine: split its cores, do not oversubscribe
            base |= {"TF_NUM_INTRAOP_THREADS": str(self.threads), "TF_NUM_INTEROP_THREADS": str(self.threads)}
        self._started = time.perf_counter()
        self.procs = []
        for index, (argv, pod_env) in enumerate(
            local_workers(self._job, free_ports(self.workers), self.config_path)
        ):
            assert argv[0] == "finetune" and "TF_CONFIG" not in pod_env, argv
            command = [sys.executable, "-m", "pipeline.cli", *argv[1:]]
            with open(self.logs[index], "a") as log:
                self.procs.append(
                    subprocess.Popen(
                        command, cwd=REPO, env=base | pod_env, stdout=log, stderr=subprocess.STDOUT
                    )
                )

    def running(self) -> bool:
        """Whether every worker still runs."""
        return all(p.poll() is None for p in self.procs)

    def kill(self) -> None:
        """SIGKILL to every worker still running (a preempted node), and waits for them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def wait(self, timeout: float = 600) -> list[str]:
        """Waits until every worker has ended; returns each worker's whole log.

        Raises:
            WorkersFailed: a worker exited non-zero (the others are killed at once), or they
                ran longer than ``timeout`` seconds (all killed); the message holds each
                worker's exit code and the end of its log.
        """
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if time.monotonic() > deadline or any(p.poll() for p in self.procs):
                    break
                time.sleep(0.2)
        finally:
            self.seconds = time.perf_counter() - self._started
            codes = [p.poll() for p in self.procs]
            self.kill()
        outputs = self.outputs()
        if codes != [0] * self.workers:
            states = [f"exit {c}" if c is not None else f"running after {timeout:.0f} s" for c in codes]
            tails = [f"--- worker {i} ({states[i]}):\n{out[-3000:]}" for i, out in enumerate(outputs)]
            raise WorkersFailed(f"{self.workers}-worker training: {', '.join(states)}\n" + "\n".join(tails))
        return outputs

    def outputs(self) -> list[str]:
        """Each worker's log so far (every start's)."""
        return [open(path).read() if os.path.exists(path) else "" for path in self.logs]

    def weights(self) -> list[dict[str, Any]]:
        """Each worker's record, in worker order (``distribute.read_worker_records``):
        ``{"baseline": {"weights_sha256": ..., "steps": ...}, "candidate": ..., ...}`` with
        the phases it trained."""
        return distribute.read_worker_records(self.records, self.workers)


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on loopback right now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
