"""The one explicit table of supported backbones, and how to build one.

Each entry names the Keras applications model (in ``tf_keras.applications``), its default
input size, the smallest input size it accepts, the ``alpha`` widths ImageNet weights exist
for, and the layer where fine-tuning starts by default. Nothing registers itself by import
side effects; the configuration, the trainer and the exporter all read this table.

The table itself imports no TensorFlow (the configuration validates against it); the
builders import ``tf_keras`` when called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from components.core.errors import ConfigError, did_you_mean

# model.weights values that are not a file.
IMAGENET = "imagenet"
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class Backbone:
    """A pre-trained image backbone.

    Attributes:
        name: The configuration name (``model.backbone``).
        application: Attribute of ``tf_keras.applications`` that builds it.
        module: Submodule of ``tf_keras.applications`` holding its ``preprocess_input``.
        default_size: Input size (pixels, square) it was trained at on ImageNet.
        min_size: Smallest input size the architecture accepts.
        unfreeze_from: The layer where fine-tuning starts by default: it and every layer
            above it are trained in the candidate phase (the last block or two, as in the
            Keras transfer-learning guide).
        imagenet_alphas: Widths (``model.alpha``) with published ImageNet weights; empty for
            backbones that have no width multiplier.
        cpu_bfloat16: Whether ``train.mixed_precision: auto`` trains it in bfloat16 on a CPU
            with AMX or AVX-512 BF16: true where ``benchmarks/bench_cpu_precision.py`` measured
            it faster on both (docs/performance.md), false where the casts cost more than the
            16-bit math saves (the depthwise-convolution backbones).
    """

    name: str
    application: str
    module: str
    default_size: int
    min_size: int
    unfreeze_from: str
    imagenet_alphas: tuple[float, ...] = ()
    cpu_bfloat16: bool = False

    @property
    def has_alpha(self) -> bool:
        return bool(self.imagenet_alphas)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", "VGG16", "vgg16", 224, 32, "block5_conv1", cpu_bfloat16=True),
        Backbone("vgg19", "VGG19", "vgg19", 224, 32, "block5_conv1", cpu_bfloat16=True),
        Backbone("resnet50", "ResNet50", "resnet", 224, 32, "conv5_block1_1_conv", cpu_bfloat16=True),
        Backbone(
            "resnet50v2", "ResNet50V2", "resnet_v2", 224, 32, "conv5_block1_preact_bn", cpu_bfloat16=True
        ),
        Backbone("mobilenet", "MobileNet", "mobilenet", 224, 32, "conv_dw_12", (0.25, 0.5, 0.75, 1.0)),
        Backbone(
            "mobilenet_v2",
            "MobileNetV2",
            "mobilenet_v2",
            224,
            32,
            "block_13_expand",
            (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        ),
        Backbone(
            "mobilenet_v3_small",
            "MobileNetV3Small",
            "mobilenet_v3",
            224,
            32,
            "expanded_conv_9/expand",
            (0.75, 1.0),
        ),
        Backbone(
            "mobilenet_v3_large",
            "MobileNetV3Large",
            "mobilenet_v3",
            224,
            32,
            "expanded_conv_12/expand",
            (0.75, 1.0),
        ),
        Backbone("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 32, "block6a_expand_conv"),
    )
}


def get_backbone(name: str) -> Backbone:
    """Returns the table entry for ``name``.

    Raises:
        ConfigError: naming the unknown backbone, the closest known one and all valid names.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"model.backbone: unknown backbone '{name}'{did_you_mean(name, BACKBONES)} "
            f"Valid: {', '.join(BACKBONES)}."
        ) from None


