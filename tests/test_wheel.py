"""The package as users get it: a built wheel, installed into a fresh virtualenv outside the
checkout, runs ``finetune run`` from another folder.

The development virtualenv is an editable install, which finds every module in the checkout
whether or not the package lists it (a missing ``__init__.py`` once left the preprocessing
stage out of every wheel and image while every test passed). Slow: the virtualenv installs
TensorFlow and Beam from pip's cache (~1.5 min).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.train_helpers import TINY_SIZE, make_colour_images

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "components")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps .``: the wheel ``pip install .`` would build and install, built
    from a copy of the files the Dockerfile copies (setuptools leaves a ``build/`` folder in
    the source tree, whose stale modules a later build would package)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "README.md", "LICENSE", "constraints.txt"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--wheel-dir",
        str(out),
        str(source),
    ]
    subprocess.run(argv, check=True, cwd=out)
    (built,) = out.glob("finetune_pipeline-*.whl")
    return built


def test_the_wheel_carries_every_module_the_template_and_the_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "components/preprocess/__init__.py" in sources and "components/evaluate/report.html.j2" in sources
    assert sorted(sources - names) == []  # every module and data file of the source tree
    (dist_info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        licence = archive.read(f"{dist_info}/licenses/LICENSE").decode()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert metadata["License"] == "Apache-2.0" and metadata["Requires-Python"] == ">=3.11,<3.12"
    assert metadata["Description-Content-Type"] == "text/markdown"
    readme_title = (ROOT / "README.md").read_text().splitlines()[0]
    description = metadata.get_payload()
    assert readme_title in description  # the README is the long description
    # with its links into the source tree as paths (on the package index they point nowhere)
    assert "(docs/" not in description and "`docs/stages.md#predict`" in description
    assert "`docs/configuration.md`: every configuration key" in description
    classifiers = metadata.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Topic :: Scientific/Engineering :: Image Recognition" in classifiers
    assert (
        "finetune = pipeline.cli:main"
        in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    )


def test_the_installed_wheel_runs_the_pipeline_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    install = [
        str(venv / "bin" / "pip"),
        "install",
        "--quiet",
        "-c",
        str(ROOT / "constraints.txt"),
        str(wheel),
    ]
    subprocess.run(install, check=True, cwd=tmp_path, env=env)

    work = tmp_path / "work"  # not the checkout: nothing here but the data
    images = make_colour_images(str(work / "images"), per_class=20)
    probe = "import pipeline, components.preprocess.stage as s; print(pipeline.__file__); print(s.__file__)"
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(venv / "lib")) for path in found), found

    settings = [
        "data.source=images",
        "run_dir=runs/tiny",
        "registry.uri=registry",
        "model.weights=none",
        f"model.image_size={TINY_SIZE}",
        "train.batch_size=8",
        "train.baseline_epochs=1",
        "train.finetune_epochs=1",
        "evaluate.bootstrap_samples=200",
        "gate.min_improvement=-1",  # blesses any candidate: export and push run too
    ]
    argv = [str(venv / "bin" / "finetune"), "run"] + [a for s in settings for a in ("--set", s)]
    result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    run = work / "runs" / "tiny"
    assert sum(json.loads((run / "preprocess" / "summary.json").read_text())["records"].values()) == images
    assert json.loads((run / "evaluate" / "verdict.json").read_text())["blessed"] is True
    assert "<html" in (run / "report.html").read_text()  # the template came with the wheel
    pushed = json.loads((run / "push" / "summary.json").read_text())
    assert pushed["pushed"] is True
    assert (work / "registry" / "model" / str(pushed["version"]) / "saved_model.pb").is_file(), output[-3000:]
