"""The gate's decide() table, and the metrics it decides on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from components.config import EvaluateConfig, GateConfig
from components.evaluate import metrics
from components.evaluate.gate import Champion, GateError, decide
from components.evaluate.metrics import Predictions

N, CLASSES = 200, 3
LABELS = np.arange(N) % CLASSES


def _model(right: int, *, offset: int = 0, confidence: float = 0.8) -> Predictions:
    """Right on examples [offset, offset + right) (wrapping), wrong (the next class) elsewhere."""
    correct = np.zeros(N, bool)
    correct[(offset + np.arange(right)) % N] = True
    predicted = np.where(correct, LABELS, (LABELS + 1) % CLASSES)
    probs = np.full((N, CLASSES), (1 - confidence) / (CLASSES - 1))
    probs[np.arange(N), predicted] = confidence
    return Predictions(probs, LABELS.copy())


BASE = _model(120)  # accuracy 0.60


@pytest.mark.parametrize(
    "case, candidate, gate, blessed, words",
    [
        ("clear win", _model(180), GateConfig(), True, "beats the baseline"),
        # 3 more right but 3 different examples wrong: +0.0150 in total, noise on 200 examples.
        ("win within noise", _model(123, offset=3), GateConfig(), False, "within noise"),
        ("tie", _model(120), GateConfig(), False, "within noise"),
        ("loss", _model(100), GateConfig(), False, "improves less than the required +0.0000"),
        ("win below the margin", _model(130), GateConfig(min_improvement=0.1), False, "improves less"),
        ("win above the margin", _model(180), GateConfig(min_improvement=0.2), True, "beats"),
        ("below the floor", _model(180), GateConfig(min_value=0.95), False, "not at least gate.min_value"),
        ("above the floor", _model(180), GateConfig(min_value=0.85), True, "beats"),
        ("margin -1 blesses a loser", _model(60), GateConfig(min_improvement=-1), True, "beats"),
        (
            "log loss: surer and right",
            _model(180, confidence=0.95),
            GateConfig(metric="log_loss"),
            True,
            "beats",
        ),
        ("macro f1", _model(180), GateConfig(metric="macro_f1"), True, "beats"),
        ("ece of a loser", _model(60), GateConfig(metric="ece"), False, "improves less"),
    ],
)
def test_decide_table(case, candidate, gate, blessed, words):
    verdict = decide(candidate, BASE, gate)
    assert verdict.blessed is blessed, verdict.reason
    assert words in verdict.reason
    assert verdict.test_examples == N
    lo, hi = verdict.confidence_interval
    assert lo <= verdict.delta <= hi


def test_clear_win_numbers():
    verdict = decide(_model(180), BASE, GateConfig())
    assert verdict.baseline == pytest.approx(0.6)
    assert verdict.candidate == pytest.approx(0.9)
    assert verdict.delta == pytest.approx(0.3)
    lo, hi = verdict.confidence_interval
    # 60 discordant pairs all in the candidate's favour: the paired difference is 0.3 * Binomial
    # spread; its 95% interval is roughly 0.3 +- 0.06.
    assert 0.2 < lo < 0.3 < hi < 0.4
    assert verdict.to_dict()["confidence_interval"] == [lo, hi]


def test_lower_is_better_metric_counts_a_drop_as_an_improvement():
    verdict = decide(_model(180, confidence=0.95), BASE, GateConfig(metric="log_loss"))
    assert verdict.candidate < verdict.baseline
    assert verdict.delta == pytest.approx(verdict.baseline - verdict.candidate)
    floor = decide(_model(180, confidence=0.95), BASE, GateConfig(metric="log_loss", min_value=0.01))
    assert not floor.blessed and "not at most gate.min_value" in floor.reason


def test_champion_better_than_candidate_blocks_it():
    champion = Champion(version=7, predictions=_model(198))
    verdict = decide(_model(180), BASE, GateConfig(compare_to_production=True), champion=champion)
    assert not verdict.blessed
    assert "production model is better" in verdict.reason
    assert verdict.champion["version"] == 7
    assert verdict.champion["passed"] is False
    assert verdict.champion["confidence_interval"][1] < 0


def test_champion_no_better_lets_the_candidate_through():
    champion = Champion(version=2, predictions=_model(180, offset=1))
    verdict = decide(_model(180), BASE, GateConfig(), champion=champion)
    assert verdict.blessed, verdict.reason
    assert verdict.champion["passed"] is True
    assert "not worse than production" in verdict.reason


def test_verdict_is_deterministic():
    first = decide(_model(125, offset=2), BASE, GateConfig())
    second = decide(_model(125, offset=2), BASE, GateConfig())
    assert first == second
    other_seed = decide(_model(125, offset=2), BASE, GateConfig(), EvaluateConfig(seed=1))
    assert other_seed.delta == first.delta


@pytest.mark.parametrize(
    "candidate, baseline, gate, message",
    [
        (_model(180), BASE, GateConfig(metric="f2"), "is not computed"),
        (
            Predictions(np.zeros((0, 3)), np.zeros(0, int)),
            Predictions(np.zeros((0, 3)), np.zeros(0, int)),
            GateConfig(),
            "no examples",
        ),
        (_model(180), Predictions(BASE.probs, np.roll(LABELS, 1)), GateConfig(), "not paired"),
        (Predictions(np.full((N, 3), np.nan), LABELS), BASE, GateConfig(metric="log_loss"), "not a number"),
    ],
)
def test_decide_refuses_to_guess(candidate, baseline, gate, message):
    with pytest.raises(GateError, match=message):
        decide(candidate, baseline, gate)


def test_metrics_on_a_small_hand_checked_case():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.3, 0.25, 0.45]])
    labels = np.array([0, 1, 1, 2, 1])  # predicted: 0, 1, 0, 2, 2
    result = metrics.evaluate(Predictions(probs, labels), ["a", "b", "c"], top_k=2, bins=10)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["top_k"] == 2
    assert result["top_k_accuracy"] == pytest.approx(4 / 5)  # only the last misses its top 2
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 1]]
    assert result["per_class"]["a"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert result["per_class"]["b"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3}
    )
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    assert result["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.4, 0.5, 0.25])))
    # Bins: 0.7 right; 0.6 right; 0.5 wrong and 0.5 right (one bin, no gap); 0.45 wrong.
    assert result["ece"] == pytest.approx((0.3 + 0.4 + 0.0 + 0.45) / 5)


def test_top_k_is_capped_below_the_class_count():
    assert metrics.effective_top_k(5, 3) == 2
    assert metrics.effective_top_k(5, 2) == 1
    assert metrics.effective_top_k(1, 1000) == 1


def test_gate_config_is_validated():
    from components.config import load_config
    from components.core.errors import ConfigError

    base = ["data.source=x", "run_dir=y"]
    with pytest.raises(ConfigError, match="gate.metric: unknown metric 'acuracy'.*accuracy"):
        load_config(None, [*base, "gate.metric=acuracy"])
    with pytest.raises(ConfigError, match="needs registry.uri"):
        load_config(None, [*base, "gate.compare_to_production=true"])
    config = load_config(None, [*base, "gate.min_value=0.9"])
    assert config.gate.min_value == 0.9
    assert load_config(None, [*base, "gate.min_value=null"]).gate.min_value is None
    assert dataclasses.asdict(load_config(None, base))["gate"]["min_improvement"] == 0.0
