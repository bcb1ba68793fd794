"""The GPU benchmark's harness (benchmarks/bench_gpu.py, issue #20) end to end on the CPU: one
``--smoke`` run, as a subprocess, must measure every section (synthetic input, real input
from the TFRecords it preprocessed, the stage's train and evaluate subprocesses, distribution)
and report the targets unjudged, with its table; without ``--smoke`` and with no GPU visible
it must refuse, exit 2, and say why in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.bench_gpu import NO_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # the smoke run: about a minute


def _bench(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke run (about a minute here); its work folder kept, to check what it left."""
    tmp = tmp_path_factory.mktemp("bench-gpu")
    out, work = tmp / "gpu.json", tmp / "work"
    done = _bench("--smoke", "--out", str(out), "--work", str(work), "--keep")
    assert done.returncode == 0, done.stderr[-4000:]
    return {"result": json.loads(out.read_text()), "stdout": done.stdout, "stderr": done.stderr, "work": work}


def test_every_section_is_present_and_measured(smoke):
    r = smoke["result"]
    assert {"synthetic", "real_input", "stage", "distribution", "targets"} <= set(r)
    assert r["smoke"] is True and r["environment"]["device"] == "cpu" and r["environment"]["gpus"] == []

    [entry] = r["synthetic"]  # MobileNetV2 0.35 only, in smoke mode
    assert entry["label"] == "mobilenet_v2 alpha 0.35" and "error" not in entry
    cells = entry["cells"]
    assert {(c["policy"], c["xla"]) for c in cells} == {
        (p, x) for p in ("float32", "mixed_float16") for x in (False, True)
    }
    for c in cells:
        assert c["batch"] == 4 and c["global_batch"] == 4
        assert c["images_per_second"] > 0 and c["step_ms"] > 0, c
        assert c["loss_finite"] is True and math.isfinite(c["loss"]), c
        assert all("CPU" in d for d in c["input_devices"]), c  # made where the replica computes

    real = r["real_input"][entry["label"]]
    assert real["policy"] == "float32" and real["xla"] is False  # the stage's choices on this CPU
    assert real["stage_cache"] == "decoded" and set(real["runs"]) == {"decoded", "none"}
    assert real["synthetic_images_per_second"] > 0
    for run in real["runs"].values():
        assert run["images_per_second"] > 0 and run["ratio_to_synthetic"] > 0
        assert run["loss_finite"] is True and math.isfinite(run["loss"])
        expected = run["images_per_second"] / real["synthetic_images_per_second"]
        assert run["ratio_to_synthetic"] == pytest.approx(expected, rel=0.01)
    assert set(real["input_alone_images_per_second"]) == {"decoded", "decoded_no_augment", "none"}
    assert all(v > 0 for v in real["input_alone_images_per_second"].values())

    profile = real["profile"]
    assert "error" not in profile, profile
    assert profile["planes"] and all(p["events"] > 0 for p in profile["planes"])
    assert os.path.isfile(os.path.join(profile["logdir"], profile["trace"]))
    assert profile["logdir"].startswith(str(smoke["work"]))  # under the work folder, with its summary
    saved = json.loads(open(os.path.join(profile["logdir"], "summary.json")).read())
    assert saved["planes"] == profile["planes"]


def test_the_stage_trained_and_evaluated_on_one_cpu_replica(smoke):
    r, work = smoke["result"], smoke["work"]
    stage = r["stage"]
    summary = json.loads((work / "stage" / "train" / "summary.json").read_text())
    for key in ("precision_policy", "precision_reason", "xla", "replicas", "strategy", "device"):
        assert stage[key] == summary[key], key
    assert stage["replicas"] == 1 and stage["device"] == "cpu" and stage["strategy"] == "default"
    assert stage["precision_policy"] == "float32" and stage["xla"] is False
    assert stage["finetune_epochs_run"] == 1 and stage["seconds_per_finetune_epoch"] > 0
    assert stage["train_seconds_per_finetune_epoch"] > 0
    assert stage["losses_finite"] is True
    assert {"baseline loss", "candidate loss", "candidate val_loss"} <= set(stage["final_losses"])
    assert all(math.isfinite(v) for v in stage["final_losses"].values())
    assert all(stage["seconds"][k] > 0 for k in ("preprocess", "train", "evaluate"))

    verdict = stage["verdict"]
    assert {"blessed", "reason", "metric", "baseline", "candidate", "delta", "test_examples"} == set(verdict)
    written = json.loads((work / "stage" / "evaluate" / "verdict.json").read_text())
    assert {k: written[k] for k in verdict} == verdict
    assert (
        isinstance(verdict["blessed"], bool)
        and 0 <= verdict["candidate"] <= 1
        and verdict["test_examples"] > 0
    )

    dist = r["distribution"]
    assert dist["visible_gpus"] == 0 and dist["every_gpu_used"] is True
    assert dist["stage"]["replicas"] == 1
    assert dist["synthetic"] == {
        "mobilenet_v2 alpha 0.35": {"strategy": "default", "replicas": 1, "device": "cpu"}
    }


def test_targets_are_reported_and_not_judged_in_smoke_mode(smoke):
    r = smoke["result"]
    targets = r["targets"]
    assert len(targets) == 4
    for t in targets:
        assert {"name", "target", "reached", "met"} <= set(t) and t["met"] is None, t
    # No ResNet50 in smoke mode: nothing reached; MobileNetV2's real-input ratio is measured.
    assert all(t["reached"] is None for t in targets if t["name"].startswith("resnet50"))
    [mobilenet] = [t for t in targets if t["name"].startswith("mobilenet_v2 real input")]
    ratio = r["real_input"]["mobilenet_v2 alpha 0.35"]["runs"]["decoded"]["ratio_to_synthetic"]
    assert mobilenet["reached"] == ratio


def test_the_table_is_printed_and_the_result_written_to_stdout(smoke):
    lines = [line for line in smoke["stderr"].splitlines() if line.startswith("[bench] ")]
    text = "\n".join(lines)
    for heading in ("synthetic input: images/s", "real input:", "stage: mobilenet_v2", "targets"):
        assert heading in text, heading
    rows = [line for line in lines if line.startswith("[bench] mobilenet_v2 alpha 0.35 ")]
    assert len(rows) == 4 + 2  # a row per synthetic cell, one per real-input run
    assert json.loads(smoke["stdout"][smoke["stdout"].index("{") :]) == smoke["result"]


def test_without_smoke_and_no_gpu_it_exits_2_and_says_so(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine
    done = _bench("--out", str(tmp_path / "gpu.json"), "--work", str(tmp_path / "work"), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == NO_GPU
    assert "no GPU" in NO_GPU and "--smoke" in NO_GPU
    assert not (tmp_path / "gpu.json").exists() and not (tmp_path / "work").exists()
