"""Two worker processes on loopback under MultiWorkerMirroredStrategy, started as the pods of
the rendered Kubernetes training Job (an Indexed Job) would be: the pod spec's command and
environment, each process deriving its TF_CONFIG from ``JOB_COMPLETION_INDEX`` and the
workers' addresses. Slow: two TensorFlow processes share this machine's cores.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from components.config import load_config, to_yaml
from tests.k8s_helpers import LocalWorkerGroup
from tests.train_helpers import TINY_SIZE, copy_prepared

pytestmark = pytest.mark.slow
SETTINGS = [
    "data.source=unused-by-training",
    f"model.image_size={TINY_SIZE}",
    "model.alpha=0.35",
    "model.weights=none",
    "train.batch_size=4",  # per replica: a global batch of 8 on two workers
    "train.baseline_learning_rate=0.01",
]


def _published(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "train")
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


@pytest.fixture(scope="module")
def resumed(tiny_prepared, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LocalWorkerGroup]:
    """One two-worker run, killed once the candidate phase has backed up and restarted to
    the end (every multi-worker check shares it: each start costs two TensorFlow processes).
    Returns the run directory and the worker group (its logs hold both starts' output, its
    records the weights each worker ended each phase with)."""
    logs = str(tmp_path_factory.mktemp("multiworker"))
    run_dir = copy_prepared(tiny_prepared, os.path.join(logs, "run"))
    settings = ["train.baseline_epochs=1", "train.finetune_epochs=2", "train.backup_every_steps=5"]
    config_path = os.path.join(logs, "config.yaml")
    with open(config_path, "w") as f:
        f.write(to_yaml(load_config(None, [f"run_dir={run_dir}", *SETTINGS, *settings])))
    group = LocalWorkerGroup(config_path, 2, logs)
    group.start()
    checkpoint = os.path.join(run_dir, "train", "backup", "candidate", "chief", "checkpoint")
    deadline = time.monotonic() + 600
    try:
        while not os.path.exists(checkpoint):  # the candidate phase has backed up at least once
            assert group.running(), "a worker ended before the candidate phase backed up:\n" + "\n".join(
                out[-3000:] for out in group.outputs()
            )
            assert time.monotonic() < deadline, "no candidate backup after 600 s"
            time.sleep(0.05)
    finally:  # kill both workers (also when the wait failed: no stray TensorFlow processes)
        group.kill()
    assert not os.path.exists(os.path.join(run_dir, "train", "summary.json"))
    assert [set(r) & {"baseline", "candidate"} for r in group.weights()] == [{"baseline"}] * 2

    group.start()  # the restart: same records, logs appended
    group.wait(600)
    return run_dir, group


def test_two_workers_agree_on_the_weights_and_only_the_chief_writes(resumed):
    run_dir, group = resumed
    chief, worker = group.outputs()
    assert "MultiWorkerMirroredStrategy (worker 1/2" in chief and "[train] " not in worker
    # Each worker's record: the baseline's entry is from the first start (the restart loads
    # the baseline), the candidate's from the restart.
    chief_record, worker_record = group.weights()
    assert (chief_record["worker_index"], worker_record["worker_index"]) == (0, 1)
    chief_digests = {phase: chief_record[phase]["weights_sha256"] for phase in ("baseline", "candidate")}
    worker_digests = {phase: worker_record[phase]["weights_sha256"] for phase in ("baseline", "candidate")}
    assert all(len(d) == 64 for d in chief_digests.values())
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
    run_dir, group = resumed
    chief = group.outputs()[0]
    restarted = chief.split("resuming the unfinished run")[-1]
    assert "baseline: already trained in this run directory" in restarted
    assert "candidate: resuming from the backup" in restarted
    summary = json.load(open(os.path.join(run_dir, "train", "summary.json")))
    candidate = summary["candidate"]
    assert candidate["steps"] == candidate["planned_steps"] == 2 * (63 // 8)
    assert 0 < candidate["steps_run"] < candidate["planned_steps"]  # it did not start over
    assert [r["candidate"]["steps"] for r in group.weights()] == [candidate["steps"]] * 2
    assert not os.path.exists(os.path.join(run_dir, "train", "backup"))
