"""The classifier: backbone + new head, and which layers each phase trains.

One model graph serves both phases::

    image (float RGB 0-255) -> preprocess (the backbone's own preprocess_input)
      -> backbone (called with training=False: BatchNorm always in inference mode)
      -> pool (global average) = features -> head (dropout, dense, softmax in float32)

``extractor`` (image -> features) and ``head`` (features -> probabilities) share those
layers, so the head trained on cached features *is* the head of the assembled baseline.

Built on every worker, under the strategy's scope.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from components import backbones


class BackbonePreprocess(tf_keras.layers.Layer):
    """The backbone's ``preprocess_input`` as a layer, so saved models take raw 0-255 RGB."""

    def __init__(self, backbone: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, images: Any) -> Any:
        return backbones.preprocess_input(self.backbone, images)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone": self.backbone}


# The custom objects a saved model of this project needs, passed explicitly wherever one is
# loaded (nothing is registered as a side effect of an import). Both names: a model saved while
# the layer was registered under the "finetune" package records it as "finetune>...".
CUSTOM_OBJECTS = {"BackbonePreprocess": BackbonePreprocess, "finetune>BackbonePreprocess": BackbonePreprocess}


def load_model(path: str, compile: bool = False) -> Any:
    """A saved ``model.keras`` of this project (a local path), with its custom layer, in
    float32 (as the training stage saves them) whatever the process's global policy."""
    with global_policy("float32"):
        return tf_keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, compile=compile)


@contextlib.contextmanager
def global_policy(name: str) -> Iterator[None]:
    """Keras's global dtype policy set to ``name`` inside the block, and restored after:
    layers and nested models built inside take it unless their config says otherwise."""
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


@dataclass
class Classifier:
    """The assembled model and its parts (all sharing layers and weights).

    Attributes:
        model: image -> class probabilities; the baseline, then the candidate.
        extractor: image -> pooled backbone features (frozen in the baseline phase).
        head: features -> class probabilities.
        backbone: The Keras applications backbone (layer ``backbone`` of ``model``).
    """

    model: Any
    extractor: Any
    head: Any
    backbone: Any


def build_classifier(
    backbone_name: str,
    image_size: int,
    num_classes: int,
    *,
    weights: str = backbones.IMAGENET,
    alpha: float = 1.0,
    dropout: float = 0.2,
    seed: int = 0,
    name: str = "classifier",
) -> Classifier:
    """Builds the classifier with the backbone frozen (the baseline phase)."""
    backbone = backbones.build_backbone(backbone_name, image_size, weights=weights, alpha=alpha)
    backbone.trainable = False
    image = tf_keras.Input((image_size, image_size, 3), name="image")
    x = BackbonePreprocess(backbone_name, name="preprocess")(image)
    x = backbone(x, training=False)
    features = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    head = build_head(int(features.shape[-1]), num_classes, dropout, seed)
    model = tf_keras.Model(image, head(features), name=name)
    extractor = tf_keras.Model(image, features, name="extractor")
    return Classifier(model=model, extractor=extractor, head=head, backbone=backbone)


def build_head(feature_dim: int, num_classes: int, dropout: float, seed: int = 0) -> Any:
    """features -> dropout -> dense -> softmax (kept in float32 under mixed precision)."""
    features = tf_keras.Input((feature_dim,), name="features")
    x = tf_keras.layers.Dropout(dropout, seed=seed, name="dropout")(features)
    x = tf_keras.layers.Dense(num_classes, name="logits")(x)
    probabilities = tf_keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return tf_keras.Model(features, probabilities, name="head")


def unfreeze_top(classifier: Classifier, backbone_name: str, unfreeze: str) -> dict[str, Any]:
    """Prepares the candidate phase: trains the backbone from the ``train.unfreeze`` layer
    up, keeps every BatchNormalization layer frozen (its statistics stay ImageNet's, and the
    backbone is called with ``training=False`` anyway), and leaves the head trainable.

    Returns:
        What was unfrozen, for the summary.
    """
    backbone = classifier.backbone
    layers = backbone.layers
    start = backbones.unfreeze_index(
        [layer.name for layer in layers], unfreeze, backbones.BACKBONES[backbone_name].unfreeze_from
    )
    backbone.trainable = True
    batchnorm = 0
    for i, layer in enumerate(layers):
        is_batchnorm = isinstance(layer, tf_keras.layers.BatchNormalization)
        batchnorm += is_batchnorm
        layer.trainable = i >= start and not is_batchnorm
    return {
        "from_layer": layers[start].name,
        "trainable_layers": sum(1 for layer in layers if layer.trainable and layer.weights),
        "frozen_layers": sum(1 for layer in layers if not layer.trainable and layer.weights),
        "frozen_batchnorm": batchnorm,
        "trainable_weights": len(classifier.model.trainable_weights),
    }


