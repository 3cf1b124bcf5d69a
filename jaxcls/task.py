"""The task seam: what the head outputs, the loss it trains, how its outputs become predictions
and which metrics report them. The train step, evaluation, the Predictor, the server and the saved
classifier folder all read one Task, so a new task type is added here and in nothing else.

A task is a frozen, hashable dataclass: it travels into jitted steps as static data."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.metrics import classification_report


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax on the host, computed in float64 and returned as float32."""
    z = np.asarray(logits, np.float64)
    if z.size == 0:
        return z.astype(np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SingleLabel:
    """One of K labels: softmax cross-entropy on the pooled token's K logits (the book's task)."""

    kind: ClassVar[str] = "single"
    label_names: tuple[str, ...]
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
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
        """The head's width."""
        return len(self.label_names)

    # ---- inside jit ----
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

    # ---- on the host ----
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Predicted label ids straight from logits (training-time metrics)."""
        return np.argmax(logits, axis=-1)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted label ids."""
        return np.argmax(probs, axis=-1)

    def report(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix."""
        preds = self.predictions(logits) if len(logits) else np.zeros(0, int)
        return classification_report(labels, preds, self.label_names)

    def to_json(self) -> dict[str, Any]:
        """What a saved classifier records (training-only settings such as smoothing are not)."""
        return {"type": self.kind}


TASKS = {SingleLabel.kind: SingleLabel}


def task_from_json(obj: dict | None, label_names: Sequence[str], *, source: str = "classifier.json"):
    """The task a saved classifier was trained for; folders from before the field are single-label."""
    kind = "single" if obj is None else obj.get("type")
    if kind not in TASKS:
        raise CheckpointError(f"{source}: unknown task type {kind!r}; known: {', '.join(TASKS)}")
    return TASKS[kind](tuple(label_names))


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
