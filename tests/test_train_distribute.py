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


# Several GPUs on one machine (MirroredStrategy), played by two logical CPU devices: they must
# be set before TensorFlow starts, so the training runs in a process of its own. The strategy
# is handed to the stage as TF Model Garden's run_experiment takes one (create_strategy picks
# MirroredStrategy only for several GPUs, which this machine does not have).
_MIRRORED = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from components.config import load_config
from components.train import distribute, stage
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
placement = distribute.Placement(strategy, "MirroredStrategy", "cpu", strategy.num_replicas_in_sync)
print(json.dumps(stage.run(load_config(sys.argv[1], []), placement)))
"""


@pytest.mark.slow
def test_both_phases_train_under_mirrored_strategy_on_two_local_replicas(tiny_prepared, tmp_path):
    """Keras refuses a distributed validation set without a step count: before validation
    was counted under every strategy but the default, a machine with several GPUs failed in
    the baseline phase's first ``fit``."""
    import math
    import os
    import subprocess
    import sys

    from components.config import to_yaml
    from tests.train_helpers import copy_prepared, train_config

    run_dir = copy_prepared(tiny_prepared, str(tmp_path / "run"))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(to_yaml(train_config(run_dir, "train.batch_size=4")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-c", _MIRRORED, str(config_path)]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    placed = (summary["strategy"], summary["replicas"], summary["global_batch_size"])
    assert placed == ("MirroredStrategy", 2, 8)
    for phase in ("baseline", "candidate"):
        result = summary[phase]
        assert result["steps_per_epoch"] == 63 // 8  # the tiny set's 63 train images, global batch 8
        assert result["steps"] == result["epochs_run"] * result["steps_per_epoch"] > 0, result
        assert math.isfinite(result["train"]["loss"]) and math.isfinite(result["eval"]["loss"]), result
        assert os.path.exists(os.path.join(run_dir, "train", phase, "model.keras"))
