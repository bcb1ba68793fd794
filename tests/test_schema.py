"""The TFRecord writing rules of the preprocessing stage: framing and shard placement."""

from __future__ import annotations

import hashlib
import os

import tensorflow as tf

from components.preprocess import schema


def test_frame_record_is_byte_identical_to_tensorflows_writer(tmp_path):
    records = [
        b"",
        b"x",
        os.urandom(70_000),
        schema.encode_example(b"\xff\xd8jpeg", 2, "healthy", "gs://b/a.jpg"),
    ]
    ours = tmp_path / "ours.tfrecord"
    ours.write_bytes(b"".join(schema.frame_record(r) for r in records))
    theirs = tmp_path / "theirs.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for r in records:
            writer.write(r)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == records


def test_shards_come_from_the_content_hash_and_spread_evenly():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    placed = [schema.shard_of(h, 4) for h in hashes]
    assert placed == [schema.shard_of(h, 4) for h in hashes]  # a pure function of the hash
    counts = [placed.count(i) for i in range(4)]
    assert all(900 < c < 1100 for c in counts), counts
    assert schema.shard_name(1, 4) == "data-00001-of-00004.tfrecord"
