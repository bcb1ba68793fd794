"""Stages own their folders, leave no debris when killed, and a skip trusts only content.

Each test reproduces the fault for real: a user's file in a stage folder, a preprocessing
process killed with SIGKILL, a model or export replaced after the stage that used it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from components.core import outputs, scratch
from components.evaluate import stage as evaluate_stage
from components.push import stage as push_stage
from components.train import stage as train_stage
from pipeline import orchestrator
from pipeline.cli import main
from tests.train_helpers import TINY_SIZE, copy_trained, make_colour_images, train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _preprocess_args(source, run_dir) -> list[str]:
    sets = [
        f"data.source={source}",
        f"run_dir={run_dir}",
        f"model.image_size={TINY_SIZE}",
        "preprocess.num_workers=1",
        "preprocess.num_shards=1",
    ]
    return ["preprocess", *(a for s in sets for a in ("--set", s))]


def _tree(folder) -> dict[str, bytes]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def test_preprocess_never_deletes_a_file_it_did_not_write(tmp_path, capsys):
    source, run_dir = tmp_path / "images", tmp_path / "run"
    make_colour_images(str(source), per_class=6)
    notes = run_dir / "preprocess" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my notes")

    assert main(_preprocess_args(source, run_dir)) == 2  # a folder it did not make: refused
    error = capsys.readouterr().err
    assert "notes.txt" in error and "Move them out of" in error and "has no .finetune-stage.json" in error
    assert notes.read_text() == "my notes" and sorted(os.listdir(run_dir)) == ["preprocess"]

    notes.unlink()
    assert main(_preprocess_args(source, run_dir)) == 0
    marker = json.loads((run_dir / "preprocess" / outputs.OWNER_FILE).read_text())
    published = _tree(run_dir / "preprocess")
    assert marker["stage"] == "preprocess"
    assert marker["files"] == {rel: len(data) for rel, data in published.items() if rel != outputs.OWNER_FILE}

    notes.write_text("kept beside the outputs")  # a finished folder: its own files are listed
    assert main(_preprocess_args(source, run_dir)) == 2
    error = capsys.readouterr().err
    assert "notes.txt" in error and "the preprocess stage did not write them" in error
    assert notes.read_text() == "kept beside the outputs"
    assert {k: v for k, v in _tree(run_dir / "preprocess").items() if k != "notes.txt"} == published

    notes.unlink()
    os.remove(run_dir / "preprocess" / "summary.json")  # a file it wrote, gone: replacing is fine
    assert main(_preprocess_args(source, run_dir)) == 0


def test_train_and_evaluate_refuse_folders_holding_files_they_did_not_write(tiny_trained, tmp_path):
    run_dir = copy_trained(tiny_trained, str(tmp_path / "run"))
    config = train_config(run_dir)
    mine = os.path.join(run_dir, "train", "baseline", "my-checkpoint.keras")
    with open(mine, "w") as f:
        f.write("mine")
    with pytest.raises(outputs.FolderNotOwned, match="my-checkpoint.keras"):
        train_stage.run(config)
    assert open(mine).read() == "mine"
    assert os.path.exists(os.path.join(run_dir, "train", "summary.json"))  # nothing replaced

    mine = os.path.join(run_dir, "export", "mine.txt")
    os.makedirs(os.path.dirname(mine))
    with open(mine, "w") as f:
        f.write("mine")
    with pytest.raises(outputs.FolderNotOwned, match=r"export holds files .*mine\.txt"):
        evaluate_stage.run(config)
    assert open(mine).read() == "mine" and not os.path.exists(os.path.join(run_dir, "evaluate"))


def test_skips_key_on_the_models_and_the_export_they_used(tiny_trained, tmp_path):
    """evaluate is redone when a model it judged is replaced; push when the export changed."""
    run_dir = copy_trained(tiny_trained, str(tmp_path / "run"))
    config = train_config(
        run_dir,
        "gate.min_improvement=-1",
        "evaluate.bootstrap_samples=100",
        "export.tflite=false",
        f"registry.uri={tmp_path / 'reg'}",
    )
    verdict = evaluate_stage.run(config)
    pushed = push_stage.run(config)
    assert pushed["fingerprint"] == verdict["export"]["fingerprint"]  # what push published
    finished = {name: orchestrator.stage(name).finished for name in ("train", "evaluate", "push")}
    assert all(check(config) is not None for check in finished.values())

    model = os.path.join(run_dir, "train", "candidate", "model.keras")
    original = open(model, "rb").read()
    baseline = open(os.path.join(run_dir, "train", "baseline", "model.keras"), "rb").read()
    with open(model, "wb") as f:  # same size, other weights: only a digest tells
        f.write(baseline[: len(original)].ljust(len(original), b"\0"))
    assert finished["evaluate"](config) is None
    with open(model, "wb") as f:
        f.write(original)
    assert finished["evaluate"](config) is not None

    variables = os.path.join(run_dir, "export", "saved_model", "variables", "variables.index")
    os.remove(variables)
    assert finished["evaluate"](config) is None  # a blessed verdict without its whole export
    again = evaluate_stage.run(config)
    assert finished["evaluate"](config) is not None
    # push's outputs stand exactly when the new export is the one it published
    same_export = again["export"]["fingerprint"] == pushed["fingerprint"]
    assert (finished["push"](config) is not None) == same_export

    path = os.path.join(run_dir, "evaluate", "verdict.json")
    written = json.loads(open(path).read())
    written["export"]["fingerprint"] = "sha256:" + "0" * 64  # as a later evaluate would leave it
    with open(path, "w") as f:
        json.dump(written, f)
    assert finished["push"](config) is None


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_preprocess_leaves_nothing_after_the_next_run(tmp_path):
    source, run_dir, tmp = tmp_path / "images", tmp_path / "run", tmp_path / "tmp"
    make_colour_images(str(source), per_class=40)
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "pipeline.cli", *_preprocess_args(source, run_dir)]

    def debris() -> tuple[list[str], list[str]]:
        staging = (
            [n for n in os.listdir(run_dir) if n.startswith(".preprocess-staging-")]
            if run_dir.exists()
            else []
        )
        return staging, [n for n in os.listdir(tmp) if n.startswith("finetune-preprocess-")]

    process = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True)
    try:
        assert _wait_for(lambda: all(debris()), 120), "preprocessing never started"
        time.sleep(1.0)  # inside the Beam pipeline
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    staging, temporary = debris()
    assert staging and temporary, "the kill left nothing behind; the test proves nothing"

    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert debris() == ([], [])
    assert "staging folder(s) left by killed runs" in done.stderr
    assert "temporary folder(s) left by killed runs" in done.stderr
    assert json.loads((run_dir / "preprocess" / "summary.json").read_text())["status"] == "ok"


def _dead_process() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE)
    pid = int(child.communicate()[0])
    return f"{pid}-{scratch._start_time(pid) or '1'}"


def test_staging_of_dead_processes_and_stale_foreign_hosts_is_swept(tmp_path):
    run_dir = str(tmp_path)
    now = time.time()
    owners = {
        "dead": {"host": socket.gethostname(), "process": _dead_process(), "created": now},
        "alive": {"host": socket.gethostname(), "process": scratch._me(), "created": now - 10**6},
        "foreign-old": {
            "host": "other-pod",
            "process": "1-1",
            "created": now - 2 * scratch.FOREIGN_GRACE_SECONDS,
        },
        "foreign-new": {"host": "other-pod", "process": "1-1", "created": now - 60},
    }
    for name, owner in owners.items():
        folder = tmp_path / f".preprocess-staging-{name}"
        folder.mkdir()
        (folder / scratch.OWNER).write_text(json.dumps(owner))
        (folder / "part.tfrecord").write_bytes(b"x")
    (tmp_path / ".preprocess-staging-ownerless").mkdir()  # killed before its owner record
    (tmp_path / ".train-staging-x").mkdir()  # another stage's: not touched

    removed = scratch.sweep_staging(run_dir, "preprocess", now=now)
    assert sorted(os.path.basename(p) for p in removed) == [
        ".preprocess-staging-dead",
        ".preprocess-staging-foreign-old",
        ".preprocess-staging-ownerless",
    ]
    left = sorted(os.listdir(tmp_path))
    assert left == [".preprocess-staging-alive", ".preprocess-staging-foreign-new", ".train-staging-x"]


def test_temporary_folders_of_dead_processes_are_swept(tmp_path):
    dead = tmp_path / f"finetune-preprocess-{_dead_process()}-abc"
    alive = tmp_path / f"finetune-export-{scratch._me()}-def"
    other = tmp_path / "finetune-unrelated"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "f").write_bytes(b"x")
    assert scratch.sweep_local(str(tmp_path)) == [str(dead)]
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name])
    shutil.rmtree(alive)
