"""What the TFRecords hold: one definition for the writer here and every reader later.

Images are stored encoded (JPEG at ``model.image_size``), not as float pixels: a
224x224 example is ~20 KB instead of 600 KB, and decoding happens on the trainer.
"""

from __future__ import annotations

import tensorflow as tf

# Written by the preprocessing stage, read by the trainer and the evaluator.
RECORD_FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),  # JPEG bytes, RGB, image_size x image_size
    "label": tf.io.FixedLenFeature([], tf.int64),  # index into the label vocabulary
    "label_name": tf.io.FixedLenFeature([], tf.string),
    "uri": tf.io.FixedLenFeature([], tf.string),  # where the original image came from
}
# Name of the label vocabulary asset in transform_fn/assets/.
LABEL_VOCABULARY = "label"
TFRECORD_SUFFIX = ".tfrecord"


def encode_example(image: bytes, label: int, label_name: str, uri: str) -> bytes:
    """Serializes one record as a ``tf.train.Example`` matching :data:`RECORD_FEATURE_SPEC`."""

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "image": _bytes(image),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "label_name": _bytes(label_name.encode("utf-8")),
        "uri": _bytes(uri.encode("utf-8")),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses serialized records (scalar or batch) with :data:`RECORD_FEATURE_SPEC`."""
    return tf.io.parse_example(serialized, RECORD_FEATURE_SPEC)
