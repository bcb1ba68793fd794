"""The push stage against a local registry and fake-gcs-server: atomic publishing with
warm-up requests and infra validation, no-op re-pushes, racing pushes in separate
processes (of different exports, and of one export), and pushes SIGKILLed before and after
their commit record, then completed or quarantined by ``finetune registry fsck``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from components import registry, registry_maintenance
from components.config import load_config
from components.core import storage
from components.core.errors import StageError
from components.evaluate import export
from components.push import serving
from components.push import stage as push_stage
from pipeline import cli
from tests.registry_helpers import (  # noqa: F401 - fixtures
    CLASSES,
    SIZE,
    blessed_runs,
    copy_run,
    fake_gcs_prefix,
    fake_gcs_server,
    loadable_but_uncommitted,
    loadable_versions,
    make_blessed_run,
    reg,
)

NAME = "beans"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(run_dir: str, reg: str, *more: str) -> list[str]:
    return ["data.source=unused-by-push", f"run_dir={run_dir}", f"name={NAME}", f"registry.uri={reg}", *more]


def _config(run_dir: str, reg: str, *more: str):
    return load_config(None, _overrides(run_dir, reg, *more))


def _visible_versions(reg: str) -> list[int]:
    return loadable_versions(reg, NAME)


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
    from components import registry
    from components.push import stage
    from components.core import storage
    from components.config import load_config

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    real_copy = storage.copy_file
    def copy_until_the_graph(src, dst):
        if dst.endswith("saved_model.pb") and "_registry" not in dst:
            die()  # the last upload: after the commit record
        return real_copy(src, dst)

    where, reg = sys.argv[1], sys.argv[2]
    if where == "before-commit":
        registry.commit_version = die     # staged, validated, claimed (on GCS: uploaded but the graph)
    elif reg.startswith("gs://"):
        storage.copy_file = copy_until_the_graph
    else:
        os.rename = die                   # committed, not yet renamed to its number
    stage.run(load_config(None, sys.argv[3:]))
    """
)


