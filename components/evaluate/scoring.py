"""Scoring models on the test split: the same examples, in the same order, for every model.

The test TFRecords are read once, in file order; each batch goes to every model, so their
per-example results are paired (what the gate's paired test needs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from components.evaluate.metrics import Predictions
from components.preprocess import schema

# A scorer gets (pixels: float32 batch x size x size x 3, serialized examples) -> probabilities.
Scorer = Callable[[tf.Tensor, tf.Tensor], np.ndarray]


@dataclass
class Scored:
    """Every model's probabilities on the test split, paired by example order, and the
    candidate's mistakes (with their JPEG bytes, for the report's thumbnails)."""

    labels: np.ndarray
    probs: dict[str, np.ndarray]
    uris: list[str] = field(default_factory=list)
    misclassified: list[dict[str, Any]] = field(default_factory=list)

    def predictions(self, name: str) -> Predictions:
        return Predictions(self.probs[name], self.labels)


def keras_scorer(keras_model: Any) -> Scorer:
    """A tf_keras classifier on pixels, traced once for any batch size."""
    predict = tf.function(
        lambda x: tf.cast(keras_model(x, training=False), tf.float32), reduce_retracing=True
    )
    return lambda pixels, examples: predict(pixels).numpy()


def signature_scorer(signature: Any) -> Scorer:
    """An exported model's ``serving_examples`` signature on the serialized records."""
    return lambda pixels, examples: signature(examples=examples)["probabilities"].numpy()


def batches(files: list[str], image_size: int, batch_size: int) -> Iterator[dict[str, tf.Tensor]]:
    """The test records in file order: ``examples`` (serialized), ``pixels`` (as the trainer
    decodes them), ``label``, ``uri`` and ``image`` (the stored JPEG bytes)."""
    spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
    decode = tf.function(
        lambda jpegs: tf.map_fn(
            lambda j: tf.cast(tf.io.decode_jpeg(j, channels=3), tf.float32), jpegs, fn_output_signature=spec
        )
    )
    for serialized in tf.data.TFRecordDataset(files).batch(batch_size):
        parsed = schema.parse_example(serialized)
        yield {**parsed, "examples": serialized, "pixels": decode(parsed["image"])}


def score(
    scorers: dict[str, Scorer],
    files: list[str],
    image_size: int,
    batch_size: int,
    classes: list[str],
    misclassified_limit: int = 0,
) -> Scored:
    """Runs every scorer on every test batch; keeps up to ``misclassified_limit`` of the
    ``candidate`` scorer's mistakes."""
    probs: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    labels, uris, mistakes = [], [], []
    for batch in batches(files, image_size, batch_size):
        batch_labels = batch["label"].numpy()
        for name, scorer in scorers.items():
            probs[name].append(scorer(batch["pixels"], batch["examples"]))
        if "candidate" in scorers:
            p = probs["candidate"][-1]
            for i in np.flatnonzero(p.argmax(axis=1) != batch_labels)[: misclassified_limit - len(mistakes)]:
                mistakes.append(
                    {
                        "uri": batch["uri"][i].numpy().decode("utf-8"),
                        "true": classes[batch_labels[i]],
                        "predicted": classes[int(p[i].argmax())],
                        "confidence": float(p[i].max()),
                        "jpeg": batch["image"][i].numpy(),
                    }
                )
        labels.append(batch_labels)
        uris.extend(u.decode("utf-8") for u in batch["uri"].numpy())
    if not labels:
        return Scored(np.zeros(0, np.int64), {n: np.zeros((0, len(classes))) for n in scorers})
    return Scored(np.concatenate(labels), {n: np.concatenate(p) for n, p in probs.items()}, uris, mistakes)


def latency_ms(function: Callable[[], Any], runs: int = 7) -> float:
    """Median wall time of ``function()`` in milliseconds, after two warm-up calls.

    Measured in this process, so with its TensorFlow settings: with oneDNN on (the package's
    default) a one-image call of MobileNetV2 on an AVX2 CPU is many times slower than with
    ``TF_ENABLE_ONEDNN_OPTS=0``, while batches of 2 and more are faster with it.
    """
    for _ in range(2):
        function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)
