"""What TensorFlow Serving reads: warm-up requests, the infra check, and ``models.config``.

* Warm-up: ``assets.extra/tf_serving_warmup_requests`` is a TFRecord file of
  ``PredictionLog`` protos that TF Serving replays when it loads a version, so the first real
  request does not pay for graph initialisation. We write one ``serving_default`` request
  with an encoded image at the model's input size.
* Infra validation: before a version becomes visible the staged SavedModel is loaded and
  the warm-up requests are run through it, as the server will (TFX's InfraValidator does the
  same with a real server; we load it in-process, which checks the same graph and signatures).
* ``models.config``: a ``ModelServerConfig`` whose ``version_labels`` follow the registry's
  aliases, so ``/v1/models/<name>/labels/production:predict`` serves the production version.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from components import registry
from components.core.errors import StageError
from components.evaluate import export

WARMUP_FILE = "tf_serving_warmup_requests"


def warmup_image(image_size: int) -> bytes:
    """A deterministic JPEG at the model's input size (a colour gradient)."""
    ramp = np.linspace(0, 255, image_size, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    return tf.io.encode_jpeg(tf.constant(pixels.astype(np.uint8))).numpy()


def warmup_requests(model_name: str, image_size: int) -> list[bytes]:
    """Serialized ``PredictionLog`` records: one ``serving_default`` request of one image."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=export.SERVING_DEFAULT)
    )
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([warmup_image(image_size)], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return [log.SerializeToString()]


def write_warmup(saved_model_dir: str, records: list[bytes]) -> str:
    """Writes the warm-up file into a local SavedModel's ``assets.extra/``; returns its path."""
    path = os.path.join(saved_model_dir, export.EXTRA, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


def validate(saved_model_dir: str, labels: list[str]) -> dict[str, Any]:
    """Loads a local SavedModel and runs its warm-up requests through it, as a server would.

    Checks that every request's signature exists and accepts its inputs, that the
    probabilities are finite, one row per input, one column per label, and sum to 1, and
    that the class names are labels of the model.

    Returns:
        ``{"requests": n, "load_seconds": s, "latency_ms": ms}``.

    Raises:
        StageError: the model does not load or a request fails a check (says which).
    """
    path = os.path.join(saved_model_dir, export.EXTRA, WARMUP_FILE)
    if not os.path.isfile(path):
        raise StageError(f"infra validation: {path} is missing (no warm-up requests to replay)")
    started = time.perf_counter()
    try:
        model = tf.saved_model.load(saved_model_dir)
    except Exception as e:  # noqa: BLE001 - any load failure means the server would fail too
        raise StageError(f"infra validation: the SavedModel does not load: {e}") from e
    loaded = time.perf_counter()
    count = 0
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        _check_request(model, log.predict_log.request, labels)
        count += 1
    if not count:
        raise StageError(f"infra validation: {path} holds no requests")
    return {
        "requests": count,
        "load_seconds": round(loaded - started, 2),
        "latency_ms": round((time.perf_counter() - loaded) * 1000 / count, 1),
    }


def _check_request(model: Any, request: predict_pb2.PredictRequest, labels: list[str]) -> None:
    name = request.model_spec.signature_name or export.SERVING_DEFAULT
    if name not in model.signatures:
        raise StageError(f"infra validation: no signature '{name}' (has {', '.join(model.signatures)})")
    inputs = {key: tf.constant(tf.make_ndarray(proto)) for key, proto in request.inputs.items()}
    try:
        out = model.signatures[name](**inputs)
    except Exception as e:  # noqa: BLE001 - the server would answer this request with an error
        raise StageError(f"infra validation: signature '{name}' failed on its warm-up request: {e}") from e
    probs = out["probabilities"].numpy()
    rows = len(next(iter(inputs.values())))
    problems = []
    if probs.shape != (rows, len(labels)):
        problems.append(f"probabilities have shape {probs.shape}, expected {(rows, len(labels))}")
    elif not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        problems.append("probabilities are not finite or do not sum to 1")
    names = {n.decode() for n in out["class_names"].numpy().ravel()}
    if not names <= set(labels):
        problems.append(f"class names {sorted(names - set(labels))} are not labels of the model")
    if problems:
        raise StageError(f"infra validation of signature '{name}': " + "; ".join(problems))


def models_config(registry_uri: str, names: list[str], base_path: str = "") -> str:
    """TF Serving's ``models.config`` (text proto) for ``names`` in a registry.

    Each model serves its aliased versions and its newest complete version (``specific``
    policy: TF Serving only labels versions it has loaded), with one ``version_labels`` entry
    per alias. ``base_path`` replaces ``registry_uri`` in the paths, for a server that mounts
    the registry elsewhere (e.g. ``/models``).

    A committed version that is not complete (a killed push; see ``finetune registry fsck``)
    is never pinned: as the newest it is skipped with a warning, since the newest is only a
    default; an alias that points at one is an error, since clients ask for that alias by
    name and a config without it would silently drop it (or make the server wait forever).

    Raises:
        StageError: an alias points at a version that is not complete (nothing is written).
    """
    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        complete = _complete_versions(registry_uri, name)
        labels = registry.aliases_of(registry_uri, name)
        for alias, version in sorted(labels.items()):
            if version not in complete:
                registry.check_complete(registry_uri, name, version, f"serve alias '{alias}'")
        if not complete:
            continue
        entry = config.model_config_list.config.add()
        entry.name = name
        root = base_path or registry_uri
        entry.base_path = registry.model_uri(root if "://" in root else os.path.abspath(root), name)
        entry.model_platform = "tensorflow"
        entry.model_version_policy.specific.versions.extend(sorted({*labels.values(), max(complete)}))
        for alias, version in sorted(labels.items()):
            entry.version_labels[alias] = version
    return text_format.MessageToString(config)


def _complete_versions(registry_uri: str, name: str) -> set[int]:
    """The committed versions of ``name`` that are complete; a warning for each that is not."""
    complete = set()
    for record in registry.versions(registry_uri, name):
        version = int(record["version"])
        missing = registry.missing_parts(registry_uri, name, version)
        if missing:
            registry.warn(f"version {version} of '{name}' is not served: {'; '.join(missing)}")
        else:
            complete.add(version)
    return complete