def _kill_a_push(reg: str, run_dir: str, where: str) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MIDWAY, where, reg, *_overrides(run_dir, reg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert storage.exists(storage.join(reg, NAME, registry.META, "claims", "1.json"))  # claimed 1
    # What TF Serving's poller sees: nothing to load, and never a folder without a commit record.
    assert _visible_versions(reg) == [] and loadable_but_uncommitted(reg, NAME) == []
    assert serving.models_config(reg, [NAME]) == ""
    assert [r["version"] for r in registry.versions(reg, NAME)] == ([1] if where == "after-commit" else [])
    with pytest.raises(StageError, match="version 1"):
        registry.promote(reg, NAME, "production", 1)


def _registry_cli(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert cli.main(["registry", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("where", ["before-commit", "after-commit"])
def test_a_push_killed_midway_is_invisible_and_fsck_completes_it(
    reg: str, where: str, blessed_runs: list[str], tmp_path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    _kill_a_push(reg, run_dir, where)
    # The grace period protects a push that may still be running: nothing is touched.
    assert "within the grace period" in _registry_cli(capsys, "fsck", "--registry", reg)
    out = _registry_cli(capsys, "fsck", "--registry", reg, "--grace-hours", "0", "--dry-run")
    assert "would be completed" in out and _visible_versions(reg) == []
    out = _registry_cli(capsys, "fsck", "--registry", reg, "--grace-hours", "0")
    assert f"{NAME}: completed: " in out and "checked against its claim" in out
    assert _visible_versions(reg) == [1] and loadable_but_uncommitted(reg, NAME) == []
    assert registry.is_complete(reg, NAME, 1) and registry.promote(reg, NAME, "production", 1)
    assert registry.get_version(reg, NAME, 1)["fingerprint"].startswith("sha256:")
    assert _registry_cli(capsys, "fsck", "--registry", reg, "--grace-hours", "0").startswith(
        "fsck: changed 0"
    )

    out = _registry_cli(capsys, "gc", "--registry", reg, "--grace-hours", "0")
    assert "removed: " in out and "fingerprint claim" in out  # the killed push still held it
    for folder in ("fingerprints", "staging"):
        assert storage.list_files(storage.join(reg, NAME, registry.META, folder)) == []
    again = push_stage.run(_config(run_dir, reg))
    assert not again["pushed"] and again["version"] == 1


def test_fsck_quarantines_what_it_cannot_complete(
    reg: str, blessed_runs: list[str], tmp_path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    _kill_a_push(reg, run_dir, "after-commit")
    staging = storage.join(reg, NAME, registry.META, "staging")
    for info in storage.list_files(staging):  # the staged files are lost
        storage.delete_file(info.uri)
    if not storage.is_gcs(reg):
        storage.delete_tree(staging)
    out = _registry_cli(capsys, "fsck", NAME, "--registry", reg, "--grace-hours", "0")
    assert "quarantined: " in out and "is missing (neither in the version folder nor" in out
    assert registry.versions(reg, NAME) == [] and _visible_versions(reg) == []
    quarantine = storage.join(reg, NAME, registry.META, "quarantine")
    kept = {"/".join(registry.relative(i.uri, quarantine)[1:]) for i in storage.list_files(quarantine)}
    assert {"reason.json", "commit.json"} <= kept
    out = _registry_cli(capsys, "gc", NAME, "--registry", reg, "--grace-hours", "0")
    assert "the highest number: kept so that it is never reused" in out
    summary = push_stage.run(_config(run_dir, reg))
    assert summary["pushed"] and summary["version"] == 2  # number 1 is never reused
    assert _visible_versions(reg) == [2] and loadable_but_uncommitted(reg, NAME) == []


RACE_SAME_EXPORT = textwrap.dedent(
    """
    import os, sys, time
    from components import registry_maintenance
    from components.push import stage
    from components.config import load_config

    barrier, parties = sys.argv[1], int(sys.argv[2])
    real = registry_maintenance.hold_fingerprint
    def hold_together(*args, **kwargs):
        # Both processes try to take the claim at the same moment (a file barrier).
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        while len(os.listdir(barrier)) < parties:
            time.sleep(0.01)
        registry_maintenance.hold_fingerprint = real
        return real(*args, **kwargs)

    registry_maintenance.hold_fingerprint = hold_together
    stage.FINGERPRINT_POLL_S = 0.2
    stage.run(load_config(None, sys.argv[3:]))
    """
)


def test_racing_pushes_of_the_same_export_publish_it_once(
    reg: str, blessed_runs: list[str], tmp_path
) -> None:
    runs = [copy_run(blessed_runs[0], str(tmp_path / f"run{i}")) for i in (1, 2)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SAME_EXPORT, str(barrier), "2", *_overrides(run, reg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for run in runs
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    summaries = [json.loads(storage.read_text(os.path.join(r, "push", "summary.json"))) for r in runs]
    assert sorted(s["pushed"] for s in summaries) == [False, True], summaries
    assert {s["version"] for s in summaries} == {1}
    assert "waiting: " in "".join(outputs) and "already published as version 1" in "".join(outputs)
    assert _visible_versions(reg) == [1] and [r["version"] for r in registry.versions(reg, NAME)] == [1]
    assert storage.list_files(storage.join(reg, NAME, registry.META, "fingerprints")) == []


def test_a_held_fingerprint_claim_is_waited_for_and_bounded(
    blessed_runs: list[str], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = str(tmp_path / "registry")
    run_dir = copy_run(blessed_runs[0], str(tmp_path / "run"))
    fingerprint = export.content_fingerprint(os.path.join(run_dir, "export", "saved_model"))
    assert registry_maintenance.hold_fingerprint(reg, NAME, fingerprint, {"who": "other@host"}) is None
    monkeypatch.setattr(push_stage, "FINGERPRINT_WAIT_S", 1.0)
    monkeypatch.setattr(push_stage, "FINGERPRINT_POLL_S", 0.1)
    with pytest.raises(StageError, match="other@host.*still holds .*fingerprints/.*registry fsck"):
        push_stage.run(_config(run_dir, reg))
    assert registry.versions(reg, NAME) == [] and _visible_versions(reg) == []

    # The holder publishes the export while this push waits: this one then reports that version.
    monkeypatch.setattr(push_stage, "FINGERPRINT_WAIT_S", 60.0)

    def publish_and_release() -> None:
        time.sleep(1.0)
        number = registry.claim_version(reg, NAME, {"who": "other@host"})
        graph = storage.join(registry.version_uri(reg, NAME, number), registry.SAVED_MODEL_PB)
        storage.write_bytes(graph, b"graph")
        registry.commit_version(reg, NAME, number, {"fingerprint": fingerprint})
        registry_maintenance.release_fingerprint(reg, NAME, fingerprint)

    holder = threading.Thread(target=publish_and_release)
    holder.start()
    summary = push_stage.run(_config(run_dir, reg))
    holder.join()
    assert not summary["pushed"] and summary["version"] == 1 and "already published" in summary["reason"]
    assert _visible_versions(reg) == [1]
