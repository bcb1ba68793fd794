"""Two worker processes on loopback under MultiWorkerMirroredStrategy, started as the pods of
the rendered Kubernetes training Job (an Indexed Job) would be: the pod spec's command and
environment, each process deriving its TF_CONFIG from ``JOB_COMPLETION_INDEX`` and the
workers' addresses. Slow: two TensorFlow processes share this machine's cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from components.config import load_config, to_yaml
from pipeline.cluster import jobs
from tests.k8s_helpers import local_workers
from tests.train_helpers import TINY_SIZE, copy_prepared

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_CONFIG = os.path.join(REPO, "configs", "beans-cluster.yaml")
SETTINGS = [
    "data.source=unused-by-training",
    f"model.image_size={TINY_SIZE}",
    "model.alpha=0.35",
    "model.weights=none",
    "train.batch_size=4",  # per replica: a global batch of 8 on two workers
    "train.baseline_learning_rate=0.01",
]


def _ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(run_dir: str, logs: str, settings: list[str]) -> list[subprocess.Popen]:
    """The rendered training Job's pods (configs/beans-cluster.yaml with 2 workers) as local
    processes: each pod's own command, arguments and environment (JOB_COMPLETION_INDEX, the
    workers' addresses, from which ``finetune train`` derives TF_CONFIG), with the mounted
    configuration replaced by this test's and the Service's DNS names by loopback ports."""
    config_path = os.path.join(logs, "config.yaml")
    with open(config_path, "w") as f:
        f.write(to_yaml(load_config(None, [f"run_dir={run_dir}", *SETTINGS, *settings])))
    train_job = jobs.train_job(load_config(CLUSTER_CONFIG, ["cluster.workers=2"]))
    procs = []
    for index, (argv, pod_env) in enumerate(local_workers(train_job, _ports(2), config_path)):
        assert argv[0] == "finetune" and "TF_CONFIG" not in pod_env
        env = {
            **{k: v for k, v in os.environ.items() if k != "TF_CONFIG"},
            **pod_env,
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # Both workers share this machine: one thread pool each instead of oversubscribing.
            "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "1",
        }
        command = [os.path.join(os.path.dirname(sys.executable), "finetune"), *argv[1:]]
        log = open(os.path.join(logs, f"worker{index}.log"), "a")
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], logs: str, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = [open(os.path.join(logs, f"worker{i}.log")).read() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return outputs


def _digests(output: str) -> dict[str, str]:
    return dict(re.findall(r"\] (baseline|candidate): weights sha256 ([0-9a-f]{64})", output))


def _published(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "train")
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


@pytest.fixture(scope="module")
def resumed(tiny_prepared, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """One two-worker run, killed once the candidate phase has backed up and restarted to
    the end (every multi-worker check shares it: each start costs two TensorFlow processes).
    Returns the run directory and the chief's and the other worker's output of both starts."""
    logs = str(tmp_path_factory.mktemp("multiworker"))
    run_dir = copy_prepared(tiny_prepared, os.path.join(logs, "run"))
    settings = ["train.baseline_epochs=1", "train.finetune_epochs=2", "train.backup_every_steps=5"]
    procs = _start(run_dir, logs, settings)
    checkpoint = os.path.join(run_dir, "train", "backup", "candidate", "chief", "checkpoint")
    deadline = time.monotonic() + 600
    try:
        while not os.path.exists(checkpoint):  # the candidate phase has backed up at least once
            assert all(p.poll() is None for p in procs), "a worker ended before the candidate phase backed up"
            assert time.monotonic() < deadline, "no candidate backup after 600 s"
            time.sleep(0.05)
    finally:  # kill both workers (also when the wait failed: no stray TensorFlow processes)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not os.path.exists(os.path.join(run_dir, "train", "summary.json"))

    chief, worker = _wait(_start(run_dir, logs, settings), logs)  # the logs of both starts
    return run_dir, chief, worker


def test_two_workers_agree_on_the_weights_and_only_the_chief_writes(resumed):
    run_dir, chief, worker = resumed
    assert "MultiWorkerMirroredStrategy (worker 1/2" in chief and "[train] " not in worker
    # The baseline's digests are from the first start, the candidate's from the restart.
    chief_digests, worker_digests = _digests(chief), _digests(worker)
    assert set(chief_digests) == {"baseline", "candidate"}
    assert chief_digests == worker_digests  # bit-identical weights on both workers

    summary = json.load(open(os.path.join(run_dir, "train", "summary.json")))
    assert (summary["strategy"], summary["workers"], summary["replicas"], summary["global_batch_size"]) == (
        "MultiWorkerMirroredStrategy",
        2,
        2,
        8,
    )
    for phase in ("baseline", "candidate"):
        assert (
            summary[phase]["steps"] == summary[phase]["planned_steps"] == summary[phase]["epochs"] * (63 // 8)
        )
        assert summary[phase]["weights_sha256"] == chief_digests[phase]
        assert summary[phase]["eval"]["examples"] == 27  # exact evaluation: every eval image once
    files = _published(run_dir)
    assert not [f for f in files if "workertemp" in f or f.startswith("backup")], files
    for phase in ("baseline", "candidate"):
        assert {f"{phase}/model.keras", f"{phase}/history.json", f"{phase}/result.json"} <= set(files)
    assert "summary.json" in files and "config.yaml" in files


def test_killed_workers_resume_from_the_backup_and_finish_the_planned_steps(resumed):
    run_dir, chief, _ = resumed
    restarted = chief.split("resuming the unfinished run")[-1]
    assert "baseline: already trained in this run directory" in restarted
    assert "candidate: resuming from the backup" in restarted
    summary = json.load(open(os.path.join(run_dir, "train", "summary.json")))
    candidate = summary["candidate"]
    assert candidate["steps"] == candidate["planned_steps"] == 2 * (63 // 8)
    assert 0 < candidate["steps_run"] < candidate["planned_steps"]  # it did not start over
    assert not os.path.exists(os.path.join(run_dir, "train", "backup"))
