"""The ``evaluate``, ``gate`` and ``export`` sections: judging both models, blessing one, exporting it."""

from __future__ import annotations

from dataclasses import dataclass

from components.config.train import check_seed
from components.core.configtree import TRI_STATE, option, out_of_range, tri_state
from components.core.errors import did_you_mean

# Metrics the gate can decide on, and whether a higher value is better.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "top_k_accuracy": True,
    "macro_f1": True,
    "log_loss": False,
    "ece": False,
}
GATE_METRICS = tuple(HIGHER_IS_BETTER)
TFLITE_QUANTIZATION = ("none", "dynamic", "float16")


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation of both models on the test split.

    ``top_k`` is the k of top-k accuracy (at most the number of classes minus one, so it
    never counts every answer right). ``bootstrap_samples`` resamples the paired test
    examples for the confidence interval; ``calibration_bins`` are the bins of the expected
    calibration error; ``misclassified_examples`` thumbnails go into the report.
    """

    top_k: int = option(
        5, help="k of top-k accuracy (capped at classes - 1, so it never counts every answer right)"
    )
    batch_size: int = option(64, help="test images per batch")
    bootstrap_samples: int = option(2000, help="paired bootstrap resamples for the confidence interval")
    calibration_bins: int = option(10, help="bins of the expected calibration error")
    misclassified_examples: int = option(
        24, help="the candidate's mistakes shown as thumbnails in the report"
    )
    seed: int = option(0, help="bootstrap resampling (the same inputs always give the same verdict)")


@dataclass(frozen=True)
class GateConfig:
    """The rule that blesses the candidate (see ``components.evaluate.gate.decide``).

    The candidate is blessed only when its improvement over the frozen-feature baseline on
    ``metric`` is at least ``min_improvement`` (absolute; negative lets a slightly worse
    candidate through, -1 any candidate on a 0-1 metric) and the lower end of the paired
    bootstrap interval at ``confidence`` is above it too. ``min_value``, when set, is a
    floor (a ceiling for log_loss and ece) on the candidate's own value. With
    ``compare_to_production`` the production model of ``registry.uri`` must not be
    significantly better than the candidate on the same test examples.
    """

    metric: str = option("accuracy", help=f"`{' '.join(GATE_METRICS)}` (the last two: lower is better)")
    min_improvement: float = option(
        0.0,
        help="required absolute gain over the baseline; negative lets a slightly worse candidate "
        "through, `-1` any (on 0-1 metrics)",
    )
    confidence: float = option(
        0.95,
        help="level of the two-sided paired bootstrap interval whose lower end must clear `min_improvement`",
    )
    min_value: float | None = option(
        None, help="optional floor on the candidate's own value (a ceiling for `log_loss` and `ece`)"
    )
    compare_to_production: bool = option(
        False, help="also require that the registry's production model is not significantly better"
    )


@dataclass(frozen=True)
class ExportConfig:
    """The blessed candidate's SavedModel (and TFLite model).

    ``top_k`` classes (0: all) come back as ``class_ids`` and ``class_names``. ``tflite``
    is ``auto`` (MobileNet-family backbones only), ``true`` or ``false``;
    ``tflite_quantization`` is ``none`` (float32), ``dynamic`` (int8 weights) or ``float16``.
    """

    top_k: int = option(5, help="classes returned per image (`class_ids`, `class_names`); 0 = all")
    tflite: str = option("auto", help="TFLite model too: `auto` = MobileNet backbones, `true`, `false`")
    tflite_quantization: str = option("dynamic", help="`dynamic` (int8 weights), `float16`, `none` (float32)")


def check_evaluate(e: EvaluateConfig) -> list[str]:
    """Every problem of the ``evaluate`` section."""
    return check_seed("evaluate.seed", e.seed) + out_of_range(
        "evaluate.",
        (
            ("top_k", e.top_k, 1, 1000),
            ("batch_size", e.batch_size, 1, 65_536),
            ("bootstrap_samples", e.bootstrap_samples, 100, 10**6),
            ("calibration_bins", e.calibration_bins, 1, 1000),
            ("misclassified_examples", e.misclassified_examples, 0, 1000),
        ),
    )


def check_gate(g: GateConfig, registry_uri: str) -> list[str]:
    """Every problem of the ``gate`` section; ``registry_uri`` is where production is read."""
    problems = []
    if g.metric not in GATE_METRICS:
        problems.append(
            f"gate.metric: unknown metric '{g.metric}'{did_you_mean(g.metric, GATE_METRICS)} "
            f"Valid: {', '.join(GATE_METRICS)}"
        )
    if not 0.5 <= g.confidence < 1.0:
        problems.append(f"gate.confidence: {g.confidence} must be in [0.5, 1)")
    if not -1.0 <= g.min_improvement <= 1.0 and g.metric not in ("log_loss",):
        problems.append(f"gate.min_improvement: {g.min_improvement} must be between -1 and 1")
    if g.compare_to_production and not registry_uri:
        problems.append(
            "gate.compare_to_production: needs registry.uri (where the production model is published)"
        )
    return problems


def check_export(x: ExportConfig) -> list[str]:
    """Every problem of the ``export`` section."""
    problems = out_of_range("export.", (("top_k", x.top_k, 0, 100_000),))
    if tri_state(x.tflite) not in TRI_STATE:
        problems.append(f"export.tflite: '{x.tflite}' must be one of {', '.join(TRI_STATE)}")
    if x.tflite_quantization not in TFLITE_QUANTIZATION:
        problems.append(
            f"export.tflite_quantization: '{x.tflite_quantization}' must be one of "
            f"{', '.join(TFLITE_QUANTIZATION)}"
        )
    return problems
