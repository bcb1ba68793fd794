"""The push stage against a local registry and fake-gcs-server: atomic publishing with
warm-up requests and infra validation, no-op re-pushes, racing pushes in separate
processes, and a push killed midway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from components import registry
from components.evaluate import export
from components.push import serving
from components.push import stage as push_stage
from pipeline import storage
from pipeline.config import load_config
from pipeline.errors import StageError
from tests.registry_helpers import (  # noqa: F401 - fixtures
    CLASSES,
    SIZE,
    blessed_runs,
    copy_run,
    fake_gcs_prefix,
    fake_gcs_server,
    make_blessed_run,
)

NAME = "beans"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def reg(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "gcs":
        return request.getfixturevalue("fake_gcs_prefix")
    return str(tmp_path / "registry")


def _overrides(run_dir: str, reg: str, *more: str) -> list[str]:
    return ["data.source=unused-by-push", f"run_dir={run_dir}", f"name={NAME}", f"registry.uri={reg}", *more]


def _config(run_dir: str, reg: str, *more: str):
    return load_config(None, _overrides(run_dir, reg, *more))


def _visible_versions(reg: str) -> list[int]:
    """What a TF Serving file-system poller would load: integer folders with saved_model.pb."""
    found = set()
    base = registry.model_uri(reg, NAME)
    for info in storage.list_files(base):
        parts = info.uri[len(base) :].replace("\\", "/").strip("/").split("/")
        if parts[0].isdigit() and parts[1:] == [export.SAVED_MODEL_PB]:
            found.add(int(parts[0]))
    return sorted(found)


def test_push_publishes_a_validated_version_and_a_second_push_is_a_no_op(
    reg: str, blessed_runs: list[str], tmp_path
) -> None:
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    summary = push_stage.run(_config(run_dir, reg, "registry.promote_to=staging"))
    assert summary["pushed"] and summary["version"] == 1
    assert summary["infra_validation"]["requests"] == 1
    assert summary["promoted"] == {"alias": "staging", "version": 1, "moved": True, "previous": None}
    assert json.loads(storage.read_text(os.path.join(run_dir, "push", "summary.json")))["version"] == 1
    assert _visible_versions(reg) == [1]
    record = registry.get_version(reg, NAME, 1)
    assert record["labels"] == CLASSES and record["verdict"]["candidate"] == 0.90
    assert record["fingerprint"] == summary["fingerprint"] and record["source_run"] == run_dir
    assert record["data_fingerprint"] == "data-0" and record["code_version"]

    # The published version is self-describing and serves its own warm-up request.
    local = str(tmp_path / "published")
    storage.copy_tree(registry.version_uri(reg, NAME, 1), local)
    extra = os.path.join(local, export.EXTRA)
    assert {
        "config.yaml",
        "verdict.json",
        "labels.txt",
        "fingerprint.json",
        "metrics.json",
        "push.json",
    } <= set(os.listdir(extra))
    (raw,) = list(tf.data.TFRecordDataset(os.path.join(extra, serving.WARMUP_FILE)).as_numpy_iterator())
    request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
    assert request.model_spec.name == NAME and request.model_spec.signature_name == "serving_default"
    out = tf.saved_model.load(local).signatures["serving_default"](
        images=tf.constant(tf.make_ndarray(request.inputs["images"]))
    )
    assert out["probabilities"].shape == (1, len(CLASSES))
    assert np.isclose(float(tf.reduce_sum(out["probabilities"])), 1.0, atol=1e-5)

    again = push_stage.run(_config(run_dir, reg, "registry.promote_to=staging"))
    assert not again["pushed"] and again["version"] == 1 and "already published" in again["reason"]
    assert again["promoted"]["moved"] is False
    assert _visible_versions(reg) == [1] and len(registry.versions(reg, NAME)) == 1


def test_not_blessed_pushes_nothing_and_missing_pieces_fail_clearly(tmp_path) -> None:
    reg = str(tmp_path / "registry")
    run_dir = make_blessed_run(str(tmp_path / "lost"), seed=0, blessed=False)
    summary = push_stage.run(_config(run_dir, reg, "registry.promote_to=production"))
    assert not summary["pushed"] and summary["version"] is None
    assert summary["reason"].startswith("not blessed: candidate is not better")
    assert registry.model_names(reg) == [] and "promoted" not in summary
    with pytest.raises(StageError, match="registry.uri is not set"):
        push_stage.run(_config(run_dir, ""))
    with pytest.raises(StageError, match="run `finetune evaluate`"):
        push_stage.run(_config(str(tmp_path / "empty"), reg))


def test_infra_validation_rejects_a_model_that_cannot_serve(blessed_runs: list[str], tmp_path) -> None:
    reg = str(tmp_path / "registry")
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    labels = os.path.join(run_dir, "export", "saved_model", export.EXTRA, export.LABELS_FILE)
    with open(labels, "w") as f:
        f.write("only\ntwo\n")  # the model answers three classes
    with pytest.raises(StageError, match="infra validation.*shape"):
        push_stage.run(_config(run_dir, reg))
    assert registry.versions(reg, NAME) == [] and _visible_versions(reg) == []
    assert not os.path.exists(os.path.join(reg, NAME, registry.META, "claims"))  # nothing was claimed


def _push_process(run_dir: str, reg: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline.cli", "push"]
    for item in _overrides(run_dir, reg):
        argv += ["--set", item]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_racing_pushes_from_two_processes_get_distinct_versions(
    reg: str, blessed_runs: list[str], tmp_path
) -> None:
    runs = [copy_run(blessed_runs[i], str(tmp_path / f"run{i}")) for i in (1, 2)]
    processes = [_push_process(run, reg) for run in runs]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    pushed = sorted(
        json.loads(storage.read_text(os.path.join(r, "push", "summary.json")))["version"] for r in runs
    )
    assert pushed == [1, 2]
    assert _visible_versions(reg) == [1, 2]
    fingerprints = {r["fingerprint"] for r in registry.versions(reg, NAME)}
    assert len(fingerprints) == 2


KILL_MIDWAY = textwrap.dedent(
    """
    import os, signal, sys
    from components.push import stage
    from pipeline import storage
    from pipeline.config import load_config

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    real_copy = storage.copy_file
    def copy_until_the_graph(src, dst):
        if dst.endswith("saved_model.pb"):
            die()
        return real_copy(src, dst)

    if sys.argv[1].startswith("gs://"):
        storage.copy_file = copy_until_the_graph   # everything else is uploaded by now
    else:
        os.rename = die                            # staged and validated, not yet renamed
    stage.run(load_config(None, sys.argv[2:]))
    """
)


def test_a_push_killed_midway_leaves_no_visible_version(reg: str, blessed_runs: list[str], tmp_path) -> None:
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MIDWAY, reg, *_overrides(run_dir, reg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert storage.exists(storage.join(reg, NAME, registry.META, "claims", "1.json"))  # claimed 1 ...
    assert registry.versions(reg, NAME) == []  # ... but never committed it
    assert _visible_versions(reg) == []  # and a server watching the folder sees nothing to load
    assert serving.models_config(reg, [NAME]) == ""
    with pytest.raises(StageError, match="no version 1"):
        registry.promote(reg, NAME, "production", 1)

    summary = push_stage.run(_config(run_dir, reg))
    assert summary["pushed"] and summary["version"] == 2  # the dead claim's number is not reused
    assert _visible_versions(reg) == [2]
