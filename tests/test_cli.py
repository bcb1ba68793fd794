"""The finetune command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml

from components.core.errors import StageError
from pipeline.cli import main
from tests.image_fixtures import make_odd_and_bad

FINETUNE = [sys.executable, "-m", "pipeline.cli"]


def test_help_lists_the_commands():
    result = subprocess.run([*FINETUNE, "--help"], capture_output=True, text=True, check=True)
    assert (
        all(c in result.stdout for c in ("preprocess", "train", "evaluate", "config"))
        and "--set" not in result.stderr
    )
    sub = subprocess.run([*FINETUNE, "preprocess", "--help"], capture_output=True, text=True, check=True)
    assert "--config FILE" in sub.stdout and "--set KEY=VALUE" in sub.stdout


def test_config_prints_the_resolved_tree(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: {source: /imgs}\nrun_dir: /r\n")
    assert main(["config", "--config", str(tmp_path / "c.yaml"), "--set", "model.image_size=96"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["model"] == {
        "backbone": "mobilenet_v2",
        "image_size": 96,
        "weights": "imagenet",
        "alpha": 1.0,
        "dropout": 0.2,
    }
    assert tree["train"]["batch_size"] == 32 and tree["train"]["augment"]["flip"] is True
    assert tree["preprocess"]["num_shards"] == 0  # from the data


def test_bad_config_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(
        f"data: {{source: {tmp_path}}}\nrun_dir: {tmp_path / 'run'}\nmodel: {{backbone: resnet5}}\n"
    )
    assert main(["preprocess", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.backbone: unknown backbone 'resnet5'; did you mean 'resnet50'?" in err
    assert not os.path.exists(tmp_path / "run")


def test_preprocess_with_only_source_and_run_dir(tmp_path, capsys, monkeypatch):
    from components.preprocess import stage

    source = tmp_path / "src"
    expected = make_odd_and_bad(str(source))
    run_dir = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(f"data: {{source: {source}}}\nrun_dir: {run_dir}\n")
    # The failing run in this process (no second interpreter to start: TensorFlow and Beam
    # are already imported); the passing one below as a user runs it. The failing run is
    # also the stage's too-many-bad-inputs check: what it raised and what it left behind.
    raised = []

    def run_and_record(config):
        try:
            return real_run(config)
        except Exception as e:
            raised.append(e)
            raise

    real_run = stage.run
    monkeypatch.setattr(stage, "run", run_and_record)
    code = main(["preprocess", "--config", str(tmp_path / "c.yaml"), "--set", "preprocess.num_workers=1"])
    err = capsys.readouterr().err
    assert code == 1, err  # the fixture is mostly bad input
    assert "inputs were bad" in err and "dead_letter.jsonl" in err
    assert len(raised) == 1 and isinstance(raised[0], StageError), raised
    assert re.search(r"inputs were bad .* preprocess.max_bad_fraction 10.0%", str(raised[0]))
    prep = run_dir / "preprocess"
    dead = [
        json.loads(line) for line in (prep / "dead_letter.jsonl").read_text().splitlines() if line.strip()
    ]
    assert len(dead) == sum(reason is not None for reason in expected.values())
    failed = json.loads((prep / "summary.json").read_text())
    assert failed["status"] == "failed" and "max_bad_fraction" in failed["error"]
    assert not os.path.exists(prep / "train")
    assert not os.path.exists(prep / "transform_fn")
    monkeypatch.undo()

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [
            *FINETUNE,
            "preprocess",
            "--config",
            str(tmp_path / "c.yaml"),
            "--set",
            "preprocess.max_bad_fraction=0.9",
            "--set",
            "preprocess.num_workers=1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "[preprocess] ok: records" in result.stdout
    summary = json.loads((run_dir / "preprocess" / "summary.json").read_text())
    assert summary["image_size"] == 224 and summary["status"] == "ok"


def test_train_without_preprocessing_says_what_to_run_first(tmp_path, capsys):
    # In this process: a subprocess would spend its time importing TensorFlow; the exit
    # codes of a real process are checked by the subprocess tests around this one.
    assert main(["train", "--set", "data.source=/imgs", "--set", f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "finetune train: failed:" in err and "run `finetune preprocess`" in err


def test_train_rejects_bad_model_options_before_any_work(tmp_path):
    result = subprocess.run(
        [
            *FINETUNE,
            "train",
            "--set",
            "data.source=/imgs",
            "--set",
            f"run_dir={tmp_path}",
            "--set",
            "model.alpha=0.3",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2 and "ImageNet weights for mobilenet_v2 exist only for alpha" in result.stderr
    )
    assert not os.path.exists(os.path.join(tmp_path, "train"))
