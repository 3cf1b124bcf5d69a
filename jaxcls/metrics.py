"""Metrics for every task type, in NumPy: the same numbers at training time and in `jaxcls eval`.
Each function returns JSON-ready plain types; a value that is undefined for the data (a correlation
of a constant, the ROC-AUC of a label with one class only) is None, written as null."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _rankdata(values):
    """scipy's average ranks, imported on first use: scipy.stats costs 0.4 s at every start."""
    from scipy.stats import rankdata

    return rankdata(values)


def _ratio(num, den) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _f1(tp, fp, fn) -> np.ndarray:
    """2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall, 0 when both are 0."""
    tp = np.asarray(tp, np.float64)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def mcc(cm: np.ndarray) -> float:
    """Matthews correlation from a K x K confusion matrix (Gorodkin's multiclass form; for K = 2 the
    familiar (tp tn - fp fn) / sqrt(...)). 0 when a margin is constant, as scikit-learn returns."""
    cm = np.asarray(cm, np.float64)
    s, c = cm.sum(), np.trace(cm)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    den = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / den) if den > 0 else 0.0


def classification_report(labels, predictions, label_names: Sequence[str]) -> dict:
    """Single-label: accuracy (= micro F1), per-class precision/recall/F1/support, macro and
    support-weighted F1, Matthews correlation and the confusion matrix."""
    cm = confusion_matrix(labels, predictions, len(label_names))
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _f1(tp, predicted - tp, support - tp)
    n = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "n": n,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(label_names)},
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "micro_f1": float(tp.sum() / n) if n else 0.0,
        "weighted_f1": float(f1 @ support / n) if n else 0.0,
        "mcc": mcc(cm),
        "confusion_matrix": cm.tolist(),
        "label_names": list(label_names),
    }


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve of one binary label: the chance that a random positive scores above
    a random negative, ties counting one half (the Mann-Whitney U over average ranks). None when
    the labels hold one class only: the curve is undefined."""
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _rankdata(np.asarray(scores, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_report(labels, predictions, scores, label_names: Sequence[str]) -> dict:
    """Multi-label, from 0/1 matrices (n, K) and the scores (probabilities) that ROC-AUC ranks:
    micro/macro/weighted F1, per-label precision/recall/F1/support/ROC-AUC, subset accuracy
    (every label right), Hamming loss (the fraction of wrong label decisions) and the macro ROC-AUC
    over the labels where it is defined (None if none is)."""
    y = np.asarray(labels).astype(bool).reshape(-1, len(label_names))
    p = np.asarray(predictions).astype(bool).reshape(y.shape)
    scores = np.asarray(scores, np.float64).reshape(y.shape)
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    support = y.sum(0)
    precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _f1(tp, fp, fn)
    aucs = [roc_auc(y[:, k], scores[:, k]) for k in range(y.shape[1])]
    defined = [a for a in aucs if a is not None]
    n = len(y)
    return {
        "n": n,
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "weighted_f1": float(f1 @ support / support.sum()) if support.sum() else 0.0,
        "subset_accuracy": float(np.all(y == p, axis=1).mean()) if n else 0.0,
        "hamming_loss": float((y != p).mean()) if y.size else 0.0,
        "roc_auc_macro": float(np.mean(defined)) if defined else None,
        "per_class": {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                             "support": int(support[k]), "roc_auc": aucs[k]}
                      for k, name in enumerate(label_names)},
        "label_names": list(label_names),
    }


def best_f1_threshold(labels, scores, default: float = 0.5) -> float:
    """The decision threshold (predict positive when score >= t) with the highest F1 for one label.
    Candidates are the midpoints between consecutive distinct scores, so a tuned threshold never
    sits exactly on a validation score; `default` is kept unless a candidate beats its F1, and among
    equal F1s the candidate nearest `default` wins."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    distinct = np.unique(s)
    candidates = np.concatenate([[default], (distinct[1:] + distinct[:-1]) / 2])
    pred = s[None, :] >= candidates[:, None]
    tp = (pred & y).sum(1)
    f1 = _f1(tp, pred.sum(1) - tp, y.sum() - tp)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - default))]])


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else None


def regression_report(targets, predictions, target_names: Sequence[str]) -> dict:
    """Mean squared and absolute error over every value, Pearson and Spearman correlation (Pearson
    of average ranks, so ties share a rank) averaged over the targets, and each target's own.
    A correlation with a constant side is None and left out of the average."""
    y = np.asarray(targets, np.float64).reshape(-1, len(target_names))
    p = np.asarray(predictions, np.float64).reshape(y.shape)
    per = {}
    for k, name in enumerate(target_names):
        yk, pk = y[:, k], p[:, k]
        per[name] = {"mse": float(np.mean((pk - yk) ** 2)) if len(yk) else 0.0,
                     "mae": float(np.mean(np.abs(pk - yk))) if len(yk) else 0.0,
                     "pearson": _pearson(yk, pk) if len(yk) > 1 else None,
                     "spearman": _pearson(_rankdata(yk), _rankdata(pk)) if len(yk) > 1 else None}

    def mean_of(key):
        vals = [m[key] for m in per.values() if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"n": len(y), "mse": float(np.mean((p - y) ** 2)) if y.size else 0.0,
            "mae": float(np.mean(np.abs(p - y))) if y.size else 0.0,
            "pearson": mean_of("pearson"), "spearman": mean_of("spearman"),
            "per_target": per, "label_names": list(target_names)}


def choice_report(labels, predictions) -> dict:
    """Multiple choice: the fraction of examples whose chosen option is the right one."""
    y, p = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    return {"n": len(y), "accuracy": float(np.mean(y == p)) if len(y) else 0.0}
