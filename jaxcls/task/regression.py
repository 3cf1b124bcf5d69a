"""Regression: K real targets, mean squared error (Hugging Face's regression problem_type)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls.errors import ConfigError
from jaxcls.metrics import regression_report
from jaxcls.task.base import TaskBase, float_tuple


@dataclasses.dataclass(frozen=True)
class Regression(TaskBase):
    """K outputs trained by mean squared error (averaged over the targets of an example). Labels
    are float32 targets (B, K) in their own units. With `target_mean`/`target_std` the head learns
    standardised targets, (y - mean) / std, and `probabilities` (the predicted values) undo it, so
    a target in the thousands does not start with a loss in the millions."""

    kind: ClassVar[str] = "regression"
    primary_metric: ClassVar[str] = "mse"
    label_names: tuple[str, ...]  # one name per target
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    def __post_init__(self):
        self._check_layout()
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        k = len(self.label_names)
        if k < 1:
            raise ConfigError("a regression task needs at least one target name")
        if (self.target_mean is None) != (self.target_std is None):
            raise ConfigError("target_mean and target_std go together: give both or neither")
        object.__setattr__(self, "target_mean", float_tuple(self.target_mean, "target_mean", k))
        object.__setattr__(self, "target_std", float_tuple(self.target_std, "target_std", k, positive=True))

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def _scale(self):
        k = self.num_outputs
        if self.target_mean is None:
            return np.zeros(k, np.float32), np.ones(k, np.float32)
        return np.asarray(self.target_mean, np.float32), np.asarray(self.target_std, np.float32)

    def loss_terms(self, logits: jax.Array, labels: jax.Array, weights: jax.Array):
        """(sum of weighted per-example squared errors in standardised units, sum of weights)."""
        mean, std = self._scale()
        z = (labels.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)
        return jnp.sum(weights * jnp.mean((logits - z) ** 2, axis=-1)), jnp.sum(weights)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The predicted values, in the targets' own units."""
        mean, std = self._scale()
        return (np.asarray(logits, np.float32) * std + mean).astype(np.float32)

    def decide(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float32)

    def report(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        """MSE and MAE in the targets' units, Pearson and Spearman correlation."""
        values = self.probabilities(np.asarray(logits, np.float32).reshape(-1, self.num_outputs))
        return regression_report(labels, values, self.label_names)

    def standardised(self, train_targets: np.ndarray) -> "Regression":
        """The same task standardising by the mean and standard deviation of the training targets
        (a constant target keeps std 1)."""
        y = np.asarray(train_targets, np.float64).reshape(-1, self.num_outputs)
        if not len(y):
            raise ConfigError("standardisation needs at least one training target")
        std = y.std(axis=0)
        return dataclasses.replace(self, target_mean=tuple(y.mean(axis=0)),
                                   target_std=tuple(np.where(std > 0, std, 1.0)))

    def _saved(self) -> dict[str, Any]:
        if self.target_mean is None:
            return {}
        return {"target_mean": list(self.target_mean), "target_std": list(self.target_std)}
