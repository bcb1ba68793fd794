"""The hermetic export: a SavedModel that takes raw image bytes, and a TFLite model.

Everything a client needs lives inside the graph: decoding (JPEG, PNG, GIF's first frame,
BMP) and resizing to the trained size by the preprocessing stage's rules (EXIF orientation,
transparency on white, a large JPEG's DCT scale: :mod:`components.evaluate.decode`), the
backbone's ``preprocess_input`` (a layer of the model) and the label vocabulary. Two
signatures:

* ``serving_default``: ``images`` (a batch of encoded image bytes, tf.string) ->
  ``probabilities`` (float32, batch x classes), ``class_ids`` (int64, batch x k) and
  ``class_names`` (string, batch x k), the top k classes, most probable first.
* ``serving_examples``: ``examples`` (serialized tf.Example records as the preprocessing
  stage writes them) -> the same outputs.

``assets.extra/`` (which TF Serving ignores) records what produced the model:
``config.yaml``, ``verdict.json``, ``labels.txt`` and ``fingerprint.json``. Files are
published with ``saved_model.pb`` last: a server watching the folder never loads a half
written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from components.core import scratch, storage
from components.evaluate.decode import decode_images
from components.preprocess import schema

SAVED_MODEL_PB = "saved_model.pb"
EXTRA = "assets.extra"
LABELS_FILE = "labels.txt"
SERVING_DEFAULT = "serving_default"
SERVING_EXAMPLES = "serving_examples"


class ServingModule(tf.Module):
    """The classifier with decoding and the vocabulary in the graph (see module docstring)."""

    def __init__(self, keras_model: Any, classes: list[str], image_size: int, top_k: int):
        super().__init__(name="serving")
        # Only the weights are tracked, not the Keras object graph: saving walks every
        # tracked object, which for a Keras model takes many times longer and adds nothing a
        # server uses. A plain function attribute is not tracked.
        self._predict = lambda pixels: keras_model(pixels, training=False)
        self.model_variables = list(keras_model.weights)
        self.image_size = image_size
        self.top_k = min(top_k or len(classes), len(classes))
        self.labels = tf.Variable(classes, dtype=tf.string, trainable=False, name="labels")

    def _outputs(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(self._predict(pixels), tf.float32)
        top = tf.math.top_k(probabilities, k=self.top_k)
        class_ids = tf.cast(top.indices, tf.int64)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(self.labels, class_ids),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._outputs(decode_images(images, self.image_size))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        image = tf.io.parse_example(examples, {"image": schema.RECORD_FEATURE_SPEC["image"]})["image"]
        return self.serve_images(image)


@contextlib.contextmanager
def staged(keras_model: Any, classes: list[str], image_size: int, top_k: int) -> Iterator[str]:
    """Saves the serving SavedModel into a local temporary folder, removed on exit, so it can
    be loaded and checked before :func:`publish` makes it visible."""
    module = ServingModule(keras_model, classes, image_size, top_k)
    tmp = scratch.mkdtemp("export")
    try:
        local = os.path.join(tmp, "saved_model")
        signatures = {
            SERVING_DEFAULT: module.serve_images.get_concrete_function(),
            SERVING_EXAMPLES: module.serve_examples.get_concrete_function(),
        }
        tf.saved_model.save(module, local, signatures=signatures)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(local: str, target: str, classes: list[str], extra: dict[str, str]) -> int:
    """Adds ``assets.extra/`` to a staged SavedModel and copies it to ``target`` (local or
    gs://, replacing what was there) with ``saved_model.pb`` last.

    Args:
        extra: File name -> text for ``assets.extra/`` (``labels.txt`` is added here).

    Returns:
        The SavedModel's size in bytes.
    """
    os.makedirs(os.path.join(local, EXTRA), exist_ok=True)
    for name, text in {**extra, LABELS_FILE: "\n".join(classes) + "\n"}.items():
        with open(os.path.join(local, EXTRA, name), "w", encoding="utf-8") as f:
            f.write(text)
    size = directory_size(local)
    held = scratch.mkdtemp("pb")
    graph = os.path.join(held, SAVED_MODEL_PB)
    try:
        shutil.move(os.path.join(local, SAVED_MODEL_PB), graph)
        storage.delete_tree(target)
        storage.copy_tree(local, target)
        with open(graph, "rb") as f:
            storage.write_bytes(storage.join(target, SAVED_MODEL_PB), f.read())
    finally:
        shutil.move(graph, os.path.join(local, SAVED_MODEL_PB))
        shutil.rmtree(held, ignore_errors=True)
    return size


def content_fingerprint(saved_model_dir: str) -> str:
    """``sha256:<hex>`` over every file of a local SavedModel folder (relative names and
    bytes): the export's identity, recorded in the verdict and checked by push and the registry."""
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(saved_model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, saved_model_dir).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def directory_size(path: str) -> int:
    """Total bytes of the files under a local directory."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


QUANTIZATION = {
    "none": [],
    "dynamic": [tf.lite.Optimize.DEFAULT],
    "float16": [tf.lite.Optimize.DEFAULT],
}


def convert_tflite(keras_model: Any, image_size: int, quantization: str) -> bytes:
    """The classifier as a TFLite flatbuffer: float32 RGB 0-255 pixels in (decoding is the
    app's job on a device), probabilities out. ``dynamic`` stores weights as int8,
    ``float16`` as float16; ``none`` keeps float32."""
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")
    function = tf.function(lambda image: {"probabilities": keras_model(image, training=False)})
    concrete = function.get_concrete_function(spec)
    # The converter saves the trackable it is given as a temporary SavedModel. Handing it the
    # Keras model makes it walk every layer's attributes, which is slow; a module holding only
    # the variables the function reads gives the same flatbuffer in a fraction of the time.
    variables = tf.Module()
    variables.weights = list(keras_model.weights)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], variables)
    converter.optimizations = QUANTIZATION[quantization]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


class TFLiteClassifier:
    """Runs a TFLite classifier on batches of pixels (for its test accuracy and latency)."""

    def __init__(self, model: bytes):
        with warnings.catch_warnings():
            # TF 2.21 still ships tf.lite.Interpreter but warns that ai_edge_litert's (another
            # dependency) will replace it; the warning is noise on every evaluate run.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            self._interpreter = tf.lite.Interpreter(model_content=model, num_threads=os.cpu_count())
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = -1

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) != self._batch:
            self._interpreter.resize_tensor_input(self._input, list(pixels.shape))
            self._interpreter.allocate_tensors()
            self._batch = len(pixels)
        self._interpreter.set_tensor(self._input, np.asarray(pixels, np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


def wants_tflite(setting: str, backbone: str) -> bool:
    """``export.tflite``: ``auto`` means the MobileNet family (built for edge devices)."""
    from components.config import tri_state

    value = tri_state(setting)
    return value == "true" or (value == "auto" and backbone.startswith("mobilenet"))


def load_saved_model(uri: str) -> Any:
    """Loads a SavedModel from a local path or gs:// (copied through the storage edge)."""
    if not storage.is_gcs(uri):
        return tf.saved_model.load(uri)
    tmp = scratch.mkdtemp("load")
    try:
        storage.copy_tree(uri, tmp)
        return tf.saved_model.load(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_extra(uri: str, name: str) -> str | None:
    """A file of the SavedModel's ``assets.extra/``, or None."""
    path = storage.join(uri, EXTRA, name)
    return storage.read_text(path) if storage.exists(path) else None


def describe(verdict: dict[str, Any], fingerprint: dict[str, Any], config_yaml: str) -> dict[str, str]:
    """The ``assets.extra`` files that record what produced an export."""
    return {
        "config.yaml": config_yaml,
        "verdict.json": json.dumps(verdict, indent=2) + "\n",
        "fingerprint.json": json.dumps(fingerprint, indent=2) + "\n",
    }
