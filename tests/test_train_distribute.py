"""The distributed rules: TF_CONFIG parsing, who is chief, precision and XLA choices."""

from __future__ import annotations

import json

import pytest

from components.config import load_config
from components.core.errors import ConfigError
from components.train import distribute


def _env(cluster: dict, task_type: str, index: int) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


def test_no_tf_config_is_one_chief_worker():
    cluster = distribute.parse_tf_config({})
    assert (cluster.num_workers, cluster.is_chief, cluster.multi_worker) == (1, True, False)


@pytest.mark.parametrize(
    "cluster, task, index, expected_worker_index, chief",
    [
        ({"worker": ["a:1", "b:2", "c:3"]}, "worker", 0, 0, True),
        ({"worker": ["a:1", "b:2", "c:3"]}, "worker", 2, 2, False),
        ({"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "chief", 0, 0, True),
        ({"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "worker", 0, 1, False),
    ],
)
def test_tf_config_names_the_chief(cluster, task, index, expected_worker_index, chief):
    parsed = distribute.parse_tf_config(_env(cluster, task, index))
    assert parsed.num_workers == 3 and parsed.multi_worker
    assert parsed.worker_index == expected_worker_index
    assert parsed.is_chief is chief


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "TF_CONFIG: expected"),
        (json.dumps({"cluster": {"worker": ["a:1"]}}), "TF_CONFIG: expected"),
        (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker"}}), "'ps'"),
        (
            json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}),
            "not in the cluster",
        ),
    ],
)
def test_bad_tf_config_is_a_clear_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        distribute.parse_tf_config({"TF_CONFIG": raw})


@pytest.mark.parametrize(
    "choice, device, expected",
    [("auto", "cpu", False), ("auto", "gpu", True), ("true", "cpu", True), ("off", "tpu", False)],
)
def test_xla_choice(choice, device, expected):
    config = load_config(None, ["data.source=/d", "run_dir=/r", f"train.xla={choice}"])
    assert distribute.use_xla(config, device) is expected


def test_one_process_gets_the_default_strategy():
    placement = distribute.create_strategy(distribute.Cluster())
    assert (placement.name, placement.device, placement.replicas) == ("default", "cpu", 1)
    distribute.barrier(placement, distribute.Cluster())  # a no-op on one worker


def test_each_worker_records_its_phases_in_its_own_file_only_when_told_where(tmp_path):
    worker = distribute.parse_tf_config(_env({"worker": ["a:1", "b:2"]}, "worker", 1))
    assert distribute.record_phase(worker, "baseline", {"weights_sha256": "b"}, {}) is None  # not told
    env = {distribute.RECORDS_ENV: str(tmp_path)}
    path = distribute.record_phase(worker, "baseline", {"weights_sha256": "b", "steps": 7}, env)
    assert path == str(tmp_path / "worker-1.json")
    distribute.record_phase(worker, "candidate", {"weights_sha256": "c", "steps": 9}, env)  # kept: baseline
    assert distribute.read_worker_records(str(tmp_path), 2) == [
        {},  # worker 0 recorded nothing
        {
            "worker_index": 1,
            "num_workers": 2,
            "baseline": {"weights_sha256": "b", "steps": 7},
            "candidate": {"weights_sha256": "c", "steps": 9},
        },
    ]
