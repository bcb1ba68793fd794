"""The tf.Transform analysis: label vocabulary and per-channel image statistics.

``preprocessing_fn`` is a pure dict -> dict function; Beam only runs it. It is analysed on
the train split alone (so the vocabulary and statistics never see eval or test data) and
applied to every split. Its graph, written as ``transform_fn/``, is what later stages attach
to the serving model to map class ids back to names.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft

from components.preprocess.schema import LABEL_VOCABULARY

# The raw features handed to tf.Transform (built by DecodeAndValidate).
RAW_FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.string),
    "uri": tf.io.FixedLenFeature([], tf.string),
    "pixel_mean": tf.io.FixedLenFeature([3], tf.float32),
    "pixel_sq_mean": tf.io.FixedLenFeature([3], tf.float32),
}
UNKNOWN_LABEL = -1


def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Maps raw features to the record features plus the dataset statistics.

    Outputs:
        image, uri, label_name: passed through unchanged.
        label: index into the vocabulary (most frequent first); -1 for a label absent from
            the analysed (train) data.
        image_mean, image_std: the per-channel pixel mean and standard deviation (0-255) of
            the analysed images, the same for every row. Exact: every image has the same
            size, so the mean of per-image means is the mean over all pixels.
    """
    label = tft.compute_and_apply_vocabulary(
        inputs["label"], default_value=UNKNOWN_LABEL, vocab_filename=LABEL_VOCABULARY
    )
    mean = tft.mean(inputs["pixel_mean"], reduce_instance_dims=False)
    sq_mean = tft.mean(inputs["pixel_sq_mean"], reduce_instance_dims=False)
    std = tf.sqrt(tf.maximum(sq_mean - tf.square(mean), 0.0))
    rows = tf.shape(inputs["label"])[0]
    return {
        "image": inputs["image"],
        "uri": inputs["uri"],
        "label_name": inputs["label"],
        "label": label,
        "image_mean": tf.broadcast_to(tf.reshape(mean, [1, 3]), [rows, 3]),
        "image_std": tf.broadcast_to(tf.reshape(std, [1, 3]), [rows, 3]),
    }
