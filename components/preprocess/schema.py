"""What the TFRecords hold: one definition for the writer here and every reader later.

Images are stored encoded (JPEG at ``model.image_size``), not as float pixels: a
224x224 example is ~20 KB instead of 600 KB, and decoding happens on the trainer.
"""

from __future__ import annotations

import struct

import google_crc32c
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
    # deterministic: map entries in key order, so the same record is always the same bytes
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(
        deterministic=True
    )


def shard_of(sha256: str, num_shards: int) -> int:
    """The shard an image's record goes to, from its content hash: the same image always lands
    in the same shard, whatever else is in the run."""
    return int(sha256[:16], 16) % num_shards


def shard_name(index: int, num_shards: int) -> str:
    """``data-00001-of-00004.tfrecord``: Beam's shard naming, which readers glob for."""
    return f"data-{index:05d}-of-{num_shards:05d}{TFRECORD_SUFFIX}"


def frame_record(data: bytes) -> bytes:
    """One record in the TFRecord file format: length, masked CRC-32C of the length, the
    bytes, masked CRC-32C of the bytes (as ``tf.io.TFRecordWriter`` writes them)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses serialized records (scalar or batch) with :data:`RECORD_FEATURE_SPEC`."""
    return tf.io.parse_example(serialized, RECORD_FEATURE_SPEC)
