"""The structure the code promises: importing a module changes nothing, TensorFlow's options are
set per command, and the Kubernetes driver decides without TensorFlow or Beam."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.cli import tensorflow_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    return result.stdout.strip()


def test_importing_the_packages_changes_no_tensorflow_option():
    code = (
        "import os, pipeline, pipeline.cli, components, components.evaluate.stage; "
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    )
    assert _python(code) == "None"


def test_training_commands_turn_on_onednn_and_serving_like_commands_keep_the_default():
    for command in ("run", "preprocess", "train"):
        env: dict[str, str] = {}
        tensorflow_options(command, env)
        assert env == {"TF_ENABLE_ONEDNN_OPTS": "1"}, command
    for command in ("evaluate", "push", "drive", "registry"):
        env = {}
        tensorflow_options(command, env)
        assert env == {}, command
    env = {"TF_ENABLE_ONEDNN_OPTS": "0"}  # the user's choice wins
    tensorflow_options("train", env)
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "0"}


def test_the_driver_decides_without_tensorflow_or_beam():
    code = (
        "import sys, pipeline.cluster.driver, pipeline.cluster_cli, pipeline.orchestrator; "
        "print(sorted(m for m in ('tensorflow', 'tf_keras', 'apache_beam', 'tensorflow_transform') "
        "if m in sys.modules))"
    )
    assert _python(code) == "[]"


def _modules() -> list[str]:
    found = []
    for package in ("pipeline", "components"):
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            found += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def test_every_module_says_what_it_is_for_and_a_long_one_says_why():
    import ast

    for path in _modules():
        text = open(path, encoding="utf-8").read()
        doc = ast.get_docstring(ast.parse(text)) or ""
        name = os.path.relpath(path, ROOT)
        assert doc.strip(), f"{name}: no module docstring saying what it is for"
        if text.count("\n") > 400:
            assert "over 400 lines" in doc.lower(), (
                f"{name}: {text.count(chr(10))} lines and no reason at its top"
            )
