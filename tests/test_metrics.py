"""Every metric against a small example worked out by hand (the arithmetic is in the comments)."""

import numpy as np
import pytest

from jaxcls.metrics import (best_f1_threshold, choice_report, classification_report, confusion_matrix, mcc,
                            multilabel_report, regression_report, roc_auc)


def test_confusion_matrix_and_report_by_hand():
    """Fails if weighted F1 weights by prediction counts instead of support, or MCC drops the
    chance term (planted: `c * s` only in the numerator)."""
    y = [0, 0, 1, 1, 1, 2]
    p = [0, 1, 1, 1, 0, 1]
    assert confusion_matrix(y, p, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    r = classification_report(y, p, ["a", "b", "c"])
    assert r["accuracy"] == 0.5 and r["n"] == 6 and r["micro_f1"] == 0.5
    assert r["per_class"]["b"]["precision"] == 0.5 and r["per_class"]["b"]["recall"] == 2 / 3
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert np.isclose(r["per_class"]["a"]["f1"], 0.5)
    # F1: a 1/2, b 4/7, c 0; supports 2, 3, 1 -> (1 + 12/7) / 6
    assert r["weighted_f1"] == pytest.approx(19 / 42)
    # Gorodkin: s = 6, c = 3, t = (2, 3, 1), p = (2, 4, 0): (18 - 16) / sqrt((36 - 20)(36 - 14))
    assert r["mcc"] == pytest.approx(2 / np.sqrt(16 * 22))


def test_mcc_binary_matches_the_two_by_two_formula_and_is_zero_when_undefined():
    """tp 2, fn 1, tn 1, fp 1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6. A constant prediction -> 0.
    Fails with the chance term dropped (planted as above)."""
    r = classification_report([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], ["n", "p"])
    assert r["mcc"] == pytest.approx(1 / 6)
    assert mcc(confusion_matrix([0, 1, 1], [1, 1, 1], 2)) == 0.0


Y = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 1]])
S = np.array([[0.9, 0.2], [0.4, 0.7], [0.3, 0.6], [0.6, 0.6], [0.1, 0.8]])


def test_multilabel_report_by_hand():
    """At threshold 0.5, x: tp 1 fp 1 fn 1 (F1 1/2, support 2); y: tp 3 fp 1 fn 0 (P 3/4, F1 6/7,
    support 3). Rows 2 and 4 are wrong (1 and 2 entries). ROC-AUC x: positives .9, .4 against
    negatives .3, .6, .1 win 3 + 2 of 6 pairs; y: .7, .6, .8 against .2, .6 win 2 + 1.5 (the tie)
    + 2 of 6. Fails if ties count as losses (planted: ordinal ranks in roc_auc) or the Hamming
    loss divides by rows only."""
    r = multilabel_report(Y, S >= 0.5, S, ["x", "y"])
    assert r["n"] == 5
    assert r["micro_f1"] == pytest.approx(8 / 11)  # tp 4, fp 2, fn 1
    assert r["macro_f1"] == pytest.approx((1 / 2 + 6 / 7) / 2)
    assert r["weighted_f1"] == pytest.approx((1 / 2 * 2 + 6 / 7 * 3) / 5)
    assert r["subset_accuracy"] == pytest.approx(3 / 5)
    assert r["hamming_loss"] == pytest.approx(3 / 10)
    assert r["per_class"]["y"] == pytest.approx({"precision": 3 / 4, "recall": 1.0, "f1": 6 / 7, "support": 3,
                                                 "roc_auc": 11 / 12})
    assert r["per_class"]["x"]["roc_auc"] == pytest.approx(5 / 6)
    assert r["roc_auc_macro"] == pytest.approx(7 / 8)


def test_roc_auc_of_a_one_class_label_is_null_and_left_out_of_the_macro():
    """Fails if an undefined AUC enters the macro as 0 or 0.5."""
    y3 = np.column_stack([Y, np.zeros(5, int)])
    s3 = np.column_stack([S, np.full(5, 0.1)])
    r = multilabel_report(y3, s3 >= 0.5, s3, ["x", "y", "z"])
    assert r["per_class"]["z"]["roc_auc"] is None
    assert r["roc_auc_macro"] == pytest.approx(7 / 8)
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    assert multilabel_report(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), ["z"])["roc_auc_macro"] is None


def test_regression_report_by_hand():
    """y 1 2 3 4, predictions 1.5 2 2 5: errors .5 0 -1 1. Pearson: centred y (-1.5 -.5 .5 1.5),
    centred p (-1.125 -.625 -.625 2.375): 5.25 / sqrt(5 * 7.6875). Spearman: ranks of p are
    1 2.5 2.5 4 (the tie averaged): 4.5 / sqrt(5 * 4.5). Fails if Spearman ranks ties in order
    (planted: rankdata(method='ordinal'))."""
    r = regression_report([[1], [2], [3], [4]], [[1.5], [2], [2], [5]], ["t"])
    assert r["n"] == 4
    assert r["mse"] == pytest.approx(2.25 / 4) and r["mae"] == pytest.approx(2.5 / 4)
    assert r["pearson"] == pytest.approx(5.25 / np.sqrt(5 * 7.6875))
    assert r["spearman"] == pytest.approx(np.sqrt(0.9))
    assert r["per_target"]["t"]["mse"] == r["mse"]


def test_regression_correlation_of_a_constant_is_null_and_targets_average():
    r = regression_report([[1, 0], [2, 1], [3, 0]], [[1, 5], [1, 6], [1, 5]], ["a", "b"])
    assert r["per_target"]["a"]["pearson"] is None and r["per_target"]["b"]["pearson"] == pytest.approx(1.0)
    assert r["pearson"] == pytest.approx(1.0)  # the mean over the targets where it is defined
    assert r["mse"] == pytest.approx((0 + 1 + 4 + 25 + 25 + 25) / 6)


def test_choice_accuracy():
    """Fails if the report compares against a shifted index (planted: p + 1)."""
    assert choice_report([0, 2, 1, 1], [0, 2, 0, 1]) == {"n": 4, "accuracy": 0.75}


def test_best_f1_threshold_ties_go_to_the_candidate_nearest_the_default():
    """docs/tasks.md: among equal F1s the candidate nearest 0.5 wins. Scores .95 .75 .6 .45 .3 .1:
    labels 1 1 0 0 1 1 tie at thresholds .2 and .675 (F1 2/3; .675 is nearer), labels 1 0 0 1 0 0
    at .375 and .85 (F1 2/3; .375 is nearer). Fails if the lowest tied candidate wins (planted:
    `best[0]`) or the farthest does (planted: argmax for argmin)."""
    scores = [0.95, 0.75, 0.6, 0.45, 0.3, 0.1]
    assert best_f1_threshold([1, 1, 0, 0, 1, 1], scores) == pytest.approx(0.675)
    assert best_f1_threshold([1, 0, 0, 1, 0, 0], scores) == pytest.approx(0.375)


def test_best_f1_threshold_by_hand():
    """labels 1 1 0 1 0, scores .9 .35 .3 .32 .1. At 0.5 only .9 is positive: F1 1/2. Midpoint
    candidates .2 (F1 6/7), .31 (all three positives, no negative: F1 1), .335 (4/5), .625 (1/2).
    Fails if only the default is tried (planted: candidates = [default])."""
    assert best_f1_threshold([1, 1, 0, 1, 0], [0.9, 0.35, 0.3, 0.32, 0.1]) == pytest.approx(0.31)
    assert best_f1_threshold([0, 0, 0], [0.2, 0.6, 0.9]) == 0.5  # nothing beats the default: kept
