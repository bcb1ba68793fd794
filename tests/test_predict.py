"""``finetune predict`` (#19): batch prediction with a registry model, through Beam's
RunInference on the local runner, against the exported SavedModels themselves.

The models are real serving exports (``registry_helpers.make_blessed_run``: the export's
own ServingModule around a tiny tf_keras classifier) pushed into a local registry by the real
push stage; the expected outputs are what each SavedModel's ``serving_default`` returns for
the same bytes, called directly.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from components import registry
from components.config import load_config, parse_model_ref
from components.config.predict import expand_output
from components.core import outputs, storage
from components.core.errors import ConfigError, StageError
from components.predict import pipeline as graph
from components.predict import stage
from components.push import stage as push_stage
from tests.preprocess_helpers import SHARED
from tests.registry_helpers import make_blessed_run
from tests.train_helpers import make_colour_images

NAME = "beans"
BEANS_TEST = os.path.join(SHARED, "beans", "test")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local registry holding versions 1 and 2 of 'beans' (different weights), pushed by
    the push stage; 'production' points at version 1."""
    root = tmp_path_factory.mktemp("predict-registry")
    uri = str(root / "registry")
    for seed in (0, 1):
        run_dir = make_blessed_run(str(root / f"run{seed}"), seed)
        overrides = ["data.source=unused", f"run_dir={run_dir}", f"name={NAME}", f"registry.uri={uri}"]
        push_stage.run(load_config(None, overrides))
    registry.promote(uri, NAME, "production", 1, reason="test")
    return uri


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory: pytest.TempPathFactory) -> str:
    """30 noisy colour JPEGs in nested folders (predict reads folders recursively)."""
    root = str(tmp_path_factory.mktemp("predict-images") / "images")
    make_colour_images(root, per_class=10)
    return root


def _config(reg: str, model: str, source: str, output: str, *more: str):
    overrides = [
        f"registry.uri={reg}",
        f"predict.model={model}",
        f"predict.input={source}",
        f"predict.output={output}",
        "predict.batch_size=8",
        *more,
    ]
    return load_config(None, overrides, training=False)


def _rows(output: str) -> dict[str, dict]:
    """uri -> prediction row, from every prediction file under ``output`` (local or gs://)."""
    rows: dict[str, dict] = {}
    for info in storage.list_files(output):
        if os.path.basename(info.uri).startswith("predictions-"):
            for line in storage.read_text(info.uri).splitlines():
                row = json.loads(line)
                assert row["uri"] not in rows, f"{row['uri']} predicted twice"
                rows[row["uri"]] = row
    return rows


def _dead_letters(output: str) -> dict[str, dict]:
    text = storage.read_text(storage.join(output, "dead_letter.jsonl"))
    return {d["uri"]: d for d in map(json.loads, text.splitlines())}


def _expected(model_dir: str, uris: list[str]) -> dict[str, dict]:
    """What the SavedModel's own serving_default says for each file's bytes."""
    import tensorflow as tf

    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    expected = {}
    for start in range(0, len(uris), 16):
        chunk = uris[start : start + 16]
        out = signature(images=tf.constant([open(u, "rb").read() for u in chunk]))
        for i, uri in enumerate(chunk):
            ids = out["class_ids"].numpy()[i]
            expected[uri] = {
                "class_ids": [int(c) for c in ids],
                "class_names": [n.decode() for n in out["class_names"].numpy()[i]],
                "probabilities": [float(out["probabilities"].numpy()[i][c]) for c in ids],
            }
    return expected


