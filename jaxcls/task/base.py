"""What every task type shares: the input layout (how many rows of tokens an example is, and how
their pooled features become one example's logits) and the JSON and naming around it."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from jaxcls.errors import ConfigError

LAYOUTS = ("text", "pair", "similarity", "choice")
# GPT-2's only special token: already in every checkpoint's embedding table (no new rows to train),
# and the separator GPT-2 pair classifiers such as DialogRPT use.
DEFAULT_DELIMITER = "<|endoftext|>"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax on the host, computed in float64 and returned as float32. Entries of -inf
    (missing options) get probability 0; a row with nothing but -inf gets all zeros."""
    z = np.asarray(logits, np.float64)
    if z.size == 0:
        return z.astype(np.float32)
    top = z.max(axis=-1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic on the host, float32, without overflow warnings (scipy's, imported
    here: scipy.special adds 0.1 s to every start)."""
    from scipy.special import expit

    return expit(np.asarray(logits, np.float64)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The input layout. `text`: one text, one row. `pair`: text, delimiter, text_pair as ONE row
    (only the data side differs). `similarity`: both orders of the pair as TWO rows whose pooled
    features are summed before the head (GPT-1, section 3.3). `choice`: one row per option,
    `context delimiter option`, with the Choice objective."""

    kind: str = "text"
    delimiter: str = DEFAULT_DELIMITER

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ConfigError(f"unknown input layout {self.kind!r}; choose from {', '.join(LAYOUTS)}")
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ConfigError(f"the delimiter must be a non-empty string, got {self.delimiter!r}")

    @property
    def joins_texts(self) -> bool:
        """Whether the data side joins two parts with the delimiter."""
        return self.kind != "text"

    def to_json(self) -> dict[str, Any]:
        return {} if self.kind == "text" else {"inputs": self.kind, "delimiter": self.delimiter}


@dataclasses.dataclass(frozen=True)
class TaskBase:
    """The protocol every task type follows. Inside jit: `logits_from_features` and `loss_terms`.
    On the host: `probabilities`, `decide`, `predictions`, `report`, `score`, `to_json`."""

    kind: ClassVar[str]
    primary_metric: ClassVar[str]  # the report key `score` returns (progress lines, early evaluation)
    inputs: Inputs = dataclasses.field(default=Inputs(), kw_only=True)

    def _check_layout(self):
        if self.inputs.kind == "choice":
            raise ConfigError(f"the choice layout goes with the choice task, not {self.kind!r}")

    @property
    def name(self) -> str:
        """The `--task` value that builds this task: 'multilabel', 'pair-regression', 'similarity'..."""
        if self.inputs.kind == "text":
            return self.kind
        return self.inputs.kind if self.kind == "single" else f"{self.inputs.kind}-{self.kind}"

    @property
    def rows_per_example(self) -> int:
        """Rows of tokens per example in a batch: 2 for similarity (both orders), else 1."""
        return 2 if self.inputs.kind == "similarity" else 1

    @property
    def head_width(self) -> int:
        """The head's output features (the model's `num_classes`)."""
        return self.num_outputs

    def logits_from_features(self, head, features: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Pooled final features of the flattened rows (B*R, C), rows of one example adjacent,
        -> logits (B, num_outputs): the head on the one row, or on the sum of the two orders."""
        rows = self.rows_per_example
        if rows == 1:
            return head(features)
        return head(features.reshape(-1, rows, features.shape[-1]).sum(axis=1))

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Decisions straight from logits (training-time metrics)."""
        return self.decide(self.probabilities(logits))

    def score(self, labels: np.ndarray, logits: np.ndarray) -> float | None:
        """The task's headline number (`primary_metric` of the report)."""
        return self.report(labels, logits)[self.primary_metric]

    def _saved(self) -> dict[str, Any]:
        """Task-specific fields a saved classifier needs to predict (thresholds, standardisation...)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """What a saved classifier records; training-only settings (smoothing, class or positive
        weights) are not. Plain single-label text stays `{"type": "single"}` as before."""
        return {"type": self.kind, **self.inputs.to_json(), **self._saved()}


def float_tuple(values, what: str, size: int, *, positive: bool = False,
                unit: bool = False) -> tuple[float, ...] | None:
    """`values` as a tuple of `size` finite floats (None stays None), or a ConfigError naming `what`."""
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected {size} numbers, got {values!r}") from None
    if len(out) != size:
        raise ConfigError(f"{what}: need {size} numbers (one per label), got {len(out)}")
    if not all(np.isfinite(out)):
        raise ConfigError(f"{what}: every value must be finite, got {values!r}")
    if positive and min(out, default=1.0) <= 0:
        raise ConfigError(f"{what}: every value must be > 0, got {values!r}")
    if unit and not all(0.0 <= v <= 1.0 for v in out):
        raise ConfigError(f"{what}: every value must be in [0, 1], got {values!r}")
    return out
