"""The gate: is the fine-tuned candidate good enough to publish? A pure function.

``decide`` looks only at per-example results on the same test examples and the gate
configuration. The candidate is blessed when all of these hold:

1. its improvement over the frozen-feature baseline on ``gate.metric`` is at least
   ``gate.min_improvement`` (for ``log_loss`` and ``ece``, where lower is better, the
   improvement is baseline minus candidate);
2. the lower end of the paired bootstrap interval of that improvement, at
   ``gate.confidence``, is above ``gate.min_improvement`` too: a gain within the noise of
   this test set is not a gain;
3. when ``gate.min_value`` is set, the candidate's own value reaches it (for lower-is-better
   metrics: does not exceed it);
4. when a production champion is given, it is not significantly better than the candidate:
   the upper end of the interval of the candidate's improvement over it is not below 0.

Paired bootstrap: the same resampled example indices are scored for both models, so the
interval is of the *difference* on identical examples (Koehn, 2004), which is far tighter
than comparing two independent intervals. The resampling is seeded: the same inputs give
the same verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.config import EvaluateConfig, GateConfig
from components.core.errors import StageError
from components.evaluate import metrics
from components.evaluate.metrics import Predictions

# Metrics that are means of a per-example score: their bootstrap is one vectorised step.
_PER_EXAMPLE = {
    "accuracy": lambda p, y, k: metrics.correct(p, y),
    "top_k_accuracy": metrics.top_k_hits,
    "log_loss": lambda p, y, k: metrics.example_log_loss(p, y),
}


class GateError(StageError):
    """The gate cannot decide (no examples, unpaired results, a metric that is not a number)."""


@dataclass(frozen=True)
class Champion:
    """The production model's results on the same test examples."""

    version: int
    predictions: Predictions


@dataclass(frozen=True)
class Comparison:
    """One paired comparison: ``delta`` is the candidate's improvement over ``value``."""

    value: float
    candidate: float
    delta: float
    confidence_interval: tuple[float, float]


@dataclass(frozen=True)
class Verdict:
    """The gate's decision, as written to ``verdict.json``."""

    blessed: bool
    reason: str
    metric: str
    baseline: float
    candidate: float
    delta: float
    confidence_interval: tuple[float, float]
    confidence: float
    min_improvement: float
    min_value: float | None
    test_examples: int
    champion: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["confidence_interval"] = list(self.confidence_interval)
        return out