def _assert_rows_match(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    assert set(rows) == set(expected)
    for uri, want in expected.items():
        row = rows[uri]
        assert [e["class_id"] for e in row["top_k"]] == want["class_ids"], uri
        assert [e["class_name"] for e in row["top_k"]] == want["class_names"], uri
        np.testing.assert_allclose([e["probability"] for e in row["top_k"]], want["probabilities"], atol=1e-6)
        assert (row["class_id"], row["class_name"]) == (want["class_ids"][0], want["class_names"][0])
        assert row["probability"] == row["top_k"][0]["probability"]


@pytest.mark.skipif(not os.path.isdir(BEANS_TEST), reason=f"real data not found at {BEANS_TEST}")
def test_predictions_on_beans_photos_equal_the_registry_models_own_outputs(reg, tmp_path):
    photos = tmp_path / "photos"
    for label in sorted(os.listdir(BEANS_TEST)):
        os.makedirs(photos / label)
        for path in sorted(glob.glob(os.path.join(BEANS_TEST, label, "*")))[:12]:
            shutil.copy(path, photos / label)
    out = str(tmp_path / "out")
    summary = stage.run(_config(reg, f"registry://{NAME}@production", str(photos), out))

    uris = sorted(glob.glob(str(photos / "*" / "*")))
    assert len(uris) == 36 and summary["inputs"] == 36 and summary["predictions"] == 36
    rows = _rows(out)
    _assert_rows_match(rows, _expected(registry.version_uri(reg, NAME, 1), uris))
    record = registry.get_version(reg, NAME, 1)
    assert {r["model"]["version"] for r in rows.values()} == {1}
    assert rows[uris[0]]["model"] == {"name": NAME, "version": 1, "fingerprint": record["fingerprint"]}
    assert summary["model"]["alias"] == "production" and summary["model"]["uri"] == registry.version_uri(
        reg, NAME, 1
    )
    per_class: dict[str, int] = {}
    for row in rows.values():
        per_class[row["class_name"]] = per_class.get(row["class_name"], 0) + 1
    assert summary["per_class"] == per_class and summary["dead_letter"]["count"] == 0
    assert sorted(os.listdir(out)) == sorted(
        [".finetune-stage.json", "config.yaml", "dead_letter.jsonl", "summary.json", *summary["files"]]
    )
    assert outputs.intact(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".predict-staging")]  # staging removed


def test_a_promotion_during_the_run_does_not_change_the_model(reg, colour_images, tmp_path, monkeypatch):
    v1, v2 = (registry.version_uri(reg, NAME, v) for v in (1, 2))
    uris = sorted(glob.glob(os.path.join(colour_images, "*", "*.jpg")))
    expected_v1, expected_v2 = _expected(v1, uris), _expected(v2, uris)
    assert any(  # the two versions answer differently, so a mix would show
        abs(expected_v1[u]["probabilities"][0] - expected_v2[u]["probabilities"][0]) > 1e-3 for u in uris
    )
    listed = stage.discover_images

    def promote_then_list(*args, **kwargs):  # runs after the model was resolved, before any image is read
        registry.promote(reg, NAME, "production", 2, reason="a promotion during the run")
        return listed(*args, **kwargs)

    monkeypatch.setattr(stage, "discover_images", promote_then_list)
    out = str(tmp_path / "out")
    try:
        summary = stage.run(_config(reg, f"registry://{NAME}@production", colour_images, out))
    finally:
        monkeypatch.undo()
        assert registry.resolve_alias(reg, NAME, "production") == 2
        registry.rollback(reg, NAME, "production", reason="test done")
    assert summary["model"]["version"] == 1
    rows = _rows(out)
    assert {r["model"]["version"] for r in rows.values()} == {1}
    _assert_rows_match(rows, expected_v1)
    # A pinned version needs no alias at all.
    pinned = stage.run(_config(reg, f"registry://{NAME}/2", colour_images, str(tmp_path / "pinned")))
    assert pinned["model"]["version"] == 2 and pinned["model"]["alias"] == ""
    _assert_rows_match(_rows(str(tmp_path / "pinned")), expected_v2)


