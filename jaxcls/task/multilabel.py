"""Multi-label classification: K independent yes/no labels (Hugging Face's
multi_label_classification)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcls.errors import ConfigError
from jaxcls.metrics import best_f1_threshold, multilabel_report
from jaxcls.task.base import TaskBase, float_tuple, sigmoid

DEFAULT_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class MultiLabel(TaskBase):
    """K sigmoid outputs with binary cross-entropy, averaged over the labels of an example (as
    torch's BCEWithLogitsLoss averages). Labels are float32 multi-hot (B, K). `pos_weight[k]`
    multiplies the loss of label k's positives (torch's pos_weight); `thresholds[k]` is the
    probability at or above which label k is predicted."""

    kind: ClassVar[str] = "multilabel"
    primary_metric: ClassVar[str] = "micro_f1"
    label_names: tuple[str, ...]
    thresholds: tuple[float, ...] | None = None  # None: 0.5 for every label
    pos_weight: tuple[float, ...] | None = None

    def __post_init__(self):
        self._check_layout()
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        k = len(self.label_names)
        if k < 1:
            raise ConfigError("a multi-label task needs at least one label name")
        thresholds = (DEFAULT_THRESHOLD,) * k if self.thresholds is None else self.thresholds
        object.__setattr__(self, "thresholds", float_tuple(thresholds, "thresholds", k, unit=True))
        object.__setattr__(self, "pos_weight", float_tuple(self.pos_weight, "pos_weight", k, positive=True))

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def loss_terms(self, logits: jax.Array, labels: jax.Array, weights: jax.Array):
        """(sum of weighted per-example losses, sum of weights), as SingleLabel's."""
        labels = labels.astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, labels)
        if self.pos_weight is not None:
            # -(w y log p + (1 - y) log(1 - p)) = optax's BCE plus (w - 1) times the positive term
            pw = jnp.asarray(self.pos_weight, jnp.float32)
            bce = bce - (pw - 1.0) * labels * jax.nn.log_sigmoid(logits)
        return jnp.sum(weights * bce.mean(axis=-1)), jnp.sum(weights)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Each label's own probability (the rows do not sum to 1)."""
        return sigmoid(logits)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """0/1 (n, K): label k where its probability is at or above its threshold."""
        return (np.asarray(probs) >= np.asarray(self.thresholds, np.float32)).astype(np.int32)

    def report(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        """Micro/macro/weighted F1, per-label scores and ROC-AUC, subset accuracy, Hamming loss,
        with the thresholds that made the decisions."""
        logits = np.asarray(logits, np.float32).reshape(-1, self.num_outputs)
        probs = self.probabilities(logits)
        return {**multilabel_report(labels, self.decide(probs), probs, self.label_names),
                "thresholds": list(self.thresholds)}

    def with_tuned_thresholds(self, labels: np.ndarray, probs: np.ndarray) -> "MultiLabel":
        """The same task with each label's threshold tuned for F1 on (validation) probabilities."""
        return dataclasses.replace(self, thresholds=tune_thresholds(labels, probs))

    def _saved(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}


def tune_thresholds(labels: np.ndarray, probs: np.ndarray,
                    default: float = DEFAULT_THRESHOLD) -> tuple[float, ...]:
    """Per label, the threshold with the best F1 on these probabilities (metrics.best_f1_threshold)."""
    y, p = np.asarray(labels), np.asarray(probs)
    if y.shape != p.shape or y.ndim != 2:
        raise ConfigError(f"tune_thresholds: labels {y.shape} and probabilities {p.shape} must be equal (n, K)")
    return tuple(best_f1_threshold(y[:, k], p[:, k], default) for k in range(y.shape[1]))


def pos_weights(spec: str, train_labels: np.ndarray) -> tuple[float, ...] | None:
    """'none', 'auto' (negatives / positives per label, the ratio torch's documentation suggests; 1
    for a label with no positives or no negatives) or explicit comma-separated weights."""
    y = np.asarray(train_labels, np.float64)
    if spec == "none":
        return None
    if spec == "auto":
        pos, neg = y.sum(axis=0), (1 - y).sum(axis=0)
        return tuple(float(n / p) if p > 0 and n > 0 else 1.0 for p, n in zip(pos, neg))
    return float_tuple(spec.split(","), "pos_weight", y.shape[1], positive=True)