def decide(
    candidate: Predictions,
    baseline: Predictions,
    gate: GateConfig,
    options: EvaluateConfig | None = None,
    champion: Champion | None = None,
) -> Verdict:
    """Decides whether ``candidate`` is blessed (see the module docstring for the rule).

    Raises:
        GateError: no test examples, results not paired on the same examples, or a metric
            value that is not a finite number.
    """
    compare = _comparer(candidate, gate, options or EvaluateConfig())
    against_baseline = compare(baseline)
    lo, hi = against_baseline.confidence_interval
    margin = gate.min_improvement
    name = gate.metric
    fields = {
        "metric": name,
        "baseline": against_baseline.value,
        "candidate": against_baseline.candidate,
        "delta": against_baseline.delta,
        "confidence_interval": (lo, hi),
        "confidence": gate.confidence,
        "min_improvement": margin,
        "min_value": gate.min_value,
        "test_examples": len(candidate),
    }
    level = f"{gate.confidence:.0%}"
    summary = (
        f"{name} {against_baseline.candidate:.4f} vs the baseline's {against_baseline.value:.4f} "
        f"(improvement {against_baseline.delta:+.4f}, {level} interval [{lo:+.4f}, {hi:+.4f}], "
        f"{len(candidate)} test examples)"
    )
    if against_baseline.delta < margin:
        reason = f"the candidate improves less than the required {margin:+.4f}: {summary}"
        return Verdict(False, reason, **fields)
    if not lo > margin:
        return Verdict(
            False,
            f"the gain is within noise: the lower end of the interval is not above the required "
            f"{margin:+.4f}: {summary}",
            **fields,
        )
    if gate.min_value is not None and not _reaches(name, against_baseline.candidate, gate.min_value):
        bound = "at least" if metrics.HIGHER_IS_BETTER[name] else "at most"
        return Verdict(
            False,
            f"the candidate's {name} {against_baseline.candidate:.4f} is not {bound} gate.min_value "
            f"{gate.min_value:g}: {summary}",
            **fields,
        )
    reason = f"the candidate beats the baseline: {summary}"
    champion_fields = None
    if champion is not None:
        against_champion = compare(champion.predictions)
        c_lo, c_hi = against_champion.confidence_interval
        passed = c_hi >= 0.0
        words = (
            f"production version {champion.version} has {name} {against_champion.value:.4f}, the candidate "
            f"{against_champion.candidate:.4f} (difference {against_champion.delta:+.4f}, {level} interval "
            f"[{c_lo:+.4f}, {c_hi:+.4f}])"
        )
        champion_fields = {
            "version": champion.version,
            "value": against_champion.value,
            "delta": against_champion.delta,
            "confidence_interval": [c_lo, c_hi],
            "passed": passed,
            "reason": words,
        }
        if not passed:
            return Verdict(
                False,
                f"the production model is better than the candidate on the same test examples: {words}",
                champion=champion_fields,
                **fields,
            )
        reason += f"; it is not worse than production: {words}"
    return Verdict(True, reason, champion=champion_fields, **fields)


def _reaches(name: str, value: float, bound: float) -> bool:
    return value >= bound if metrics.HIGHER_IS_BETTER[name] else value <= bound


def _comparer(candidate: Predictions, gate: GateConfig, options: EvaluateConfig) -> Any:
    """``other -> Comparison`` of ``candidate`` against another model on the same examples."""
    name = gate.metric
    if name not in metrics.HIGHER_IS_BETTER:
        raise GateError(f"gate.metric '{name}' is not computed; valid: {', '.join(metrics.GATE_METRICS)}")
    n = len(candidate)
    if n == 0:
        raise GateError("the test split has no examples: the gate cannot decide on nothing")
    k = metrics.effective_top_k(options.top_k, candidate.num_classes)
    sign = 1.0 if metrics.HIGHER_IS_BETTER[name] else -1.0
    resamples = np.random.default_rng(options.seed).integers(0, n, size=(options.bootstrap_samples, n))
    metric = metrics.metric_function(name, k, options.calibration_bins)
    tail = (1.0 - gate.confidence) / 2

    def compare(other: Predictions) -> Comparison:
        if other.probs.shape != candidate.probs.shape or not np.array_equal(other.labels, candidate.labels):
            raise GateError(
                f"results are not paired: {other.probs.shape} vs {candidate.probs.shape} probabilities, "
                "or different labels; both models must be scored on the same test examples in the same order"
            )
        value, mine = metric(other.probs, other.labels), metric(candidate.probs, candidate.labels)
        for label, v in (("reference", value), ("candidate", mine)):
            if not np.isfinite(v):
                raise GateError(f"{name} of the {label} model is {v}, not a number: the gate cannot decide")
        if name in _PER_EXAMPLE:
            per_example = _PER_EXAMPLE[name]
            mine_each = per_example(candidate.probs, candidate.labels, k)
            deltas = (mine_each - per_example(other.probs, other.labels, k))[resamples].mean(axis=1)
        else:
            deltas = np.array(
                [
                    metric(candidate.probs[i], candidate.labels[i]) - metric(other.probs[i], other.labels[i])
                    for i in resamples
                ]
            )
        lo, hi = np.quantile(sign * deltas, [tail, 1.0 - tail])
        return Comparison(float(value), float(mine), float(sign * (mine - value)), (float(lo), float(hi)))

    return compare