def _bad_inputs(root: str, good_from: str) -> dict[str, str]:
    """A folder of good and bad files; returns uri -> the expected dead-letter reason."""
    os.makedirs(root)
    for path in sorted(glob.glob(os.path.join(good_from, "*", "*.jpg")))[:6]:
        shutil.copy(path, root)
    good = open(glob.glob(os.path.join(root, "*.jpg"))[0], "rb").read()
    files = {
        "empty.jpg": (b"", "empty_file"),
        "notes.txt": (b"not an image at all", "not_an_image"),
        "truncated.jpg": (
            good[: len(good) // 3],
            "corrupt_image",
        ),  # the header passes; the model cannot decode it
        "huge.jpg": (good + b"\0" * (2 * 2**20), "file_too_large"),  # over max_file_mb=1
    }
    bad = {}
    for name, (data, reason) in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        bad[os.path.join(root, name)] = reason
    Image.new("RGB", (8, 8), "red").save(os.path.join(root, "tiny.png"))
    bad[os.path.join(root, "tiny.png")] = "too_small"
    Image.new("L", (1200, 1200)).save(os.path.join(root, "big.png"))  # 1200x1200x4 bytes > 1 MiB decoded
    bad[os.path.join(root, "big.png")] = "too_large"
    Image.new("RGB", (64, 64), "blue").save(os.path.join(root, "image.tiff"))
    bad[os.path.join(root, "image.tiff")] = "unsupported_format"
    os.mkfifo(os.path.join(root, "pipe.jpg"))
    bad[os.path.join(root, "pipe.jpg")] = "not_a_file"
    return bad


def test_bad_files_are_dead_letters_with_preprocessings_reasons(reg, colour_images, tmp_path):
    source = str(tmp_path / "mixed")
    bad = _bad_inputs(source, colour_images)
    out = str(tmp_path / "out")
    limits = ("preprocess.max_file_mb=1", "preprocess.max_decoded_mb=1", "preprocess.min_image_size=16")
    with pytest.raises(StageError, match="predict.max_bad_fraction"):  # 8 of 14 bad > 10%
        stage.run(_config(reg, f"registry://{NAME}/1", source, out, *limits))
    summary = json.loads(storage.read_text(os.path.join(out, "summary.json")))  # published all the same
    dead = _dead_letters(out)
    assert {uri: d["reason"] for uri, d in dead.items()} == bad
    assert "Invalid JPEG data" in dead[os.path.join(source, "truncated.jpg")]["detail"]
    assert dead[os.path.join(source, "truncated.jpg")]["stage"] == graph.STEP_INFER
    rows = _rows(out)
    good = sorted(p for p in glob.glob(os.path.join(source, "*")) if p not in bad)
    _assert_rows_match(rows, _expected(registry.version_uri(reg, NAME, 1), good))
    assert summary["status"] == "failed" and summary["inputs"] == len(good) + len(bad)
    assert summary["predictions"] + summary["dead_letter"]["count"] == summary["inputs"]  # nothing lost
    # With the limit raised the same run succeeds.
    again = stage.run(
        _config(reg, f"registry://{NAME}/1", source, out, *limits, "predict.max_bad_fraction=1")
    )
    assert again["status"] == "ok" and again["dead_letter"]["by_reason"]["corrupt_image"] == 1


def test_a_manifest_is_confined_to_its_folder(reg, colour_images, tmp_path):
    folder = tmp_path / "listed"
    shutil.copytree(colour_images, folder)
    images = sorted(glob.glob(str(folder / "*" / "*.jpg")))[:5]
    outside = sorted(glob.glob(os.path.join(colour_images, "*", "*.jpg")))[0]
    manifest = folder / "todo.jsonl"
    lines = [json.dumps({"uri": os.path.relpath(p, folder)}) for p in images]
    lines += [json.dumps({"uri": outside}), "{not json", json.dumps({"label": "no uri"})]
    manifest.write_text("\n".join(lines) + "\n")
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    output = str(tmp_path / "{date}")
    summary = stage.run(
        _config(reg, f"registry://{NAME}/1", str(manifest), output, "predict.max_bad_fraction=1")
    )
    out = summary["output"]  # {date} filled in, UTC (the day the run started)
    assert out == str(tmp_path / started)
    assert summary["layout"] == "manifest" and summary["predictions"] == 5
    assert set(_rows(out)) == set(images)
    reasons = sorted(d["reason"] for d in _dead_letters(out).values())
    assert reasons == ["bad_manifest_row", "bad_manifest_row", "outside_source"]


def test_gcs_input_model_and_output_and_parquet(reg, colour_images, tmp_path, gcs_prefix):
    """Everything on gs:// (the GCS emulator on loopback): the model folder, the images and
    the output; the rows equal a local run's. Then the Parquet format gives the same rows."""
    import pyarrow.parquet as pq

    model_dir = registry.version_uri(reg, NAME, 1)
    storage.copy_tree(model_dir, f"{gcs_prefix}/model")
    picked = sorted(glob.glob(os.path.join(colour_images, "*", "*.jpg")))[::3]
    for path in picked:
        storage.write_bytes(
            f"{gcs_prefix}/images/{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}",
            open(path, "rb").read(),
        )
    out = f"{gcs_prefix}/out"
    summary = stage.run(_config(reg, f"{gcs_prefix}/model", f"{gcs_prefix}/images", out))
    assert summary["predictions"] == len(picked) and summary["model"]["version"] is None
    rows = _rows(out)
    local = {
        f"{gcs_prefix}/images/{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}": want
        for p, want in _expected(model_dir, picked).items()
    }
    _assert_rows_match(rows, local)
    assert {r["model"]["fingerprint"] for r in rows.values()} == {summary["model"]["fingerprint"]}
    assert summary["model"]["fingerprint"].startswith("sha256:")

    parquet_out = str(tmp_path / "parquet")
    result = stage.run(
        _config(reg, f"registry://{NAME}/1", f"{gcs_prefix}/images", parquet_out, "predict.format=parquet")
    )
    assert result["files"] and all(f.endswith(".parquet") for f in result["files"])
    table_rows = [r for f in result["files"] for r in pq.read_table(os.path.join(parquet_out, f)).to_pylist()]
    assert len(table_rows) == len(picked)
    _assert_rows_match({r["uri"]: r for r in table_rows}, local)
    assert table_rows[0]["model"]["version"] == 1


def test_a_folder_holding_a_users_file_is_never_replaced(reg, colour_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        stage.run(_config(reg, f"registry://{NAME}/1", colour_images, str(out)))
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".predict-staging")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("registry://beans@production", ("beans", "production", 0, "")),
        ("registry://beans/12", ("beans", "", 12, "")),
        ("gs://bucket/models/beans/3/", ("", "", 0, "gs://bucket/models/beans/3")),
        ("runs/beans/export/saved_model", ("", "", 0, "runs/beans/export/saved_model")),
    ],
)
def test_model_references(text, expected):
    ref = parse_model_ref(text)
    assert (ref.name, ref.alias, ref.version, ref.uri) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("registry://beans", "registry://NAME@ALIAS"),
        ("registry://Beans@production", "model name 'Beans'"),
        ("registry://beans@Prod", "alias 'Prod'"),
        ("registry://beans/0", "positive integer"),
        ("registry://beans/v2", "positive integer"),
    ],
)
def test_bad_model_references_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_model_ref(text)


