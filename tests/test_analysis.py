"""tf.Transform unit test of preprocessing_fn on a few in-memory rows."""

import os

import numpy as np
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from components.preprocess.analysis import RAW_FEATURE_SPEC, UNKNOWN_LABEL, image_statistics, preprocessing_fn


def _row(label, mean, sq):
    return {
        "label": label,
        "pixel_mean": np.array(mean, np.float32),
        "pixel_sq_mean": np.array(sq, np.float32),
    }


def test_vocabulary_and_channel_statistics(tmp_path):
    train = [
        _row("cat", [10, 20, 30], [200, 500, 1000]),
        _row("dog", [30, 40, 50], [1000, 1700, 2600]),
        _row("cat", [20, 30, 40], [500, 1000, 1700]),
    ]
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC))
    out = str(tmp_path / "out")
    with tft_beam.Context(temp_dir=str(tmp_path / "tmp"), force_tf_compat_v1=False):
        (transformed, _), transform_fn = (train, metadata) | tft_beam.AnalyzeAndTransformDataset(
            preprocessing_fn
        )
        test = [_row("bird", [0, 0, 0], [0, 0, 0]), _row("dog", [0, 0, 0], [0, 0, 0])]
        test_out, _ = ((test, metadata), transform_fn) | tft_beam.TransformDataset()
        _ = transform_fn | tft_beam.WriteTransformFn(out)
    assert [int(r["label"]) for r in transformed] == [0, 1, 0]  # most frequent first
    np.testing.assert_allclose(transformed[0]["image_mean"], [20, 30, 40], rtol=1e-6)
    expected_std = np.sqrt(np.array([1700 / 3, 3200 / 3, 5300 / 3]) - np.array([20, 30, 40]) ** 2)
    np.testing.assert_allclose(transformed[2]["image_std"], expected_std, rtol=1e-5)
    assert [int(r["label"]) for r in test_out] == [UNKNOWN_LABEL, 1]
    np.testing.assert_allclose(test_out[0]["image_mean"], [20, 30, 40], rtol=1e-6)

    with open(os.path.join(out, "transform_fn", "assets", "label")) as f:
        assert f.read().split() == ["cat", "dog"]
    stats = image_statistics(out)
    np.testing.assert_allclose(stats["mean"], [20, 30, 40], rtol=1e-6)
    np.testing.assert_allclose(stats["std"], expected_std, rtol=1e-5)
