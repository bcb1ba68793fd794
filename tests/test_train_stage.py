"""The training stage in one process: outputs, the cached-feature baseline, resuming."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from components.config import load_config
from components.core.errors import StageError
from components.preprocess import stage as preprocess_stage
from components.train import data, phases, stage
from components.train import model as train_model
from tests.train_helpers import TINY_SIZE, copy_prepared, copy_trained, make_colour_images, train_config


def _load(path: str):
    return train_model.load_model(path, compile=True)


def _eval_images(run_dir: str):
    files = data.record_files(os.path.join(run_dir, "preprocess"), "eval")
    batches = list(data.image_dataset(files, TINY_SIZE, 64))
    return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])


def test_trains_both_phases_and_the_cached_baseline_equals_the_assembled_model(tiny_training):
    # The session's tiny run, trained with train_config(run_dir): read here, never changed.
    run_dir, summary = tiny_training.run_dir, tiny_training.summary
    out = os.path.join(run_dir, "train")
    assert sorted(os.listdir(out)) == [
        ".finetune-stage.json",  # the stage and every file it wrote
        "baseline",
        "candidate",
        "config.yaml",
        "inputs.json",
        "logs",
        "summary.json",
    ]
    marker = json.loads(open(os.path.join(out, ".finetune-stage.json")).read())
    assert marker["stage"] == "train" and marker["files"]["candidate/model.keras"] > 0
    for phase in ("baseline", "candidate"):
        model = open(os.path.join(out, phase, "model.keras"), "rb").read()
        assert summary["models"][f"{phase}/model.keras"]["sha256"] == hashlib.sha256(model).hexdigest()
        assert sorted(os.listdir(os.path.join(out, phase))) == ["history.json", "model.keras", "result.json"]
        assert os.listdir(os.path.join(out, "logs", phase, "train"))
        result = summary[phase]
        assert result["steps"] == result["steps_run"] == result["planned_steps"]
        assert result["planned_steps"] == result["epochs"] * result["steps_per_epoch"]
        assert result["eval"]["examples"] == summary["records"]["eval"] == 14
        assert result["images_per_second"] > 0
    assert (summary["strategy"], summary["replicas"], summary["global_batch_size"]) == ("default", 1, 8)
    assert summary["baseline"]["steps_per_epoch"] == 53 // 8
    assert json.loads(open(os.path.join(out, "summary.json")).read()) == summary
    assert "candidate: fine-tuning from layer block_13_expand" in tiny_training.printed
    assert summary["image_cache"] == "decoded"  # 67 images of 32 px: far below train.image_cache_mb
    assert "input: decoded images kept in memory (0 MiB per worker)" in tiny_training.printed

    # The baseline's eval metrics were computed by the head on cached features; the saved,
    # assembled model (preprocess -> backbone -> pool -> head) must give the same on images.
    baseline = _load(os.path.join(out, "baseline", "model.keras"))
    images, labels = _eval_images(run_dir)
    probs = baseline.predict(images, verbose=0)
    features = tf_keras.Model(baseline.input, baseline.get_layer("pool").output).predict(images, verbose=0)
    np.testing.assert_allclose(baseline.get_layer("head").predict(features, verbose=0), probs, atol=1e-6)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)).mean())
    assert accuracy == pytest.approx(summary["baseline"]["eval"]["accuracy"], abs=1e-6)
    assert loss == pytest.approx(summary["baseline"]["eval"]["loss"], abs=1e-4)

    # The candidate differs from the baseline only where it was allowed to train.
    candidate = _load(os.path.join(out, "candidate", "model.keras"))
    frozen = candidate.get_layer("backbone").get_layer("Conv1")
    np.testing.assert_array_equal(
        frozen.get_weights()[0], baseline.get_layer("backbone").get_layer("Conv1").get_weights()[0]
    )
    top = candidate.get_layer("backbone").get_layer("Conv_1")
    assert not np.array_equal(
        top.get_weights()[0], baseline.get_layer("backbone").get_layer("Conv_1").get_weights()[0]
    )
    assert not np.array_equal(candidate.get_layer("backbone").get_layer("Conv_1_bn").get_weights()[0], 0)
    np.testing.assert_array_equal(
        candidate.get_layer("backbone").get_layer("Conv_1_bn").get_weights()[2],  # moving mean: frozen
        baseline.get_layer("backbone").get_layer("Conv_1_bn").get_weights()[2],
    )


def test_an_unfinished_run_resumes_and_a_finished_or_changed_one_starts_over(tiny_training, tmp_path, capsys):
    # A copy of the session's tiny run, trained with train_config(run_dir) as if here.
    run_dir = copy_trained(tiny_training.run_dir, str(tmp_path / "run"))
    first = tiny_training.summary
    out = os.path.join(run_dir, "train")
    # Interrupted after the baseline: the summary and the candidate are not there yet.
    os.remove(os.path.join(out, "summary.json"))
    os.remove(os.path.join(out, "candidate", "result.json"))
    resumed = stage.run(train_config(run_dir))
    printed = capsys.readouterr().out
    assert (
        "resuming the unfinished run" in printed
        and "baseline: already trained in this run directory" in printed
    )
    assert resumed["baseline"] == first["baseline"]
    assert resumed["candidate"]["steps"] == resumed["candidate"]["planned_steps"]

    again = stage.run(train_config(run_dir))
    assert "replacing the finished run" in capsys.readouterr().out
    assert again["baseline"]["steps"] == again["baseline"]["planned_steps"]

    os.remove(os.path.join(out, "summary.json"))
    stage.run(train_config(run_dir, "train.baseline_epochs=1"))
    assert "had another configuration; starting over" in capsys.readouterr().out


def test_an_unfinished_run_on_tfrecords_preprocessed_again_starts_over(tiny_training, tmp_path, capsys):
    # Killed in the candidate phase; then new images came and preprocessing ran again. The
    # baseline on disk was trained on the old records: loading it would let the gate compare
    # a candidate against a baseline of other data.
    run_dir = copy_trained(tiny_training.run_dir, str(tmp_path / "run"))
    out = os.path.join(run_dir, "train")
    os.remove(os.path.join(out, "summary.json"))
    os.remove(os.path.join(out, "candidate", "result.json"))
    images = str(tmp_path / "more_images")
    make_colour_images(images, per_class=36, seed=1)
    settings = [f"data.source={images}", f"run_dir={run_dir}", f"model.image_size={TINY_SIZE}"]
    settings += ["data.split={train: 0.6, eval: 0.2, test: 0.2}", "preprocess.num_workers=1"]
    preprocess_stage.run(load_config(None, [*settings, "preprocess.num_shards=2"]))
    capsys.readouterr()

    trained = stage.run(train_config(run_dir))
    printed = capsys.readouterr().out
    assert "had other TFRecords (preprocessing ran again since); starting over" in printed
    assert "baseline: already trained" not in printed
    first = tiny_training.summary
    assert trained["records"]["train"] > first["records"]["train"]
    assert trained["baseline"]["weights_sha256"] != first["baseline"]["weights_sha256"]
    recorded = json.loads(open(os.path.join(out, "inputs.json")).read())["preprocess_shards_sha256"]
    assert trained["inputs_sha256"] == recorded != first["inputs_sha256"]


def test_missing_or_mismatched_preprocessing_fails_clearly(tiny_prepared, tmp_path):
    with pytest.raises(StageError, match="run `finetune preprocess` with this config first"):
        stage.read_inputs(train_config(str(tmp_path / "empty")))
    run_dir = copy_prepared(tiny_prepared, str(tmp_path / "run"))
    with pytest.raises(StageError, match="hold 32 px images but model.image_size resolves to 64"):
        stage.read_inputs(train_config(run_dir, "model.image_size=64"))


def test_backups_skip_only_the_last_epoch_end_which_fit_would_delete(tmp_path):
    keras_model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    keras_model.compile("sgd", "mse")
    backup_dir = str(tmp_path / "backup")
    latest = []

    class Probe(tf_keras.callbacks.Callback):  # after the backup callback, as in the stage
        def on_epoch_end(self, epoch, logs=None):
            path = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
            latest.append(os.path.basename(path) if path else None)

    backup = phases.Backup(backup_dir, "epoch", 3)
    assert [backup.backs_up_after(epoch) for epoch in range(3)] == [True, True, False]
    callbacks = [backup, Probe()]
    keras_model.fit(np.ones((8, 3)), np.ones((8, 2)), epochs=3, batch_size=4, verbose=0, callbacks=callbacks)
    assert latest == ["ckpt-1", "ckpt-2", "ckpt-2"]  # epochs 1 and 2 backed up, not the 3rd
    assert not os.path.exists(os.path.join(backup_dir, "chief"))  # fit deleted it on return
