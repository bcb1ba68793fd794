"""Preprocessing: Apache Beam + tf.Transform from images to sharded TFRecords, dead letters and a summary."""
