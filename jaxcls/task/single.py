"""Single-label classification: one of K labels (the book's task, Hugging Face's
single_label_classification)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcls.errors import ConfigError
from jaxcls.metrics import classification_report
from jaxcls.task.base import TaskBase, softmax


@dataclasses.dataclass(frozen=True)
class SingleLabel(TaskBase):
    """One of K labels: softmax cross-entropy on the K logits. Labels are int32 ids (B,)."""

    kind: ClassVar[str] = "single"
    primary_metric: ClassVar[str] = "accuracy"
    label_names: tuple[str, ...]
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self._check_layout()
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        if len(self.label_names) < 1:
            raise ConfigError("a single-label task needs at least one label name")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
            if len(self.class_weights) != self.num_outputs:
                raise ConfigError(f"class_weights: need {self.num_outputs} weights, got {len(self.class_weights)}")

    @classmethod
    def with_classes(cls, num_classes: int, **kw) -> "SingleLabel":
        """Label names '0'..'K-1', for numeric-only use."""
        return cls(tuple(str(i) for i in range(num_classes)), **kw)

    @property
    def num_outputs(self) -> int:
        """Logits per example (= the head's width)."""
        return len(self.label_names)

    def loss_terms(self, logits: jax.Array, labels: jax.Array, weights: jax.Array):
        """(sum of weighted per-example losses, sum of weights): the ratio is the batch loss, and
        sums add up exactly across micro-batches, which makes accumulation equal a larger batch."""
        targets = jax.nn.one_hot(labels, self.num_outputs)
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets)
        if self.class_weights is not None:
            weights = weights * jnp.asarray(self.class_weights, jnp.float32)[labels]
        return jnp.sum(weights * ce), jnp.sum(weights)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Predicted label ids straight from logits."""
        return np.argmax(logits, axis=-1)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted label ids."""
        return np.argmax(probs, axis=-1)

    def report(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        """Accuracy, per-class precision/recall/F1, macro/micro/weighted F1, Matthews correlation
        and the confusion matrix."""
        preds = self.predictions(logits) if len(logits) else np.zeros(0, int)
        return classification_report(labels, preds, self.label_names)


def class_weights(spec: str, train_labels: np.ndarray, num_classes: int) -> tuple[float, ...] | None:
    """'none', 'balanced' (n / (classes * count), scikit-learn's rule) or explicit weights."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
        return tuple(float(len(train_labels) / (num_classes * max(c, 1))) for c in counts)
    try:
        weights = tuple(float(w) for w in spec.split(","))
    except ValueError:
        raise ConfigError(f"class_weights: {spec!r} is not 'none', 'balanced' or "
                          "comma-separated numbers") from None
    if len(weights) != num_classes or min(weights) < 0:
        raise ConfigError(f"class_weights: need {num_classes} non-negative numbers, got {spec!r}")
    return weights