def check_options(name: str, weights: str, alpha: float) -> list[str]:
    """The problems with a backbone / weights / alpha combination (empty when consistent).

    Pure: used by the configuration's validation, before any work starts.
    """
    backbone = BACKBONES[name]
    problems = []
    if not backbone.has_alpha and alpha != 1.0:
        with_alpha = ", ".join(b.name for b in BACKBONES.values() if b.has_alpha)
        problems.append(
            f"model.alpha: {name} has no width multiplier; leave it at 1.0 (alpha applies to {with_alpha})"
        )
    if alpha <= 0:
        problems.append(f"model.alpha: {alpha} must be above 0")
    if weights == IMAGENET and backbone.has_alpha and alpha not in backbone.imagenet_alphas:
        problems.append(
            f"model.alpha: ImageNet weights for {name} exist only for alpha in "
            f"{', '.join(str(a) for a in backbone.imagenet_alphas)}, not {alpha}; "
            "pick one of those, or set model.weights=none to train from scratch"
        )
    if not weights:
        problems.append(
            f"model.weights: empty; use '{IMAGENET}', '{NO_WEIGHTS}', or a weights file path / gs:// URI"
        )
    return problems


def preprocess_input(name: str, images: Any) -> Any:
    """Applies the backbone's own ``preprocess_input`` to float RGB pixels in 0-255."""
    import tf_keras

    module = getattr(tf_keras.applications, BACKBONES[name].module)
    return module.preprocess_input(images)


def build_backbone(name: str, image_size: int, weights: str = IMAGENET, alpha: float = 1.0) -> Any:
    """Builds the backbone without its classifier top, as a ``tf_keras.Model`` named ``backbone``.

    Args:
        name: A key of :data:`BACKBONES`.
        image_size: Square input size in pixels.
        weights: ``imagenet`` (Keras's download and cache), ``none``, or a local path or gs://
            URI of a Keras weights file for this architecture.
        alpha: Width multiplier (MobileNets only).

    Runs under the caller's distribution strategy scope, so its variables are mirrored.

    Raises:
        ConfigError: the weights file is missing or does not fit the architecture.
    """
    import tf_keras

    backbone = get_backbone(name)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (image_size, image_size, 3)}
    if backbone.has_alpha:
        kwargs["alpha"] = alpha
    with _weights_argument(weights) as resolved:
        kwargs["weights"] = resolved
        try:
            model = getattr(tf_keras.applications, backbone.application)(**kwargs)
        except (ValueError, OSError) as e:
            raise ConfigError(
                f"model.weights: cannot load '{weights}' into {name} (alpha {alpha}, {image_size} px): {e}. "
                "The file must hold weights of this exact architecture without its top; check "
                "model.backbone and model.alpha."
            ) from None
    return tf_keras.Model(model.inputs, model.outputs, name="backbone")


@contextlib.contextmanager
def _weights_argument(weights: str) -> Iterator[str | None]:
    """The ``weights=`` argument for Keras: None, ``imagenet``, or a local file (gs:// files
    are copied to a temporary local file, as Keras's h5 reader needs)."""
    from components.core import storage

    if weights in (NO_WEIGHTS, IMAGENET):
        yield None if weights == NO_WEIGHTS else IMAGENET
        return
    if not storage.exists(weights):
        raise ConfigError(
            f"model.weights: file not found: {weights} (expected '{IMAGENET}', '{NO_WEIGHTS}', "
            "or the path / gs:// URI of a Keras weights file)"
        )
    with storage.local_copy(weights) as path:
        yield path


def unfreeze_index(layer_names: list[str], unfreeze: str, default_from: str) -> int:
    """Index of the first layer trained in the fine-tuning phase.

    Args:
        layer_names: The backbone's layers, bottom to top.
        unfreeze: ``train.unfreeze``: empty for the backbone's default, a fraction in (0, 1]
            of the layers counted from the top, or a layer name.
        default_from: The backbone's default layer name.

    Raises:
        ConfigError: an unknown layer name (with the closest match) or a fraction out of range.
    """
    value = unfreeze or default_from
    try:
        fraction = float(value)
    except ValueError:
        if value not in layer_names:
            raise ConfigError(
                f"train.unfreeze: no layer '{value}' in the backbone{did_you_mean(value, layer_names)} "
                "Give a layer name, or a fraction of layers such as 0.2."
            ) from None
        return layer_names.index(value)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train.unfreeze: fraction {fraction} must be in (0, 1]")
    return len(layer_names) - max(1, round(fraction * len(layer_names)))
