import numpy as np

from jaxcls.metrics import classification_report, confusion_matrix


def test_confusion_matrix_and_report_by_hand():
    y = [0, 0, 1, 1, 1, 2]
    p = [0, 1, 1, 1, 0, 1]
    assert confusion_matrix(y, p, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    r = classification_report(y, p, ["a", "b", "c"])
    assert r["accuracy"] == 0.5 and r["n"] == 6
    assert r["per_class"]["b"]["precision"] == 0.5 and r["per_class"]["b"]["recall"] == 2 / 3
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert np.isclose(r["per_class"]["a"]["f1"], 0.5)
