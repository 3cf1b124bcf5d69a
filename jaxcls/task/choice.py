"""Multiple choice: one score per option row, softmax over the options of an example (GPT-1)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcls.errors import ConfigError
from jaxcls.metrics import choice_report
from jaxcls.task.base import Inputs, TaskBase, softmax


@dataclasses.dataclass(frozen=True)
class Choice(TaskBase):
    """Up to `num_choices` options per example, each its own row `context delimiter option`. The
    head has width 1: one score per row; an example's logits are its rows' scores (B, num_choices).
    A missing option is a row of length 0 and its logit is -inf, so it has probability 0 and takes
    no part in the softmax: an example is never padded with fake options. Labels are int32 option
    indices (B,)."""

    kind: ClassVar[str] = "choice"
    primary_metric: ClassVar[str] = "accuracy"
    num_choices: int
    inputs: Inputs = dataclasses.field(default=Inputs("choice"), kw_only=True)

    def __post_init__(self):
        if self.inputs.kind != "choice":
            raise ConfigError(f"the choice task needs the choice layout, got {self.inputs.kind!r}")
        if not isinstance(self.num_choices, (int, np.integer)) or self.num_choices < 2:
            raise ConfigError(f"num_choices must be an integer >= 2, got {self.num_choices!r}")
        object.__setattr__(self, "num_choices", int(self.num_choices))

    @property
    def name(self) -> str:
        return "choice"

    @property
    def label_names(self) -> tuple[str, ...]:
        """Option indices '0'..'N-1' (the columns of the probabilities)."""
        return tuple(str(i) for i in range(self.num_choices))

    @property
    def num_outputs(self) -> int:
        return self.num_choices

    @property
    def head_width(self) -> int:
        return 1

    @property
    def rows_per_example(self) -> int:
        return self.num_choices

    def logits_from_features(self, head, features: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """(B*N, C) -> (B, N): the head's one score per row; rows with length 0 -> -inf."""
        scores = head(features)[:, 0].reshape(-1, self.num_choices)
        if lengths is None:
            return scores
        return jnp.where(jnp.reshape(lengths, scores.shape) > 0, scores, -jnp.inf)

    def loss_terms(self, logits: jax.Array, labels: jax.Array, weights: jax.Array):
        """Softmax cross-entropy over the present options (those whose logit is not -inf). An
        example with no option at all adds nothing, not even weight; a NaN logit stays NaN."""
        present = logits != -jnp.inf
        has_any = jnp.any(present, axis=-1)
        safe = jnp.where(has_any[:, None], logits, 0.0)  # no -inf - (-inf) for an empty example
        ce = optax.softmax_cross_entropy_with_integer_labels(safe, labels)
        weights = jnp.where(has_any, weights, 0.0)
        return jnp.sum(jnp.where(has_any, weights * ce, 0.0)), jnp.sum(weights)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Each option's probability; 0 for a missing option."""
        return softmax(logits)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The chosen option's index."""
        return np.argmax(probs, axis=-1)

    def report(self, labels: np.ndarray, logits: np.ndarray) -> dict:
        preds = self.predictions(logits) if len(logits) else np.zeros(0, int)
        return choice_report(labels, preds)

    def _saved(self) -> dict[str, Any]:
        return {"num_choices": self.num_choices}
