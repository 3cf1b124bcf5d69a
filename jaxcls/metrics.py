"""Classification metrics from integer labels: the same numbers at training time and in `jaxcls eval`."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def classification_report(labels, predictions, label_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix, as JSON-ready
    plain types. A class never predicted has precision 0 (not NaN), as scikit-learn's zero_division=0."""
    cm = confusion_matrix(labels, predictions, len(label_names))
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    n = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "n": n,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(label_names)},
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "confusion_matrix": cm.tolist(),
        "label_names": list(label_names),
    }
