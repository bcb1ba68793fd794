"""The backbone table: every entry builds, options are checked, and each phase trains the
right layers (BatchNorm never)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tf_keras

from components import backbones
from components.config import load_config
from components.core.errors import ConfigError
from components.train import model
from tests.train_helpers import MOBILENET_V2_035


def _batchnorm(layer) -> bool:
    return isinstance(layer, tf_keras.layers.BatchNormalization)


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_builds_and_each_phase_trains_the_right_layers(name):
    entry = backbones.BACKBONES[name]
    clf = model.build_classifier(name, entry.min_size, 3, weights="none", alpha=1.0, dropout=0.1)
    assert clf.model.output_shape == (None, 3)
    assert clf.model.get_layer("backbone") is clf.backbone
    images = (
        np.random.default_rng(0).uniform(0, 255, (2, entry.min_size, entry.min_size, 3)).astype("float32")
    )
    probs = clf.model.predict(images, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    # Baseline: only the head (dense kernel + bias) trains.
    assert [w.name.split("/")[-1] for w in clf.model.trainable_weights] == ["kernel:0", "bias:0"]
    assert not any(layer.trainable for layer in clf.backbone.layers)

    # Candidate: the backbone from its default layer up, BatchNorm excluded, plus the head.
    info = model.unfreeze_top(clf, name, "")
    names = [layer.name for layer in clf.backbone.layers]
    start = names.index(entry.unfreeze_from)
    assert info["from_layer"] == entry.unfreeze_from
    for i, layer in enumerate(clf.backbone.layers):
        assert layer.trainable == (i >= start and not _batchnorm(layer)), layer.name
    assert 0 < info["trainable_layers"] < len([lyr for lyr in clf.backbone.layers if lyr.weights])
    assert info["frozen_batchnorm"] == sum(_batchnorm(layer) for layer in clf.backbone.layers)
    trainable = {id(w) for w in clf.model.trainable_weights}
    assert all(
        id(w) not in trainable for layer in clf.backbone.layers if _batchnorm(layer) for w in layer.weights
    )
    assert any(id(w) in trainable for w in clf.head.weights)


def test_preprocess_layer_is_the_backbones_own_preprocess_input():
    x = np.linspace(0, 255, 2 * 8 * 8 * 3, dtype="float32").reshape(2, 8, 8, 3)
    for name, expected in (
        ("mobilenet_v2", x / 127.5 - 1.0),  # 'tf' mode: [-1, 1]
        ("resnet50", x[..., ::-1] - np.array([103.939, 116.779, 123.68], dtype="float32")),  # caffe: BGR
    ):
        out = model.BackbonePreprocess(name)(x).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_unfreeze_accepts_a_fraction_or_a_layer_name():
    names = [f"layer_{i}" for i in range(10)]
    assert backbones.unfreeze_index(names, "0.3", "layer_5") == 7
    assert backbones.unfreeze_index(names, "1.0", "layer_5") == 0
    assert backbones.unfreeze_index(names, "layer_2", "layer_5") == 2
    assert backbones.unfreeze_index(names, "", "layer_5") == 5
    with pytest.raises(ConfigError, match="no layer 'layer_22'.*did you mean 'layer_2'"):
        backbones.unfreeze_index(names, "layer_22", "layer_5")
    with pytest.raises(ConfigError, match="fraction 1.5"):
        backbones.unfreeze_index(names, "1.5", "layer_5")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backbone=vgg16", "model.alpha=0.5"], "vgg16 has no width multiplier"),
        (["model.alpha=0.3"], "ImageNet weights for mobilenet_v2 exist only for alpha in 0.35, 0.5"),
        (["model.backbone=mobilenet_v3_small", "model.alpha=0.35"], "alpha in 0.75, 1.0"),
        (["model.backbone=resnet50", "model.image_size=16"], "16 is below the minimum of 32"),
        (["model.dropout=1.0"], "model.dropout"),
        (["train.unfreeze=2.5"], "fraction 2.5"),
        (["train.mixed_precision=sometimes"], "train.mixed_precision: 'sometimes' must be one of auto"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.augment.rotation=0.9"], "train.augment.rotation"),
    ],
)
def test_inconsistent_model_options_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.source=/d", "run_dir=/r", *overrides])


def test_any_alpha_builds_without_imagenet_weights():
    config = load_config(None, ["data.source=/d", "run_dir=/r", "model.alpha=0.3", "model.weights=none"])
    assert config.model.alpha == 0.3


def test_a_missing_or_mismatched_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        backbones.build_backbone("mobilenet_v2", 32, weights=str(tmp_path / "nope.h5"), alpha=0.35)
    other = tf_keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.5
    )
    path = str(tmp_path / "alpha05.h5")
    other.save_weights(path)
    with pytest.raises(
        ConfigError, match="cannot load .*alpha 0.35.*check\\s+model.backbone and model.alpha"
    ):
        backbones.build_backbone("mobilenet_v2", 32, weights=path, alpha=0.35)


def _same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


@pytest.mark.gcs
def test_weights_from_a_gs_uri(gcs_prefix, tmp_path):
    from components.core import storage

    source = tf_keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35
    )
    local = str(tmp_path / "weights.h5")
    source.save_weights(local)
    uri = storage.join(gcs_prefix, "weights", "mobilenet_v2_035.h5")
    storage.write_bytes(uri, open(local, "rb").read())
    loaded = backbones.build_backbone("mobilenet_v2", 32, weights=uri, alpha=0.35)
    assert _same_weights(loaded, source)


@pytest.mark.skipif(not os.path.isfile(MOBILENET_V2_035), reason=f"weights not found at {MOBILENET_V2_035}")
def test_imagenet_weights_come_from_the_keras_cache_without_a_download(tmp_path, monkeypatch):
    """`weights: imagenet` is Keras's own path: with the file in ~/.keras/models (as a
    machine that downloaded it once has), nothing is fetched."""
    models = tmp_path / ".keras" / "models"
    models.mkdir(parents=True)
    shutil.copy(MOBILENET_V2_035, models / os.path.basename(MOBILENET_V2_035))
    monkeypatch.setenv("HOME", str(tmp_path))
    from_cache = backbones.build_backbone("mobilenet_v2", 224, weights="imagenet", alpha=0.35)
    from_path = backbones.build_backbone("mobilenet_v2", 224, weights=MOBILENET_V2_035, alpha=0.35)
    assert _same_weights(from_cache, from_path)
    random = backbones.build_backbone("mobilenet_v2", 224, weights="none", alpha=0.35)
    assert not _same_weights(random, from_path)


def test_cosine_schedule_decays_to_zero_over_the_planned_steps_and_constant_stays():
    cosine = model.learning_rate_schedule(1e-4, "cosine", 100)
    at = [float(cosine(step)) for step in (0, 50, 100, 150)]
    assert at[0] == pytest.approx(1e-4) and at[1] == pytest.approx(5e-5, rel=1e-5)
    assert at[2] == pytest.approx(0.0, abs=1e-12) and at[3] == pytest.approx(0.0, abs=1e-12)
    assert model.learning_rate_schedule(1e-4, "constant", 100) == 1e-4
