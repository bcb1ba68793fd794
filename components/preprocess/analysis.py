"""The tf.Transform analysis: label vocabulary and per-channel image statistics.

``preprocessing_fn`` is a pure dict -> dict function; Beam only runs it. It is analysed on
the train split alone (so the vocabulary and statistics never see eval or test data). Its
graph is written as ``transform_fn/`` among the preprocessing outputs and is read only by
preprocessing itself: the label vocabulary (the asset ``transform_fn/assets/label``, in
class-id order; :func:`read_vocabulary`) gives the class ids the TFRecords carry and the
class list of ``summary.json``, and the pixel statistics it carries as constants
(:func:`image_statistics`) are recorded there as ``image_stats``. Later stages take the
class list from ``summary.json``; the serving model does not contain this graph (export
builds decoding and the class names into its own).

Image bytes never enter the graph: the analysis needs only the label and the per-image
channel moments that ``DecodeAndValidate`` computed, which keeps the analysis cheap.
"""

from __future__ import annotations

import math

import tensorflow as tf
import tensorflow_transform as tft

from components.core import storage
from components.preprocess.schema import LABEL_VOCABULARY

# The raw features handed to tf.Transform (from DecodeAndValidate).
RAW_FEATURE_SPEC = {
    "label": tf.io.FixedLenFeature([], tf.string),
    "pixel_mean": tf.io.FixedLenFeature([3], tf.float32),
    "pixel_sq_mean": tf.io.FixedLenFeature([3], tf.float32),
}
UNKNOWN_LABEL = -1


def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Maps raw features to the class id plus the dataset statistics.

    Outputs:
        label: index into the vocabulary (most frequent first, ties in reverse byte order);
            -1 for a label absent from the analysed (train) data.
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
        "label": label,
        "image_mean": tf.broadcast_to(tf.reshape(mean, [1, 3]), [rows, 3]),
        "image_std": tf.broadcast_to(tf.reshape(std, [1, 3]), [rows, 3]),
    }


def read_vocabulary(saved_model_dir: str) -> list[str]:
    """The label vocabulary of a written ``transform_fn`` directory, in class-id order.

    Reads through the storage edge, so it works for local paths and gs:// alike; on Beam
    workers (as a side input) and in the driver.
    """
    uri = storage.join(saved_model_dir, "assets", LABEL_VOCABULARY)
    return [line for line in storage.read_text(uri).split("\n") if line]  # one per line, as TFT writes


def image_statistics(transform_output_dir: str) -> dict[str, list[float]] | None:
    """Reads the pixel statistics baked into a written transform graph.

    Args:
        transform_output_dir: The directory holding ``transform_fn/`` (TF file system path).

    Returns:
        ``{"mean": [r, g, b], "std": [r, g, b]}``, or None when no image was analysed.
    """
    output = tft.TFTransformOutput(transform_output_dir)
    probe = {
        "label": tf.constant([""]),
        "pixel_mean": tf.zeros([1, 3]),
        "pixel_sq_mean": tf.zeros([1, 3]),
    }
    features = output.transform_raw_features(probe)
    stats = {key: [float(v) for v in features[f"image_{key}"][0].numpy()] for key in ("mean", "std")}
    return stats if all(math.isfinite(v) for vs in stats.values() for v in vs) else None
