"""The one explicit table of supported backbones.

Each entry names the Keras applications model (in ``tf_keras.applications``), its default
input size and the smallest input size it accepts. Later stages read the builder, its
``preprocess_input`` and where fine-tuning starts from the same table; nothing registers
itself by import side effects.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Backbone:
    """A pre-trained image backbone.

    Attributes:
        name: The configuration name (``model.backbone``).
        application: Attribute of ``tf_keras.applications`` that builds it.
        module: Submodule of ``tf_keras.applications`` holding its ``preprocess_input``.
        default_size: Input size (pixels, square) it was trained at on ImageNet.
        min_size: Smallest input size the architecture accepts.
    """

    name: str
    application: str
    module: str
    default_size: int
    min_size: int


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", "VGG16", "vgg16", 224, 32),
        Backbone("vgg19", "VGG19", "vgg19", 224, 32),
        Backbone("resnet50", "ResNet50", "resnet", 224, 32),
        Backbone("resnet50v2", "ResNet50V2", "resnet_v2", 224, 32),
        Backbone("mobilenet", "MobileNet", "mobilenet", 224, 32),
        Backbone("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 32),
        Backbone("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 32),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 32),
        Backbone("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 32),
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
