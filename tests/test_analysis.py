"""tf.Transform unit test of preprocessing_fn on a few in-memory rows."""

import numpy as np
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from components.preprocess.analysis import RAW_FEATURE_SPEC, UNKNOWN_LABEL, preprocessing_fn


def _row(label, mean, sq):
    return {"image": b"jpeg-bytes-" + label.encode(), "label": label, "uri": f"{label}.jpg",
            "pixel_mean": np.array(mean, np.float32), "pixel_sq_mean": np.array(sq, np.float32)}


def test_vocabulary_and_channel_statistics(tmp_path):
    train = [_row("cat", [10, 20, 30], [200, 500, 1000]), _row("dog", [30, 40, 50], [1000, 1700, 2600]),
             _row("cat", [20, 30, 40], [500, 1000, 1700])]
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC))
    with tft_beam.Context(temp_dir=str(tmp_path), force_tf_compat_v1=False):
        (transformed, _), transform_fn = (train, metadata) | tft_beam.AnalyzeAndTransformDataset(preprocessing_fn)
        test = [_row("bird", [0, 0, 0], [0, 0, 0]), _row("dog", [0, 0, 0], [0, 0, 0])]
        test_out, _ = ((test, metadata), transform_fn) | tft_beam.TransformDataset()
    assert [int(r["label"]) for r in transformed] == [0, 1, 0]  # most frequent first
    assert [r["label_name"] for r in transformed] == [b"cat", b"dog", b"cat"]
    assert transformed[1]["image"] == b"jpeg-bytes-dog"
    np.testing.assert_allclose(transformed[0]["image_mean"], [20, 30, 40], rtol=1e-6)
    expected_std = np.sqrt(np.array([1700 / 3, 3200 / 3, 5300 / 3]) - np.array([20, 30, 40]) ** 2)
    np.testing.assert_allclose(transformed[2]["image_std"], expected_std, rtol=1e-5)
    assert [int(r["label"]) for r in test_out] == [UNKNOWN_LABEL, 1]
    np.testing.assert_allclose(test_out[0]["image_mean"], [20, 30, 40], rtol=1e-6)
