"""The ``model`` section: the backbone, its weights and the new head, checked against the backbone table."""

from __future__ import annotations

from dataclasses import dataclass

from components.backbones import BACKBONES, check_options
from components.core.configtree import option
from components.core.errors import did_you_mean

MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True)
class ModelConfig:
    """The backbone, its weights and the new classification head.

    ``image_size`` 0 means the backbone's default. ``weights`` is ``imagenet`` (Keras's own
    download and cache), ``none`` (random initialisation), or the local path / gs:// URI of
    a Keras weights file for the backbone without its top. ``alpha`` is the MobileNet width.
    """

    backbone: str = option("mobilenet_v2", help="the pre-trained network: " + " ".join(BACKBONES))
    image_size: int = option(0, help="pixels (square); 0 = the backbone's default (224)")
    weights: str = option(
        "imagenet",
        help="`imagenet` (Keras's download and cache), `none`, or a local path / gs:// URI of a "
        "Keras weights file (no top)",
    )
    alpha: float = option(
        1.0, help="MobileNet width; ImageNet weights exist for 0.35-1.4 (v2), 0.25-1.0 (v1), 0.75/1.0 (v3)"
    )
    dropout: float = option(0.2, help="dropout before the new dense layer")


def check(m: ModelConfig) -> list[str]:
    """Every problem of the ``model`` section."""
    problems = []
    if m.backbone not in BACKBONES:
        problems.append(
            f"model.backbone: unknown backbone '{m.backbone}'"
            f"{did_you_mean(m.backbone, BACKBONES)} Valid: {', '.join(BACKBONES)}"
        )
    else:
        minimum = BACKBONES[m.backbone].min_size
        if m.image_size and m.image_size < minimum:
            problems.append(
                f"model.image_size: {m.image_size} is below the minimum of "
                f"{minimum} for {m.backbone}; use 0 for the backbone's default"
            )
        problems.extend(check_options(m.backbone, m.weights, m.alpha))
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout: {m.dropout} must be in [0, 1)")
    if m.image_size > MAX_IMAGE_SIZE:
        problems.append(
            f"model.image_size: {m.image_size} is above {MAX_IMAGE_SIZE} px (backbones are "
            "pre-trained at 224-600); use 0 for the backbone's default"
        )
    return problems