def test_output_placeholders():
    now = datetime.datetime(2026, 12, 6, 2, 0, 5, tzinfo=datetime.UTC)
    assert expand_output("gs://b/p/{date}/run-{time}", now) == "gs://b/p/2026-12-06/run-20261206T020005Z"
    assert expand_output("out", now) == "out"
    with pytest.raises(ConfigError, match=r"unknown placeholder \{day\}"):
        load_config(None, ["predict.output=gs://b/{day}"], training=False)


def test_references_that_do_not_resolve_say_where_to_look(reg, tmp_path):
    with pytest.raises(ConfigError, match=r"no alias 'staging'.*production -> 1"):
        stage.run(_config(reg, f"registry://{NAME}@staging", str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="has no version 7"):
        stage.run(_config(reg, f"registry://{NAME}/7", str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="no saved_model.pb"):
        stage.run(_config(reg, str(tmp_path), str(tmp_path), str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="needs registry.uri"):
        load_config(None, ["predict.model=registry://beans@production"], training=False)


def test_the_command_end_to_end_with_progress_and_no_startup_noise(reg, colour_images, tmp_path):
    """``finetune predict`` as a user runs it, not on a terminal: progress lines, the summary,
    exit 0; then the missing-flag and bad-reference errors (exit 2)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env |= {"PYTHONPATH": ROOT, "FINETUNE_PROGRESS_SECONDS": "0.2"}
    command = [sys.executable, "-m", "pipeline.cli", "predict", "--set", f"registry.uri={reg}"]
    out = str(tmp_path / "out")
    done = subprocess.run(
        [*command, "--model", f"registry://{NAME}@production", "--input", colour_images, "--output", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[predict] read 30/30 images (100%), 30 classified, 0 dead letters" in done.stdout
    assert "[predict] ok: 30 predictions" in done.stdout and f"[predict] outputs: {out}" in done.stdout
    for noise in ("oneDNN custom operations", "Resource module is not available", "instance dicts"):
        assert noise not in done.stderr, done.stderr
    assert len(_rows(out)) == 30
    missing = subprocess.run([*command, "--input", colour_images], env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert (
        "predict.model: required (--model" in missing.stderr and "predict.output: required" in missing.stderr
    )
    bad = subprocess.run(
        [*command, "--model", "registry://beans", "--input", "x", "--output", "y"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "registry://NAME@ALIAS" in bad.stderr


def test_prediction_rows_and_tensorflows_reasons():
    inference = {"class_ids": [2, 0], "class_names": ["red", "blue"], "probabilities": [0.7, 0.2]}
    model = {"name": NAME, "version": 3, "fingerprint": "sha256:ab"}
    row = graph.prediction_row("gs://b/x.jpg", inference, model)
    assert row == {
        "uri": "gs://b/x.jpg",
        "class_name": "red",
        "class_id": 2,
        "probability": 0.7,
        "top_k": [
            {"class_name": "red", "class_id": 2, "probability": 0.7},
            {"class_name": "blue", "class_id": 0, "probability": 0.2},
        ],
        "model": model,
    }
    message = (
        "Graph execution error:\n\n<stack traces unavailable>\njpeg::Uncompress failed. Invalid JPEG data or "
        "crop window.\n\t [[{{node map/while/decode_image/DecodeImage}}]] [Op:__inference_signature_wrapper]"
    )
    assert graph._reason(message) == "jpeg::Uncompress failed. Invalid JPEG data or crop window."