def learning_rate_schedule(base: float, schedule: str, steps: int) -> Any:
    """``base`` as the optimizer's learning rate: constant, or (``cosine``) decaying to 0 along
    a half cosine over ``steps`` optimizer steps. A function of the optimizer's step counter,
    which BackupAndRestore restores, so a resumed run continues on the same curve."""
    if schedule == "cosine":
        return tf_keras.optimizers.schedules.CosineDecay(base, decay_steps=max(1, steps))
    return base


def compile_model(model: Any, learning_rate: Any, jit_compile: bool, steps_per_execution: int = 1) -> None:
    """Adam + sparse categorical cross-entropy + accuracy (mixed float16 gets Keras's loss
    scaling automatically). ``learning_rate``: a float or a Keras schedule."""
    model.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


# Head steps are tiny (a dense layer on cached features): run several per call of the
# training function, or Keras's per-step overhead costs more than the step.
HEAD_STEPS_PER_EXECUTION = 8


def head_trainer(classifier: Classifier, learning_rate: float, jit_compile: bool) -> Any:
    """The model the baseline phase fits: features -> probabilities through the classifier's
    own head layers, compiled on its own, so the head's optimizer does not become part of
    the classifier (nor of the candidate's backups). Call under the strategy's scope."""
    head = tf_keras.Model(classifier.head.input, classifier.head.output, name="head_on_features")
    compile_model(head, learning_rate, jit_compile, steps_per_execution=HEAD_STEPS_PER_EXECUTION)
    return head


def feature_extractor(classifier: Classifier, on_tpu: bool = False) -> Callable[[Any], np.ndarray]:
    """image batch -> float32 pooled features (numpy), runnable by this worker alone.

    A local copy of the frozen extractor (plain calls of the distributed one would be
    collective, see :func:`local_copy`), traced once for any batch size; on a TPU, the
    distributed extractor's ``predict`` spreads the work over the cores instead. Call on
    every worker at the same point.
    """
    if on_tpu:
        return lambda images: classifier.extractor.predict(images, verbose=0).astype(np.float32)
    local = local_copy(classifier.model)
    extractor = tf_keras.Model(local.input, local.get_layer("pool").output)
    size = local.input_shape[1]
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    extract = tf.function(
        lambda x: tf.cast(extractor(x, training=False), tf.float32), input_signature=signature
    )
    return lambda images: extract(images).numpy()


def float32_copy(keras_model: Any) -> Any:
    """``keras_model`` computing in float32 throughout, with its weights: what the stage saves
    when it trained under mixed precision (the variables are float32 already; only the
    layers' compute dtype changes), so evaluation, the export, TFLite and serving never run
    16-bit math. ``keras_model`` itself when it is float32 already.

    Every layer's ``dtype`` in the saved config is rewritten, nested models' too, and the
    copy is built under the float32 policy. Under MultiWorkerMirroredStrategy the weight
    read is collective: call it on every worker at the same point.
    """
    config = keras_model.get_config()
    rewritten = _float32_config(config)
    if rewritten == config:
        return keras_model
    with global_policy("float32"):  # nested models' configs name no dtype
        copy = keras_model.__class__.from_config(rewritten, custom_objects=CUSTOM_OBJECTS)
    copy.set_weights(keras_model.get_weights())
    return copy


def _float32_config(value: Any) -> Any:
    """A layer config with every mixed or 16-bit ``dtype`` (a policy name, or a serialized
    ``Policy``) replaced by ``float32``, recursively."""
    if isinstance(value, list):
        return [_float32_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _float32_config(v) for k, v in value.items()}
    dtype = out.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") in ("Policy", "DTypePolicy"):
        out["dtype"] = "float32"
    elif dtype in ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16"):
        out["dtype"] = "float32"
    return out


def local_copy(keras_model: Any) -> Any:
    """A copy of ``keras_model`` outside any distribution strategy, with its current weights.

    Under MultiWorkerMirroredStrategy, BatchNorm's moving statistics are sync-on-read
    variables: reading them outside a replica context is an all-reduce across workers. A
    plain call of the distributed model on one worker (and not the others) would therefore
    hang or fail. Every worker calls this at the same point (the weight read is collective
    and symmetric); afterwards each can run the copy alone, on any number of batches.
    """
    copy = tf_keras.models.clone_model(keras_model)
    copy.set_weights(keras_model.get_weights())
    return copy
