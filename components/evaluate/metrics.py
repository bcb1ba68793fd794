"""Classification metrics of one model on the test split: a pure numpy core.

Every function takes the per-example results, ``probs`` (n x classes, each row a softmax
output) and ``labels`` (n integer class ids), so that the gate can recompute any metric on
paired bootstrap resamples of the same examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The gate's metrics and their direction live with the config that checks gate.metric.
from components.config.evaluate import GATE_METRICS
from components.config.evaluate import HIGHER_IS_BETTER as HIGHER_IS_BETTER

_EPSILON = 1e-7


@dataclass(frozen=True)
class Predictions:
    """One model's per-example results on the test split.

    Attributes:
        probs: float (n, classes) class probabilities.
        labels: int (n,) true class ids, in the same example order for every model compared.
    """

    probs: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.probs.ndim != 2 or self.labels.shape != (self.probs.shape[0],):
            raise ValueError(
                f"probs must be (n, classes) and labels (n,); got {self.probs.shape} and {self.labels.shape}"
            )

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def correct(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example: 1.0 where the most probable class is the true one."""
    return (probs.argmax(axis=1) == labels).astype(np.float64)


def top_k_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per example: 1.0 where the true class is among the ``k`` most probable (ties broken
    by class order, as ``argsort`` does)."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1).astype(np.float64)


def example_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example: negative log-probability of the true class (clipped at 1e-7)."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], _EPSILON, 1.0))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose most probable class is the true one."""
    return float(np.mean(correct(probs, labels)))


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose true class is among the ``k`` most probable."""
    return float(np.mean(top_k_hits(probs, labels, k)))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-7)."""
    return float(np.mean(example_log_loss(probs, labels)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE: the example-weighted gap between confidence and accuracy over ``bins`` equal-width
    confidence bins (Guo et al., 2017)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(confidence[members].mean() - correct[members].mean())
    return float(total / len(labels))


def confusion_matrix(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int (classes x classes): rows are true classes, columns predicted classes."""
    classes = probs.shape[1]
    index = labels * classes + probs.argmax(axis=1)
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where a
    class was never predicted or never present, as scikit-learn's zero_division=0)."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_positive), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 scores."""
    return float(per_class(confusion_matrix(probs, labels))["f1"].mean())


def metric_function(name: str, top_k: int = 5, bins: int = 10) -> Callable[[np.ndarray, np.ndarray], float]:
    """``(probs, labels) -> value`` for one of :data:`GATE_METRICS`.

    Raises:
        KeyError: ``name`` is not a metric the gate knows.
    """
    functions: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": accuracy,
        "top_k_accuracy": lambda p, y: top_k_accuracy(p, y, top_k),
        "macro_f1": macro_f1,
        "log_loss": log_loss,
        "ece": lambda p, y: expected_calibration_error(p, y, bins),
    }
    if name not in functions:
        raise KeyError(f"unknown metric '{name}'; valid: {', '.join(GATE_METRICS)}")
    return functions[name]


def effective_top_k(top_k: int, num_classes: int) -> int:
    """``top_k`` capped at classes - 1 (top-k over every class is always right), at least 1."""
    return max(1, min(top_k, num_classes - 1))


def evaluate(predictions: Predictions, classes: list[str], top_k: int = 5, bins: int = 10) -> dict[str, Any]:
    """Every metric of one model, as a JSON-ready dict (the report's and verdict's numbers).

    Raises:
        ValueError: no examples, or the class list does not match the probabilities.
    """
    if len(predictions) == 0:
        raise ValueError("no test examples to evaluate")
    if len(classes) != predictions.num_classes:
        raise ValueError(f"{len(classes)} class names for {predictions.num_classes} probability columns")
    probs, labels = predictions.probs.astype(np.float64), predictions.labels
    k = effective_top_k(top_k, len(classes))
    matrix = confusion_matrix(probs, labels)
    scores = per_class(matrix)
    return {
        "examples": len(predictions),
        "accuracy": accuracy(probs, labels),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(probs, labels, k),
        "macro_f1": float(scores["f1"].mean()),
        "log_loss": log_loss(probs, labels),
        "ece": expected_calibration_error(probs, labels, bins),
        "per_class": {
            name: {
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(scores["support"][i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
    }
