"""`jaxcls classify` and `jaxcls eval` end to end on a tiny random classifier saved to disk."""

import csv
import io
import json

import numpy as np
import pytest

from conftest import SMS, TOKENIZER_DIR, requires_shared
from jaxcls.classifier import Classifier
from jaxcls.cli import main

pytestmark = requires_shared
TEXTS = ["WINNER!! You have won a £1000 prize, call now", "Are we still on for lunch?", "ok 👍",
         "naïve café", "Free entry in 2 a wkly comp to win FA Cup final tkts"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clf")
    clf = Classifier.from_pretrained("tiny", label_names=["ham", "spam"], weights="random",
                                     tokenizer=TOKENIZER_DIR, seed=3)
    clf.save(folder)
    return folder


@pytest.fixture(scope="module")
def clf(model_dir):
    return Classifier.load(model_dir)


def expected(clf, texts):
    ids, probs = clf.predictor(batch_size=32, long="truncate").predict(texts)
    return [clf.label_names[i] for i in ids], probs


def test_classify_texts_prints_a_table(model_dir, clf, capsys):
    assert main(["classify", "--model", str(model_dir), *TEXTS[:3]]) == 0
    out = capsys.readouterr().out
    labels, probs = expected(clf, TEXTS[:3])
    assert "label" in out and "probability" in out and "Are we still on for lunch?" in out
    for label, p in zip(labels, probs.max(-1)):
        assert f"{p:.4f}" in out


def test_classify_input_file_to_output(model_dir, clf, tmp_path, capsys):
    src = tmp_path / "in.txt"
    long_text = "spam " * 100  # over the 64-token context
    src.write_text("\n".join(TEXTS + [long_text]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--chunk-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "classified 6 texts" in err and "1 of 6 texts had more than 64 tokens" in err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    labels, probs = expected(clf, TEXTS + [long_text.rstrip("\r\n")])
    assert [r["text"] for r in rows] == TEXTS + [long_text]
    assert [r["label"] for r in rows] == labels
    np.testing.assert_allclose([list(r["probs"].values()) for r in rows], probs, atol=1e-5)

    csv_out = tmp_path / "out.csv"
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--output", str(csv_out),
                 "--top-k", "1", "--long", "sliding", "--quiet"]) == 0
    rows = list(csv.DictReader(open(csv_out, newline="", encoding="utf-8")))
    assert len(rows) == 6 and list(rows[0]) == ["text", "label", "probability", "label_1", "prob_1"]
    assert capsys.readouterr().err == ""


def test_classify_csv_and_stdin_to_stdout(model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "message"])
        w.writerows([i, t] for i, t in enumerate(TEXTS))
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--text-column", "message",
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS[:2]).encode())))
    assert main(["classify", "--model", str(model_dir), "--input", "-", "--quiet"]) == 0
    stdin_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert stdin_rows == rows[:2]


def test_classify_usage_errors(model_dir, tmp_path, capsys):
    assert main(["classify", "--model", str(model_dir)]) == 2
    assert "nothing to classify" in capsys.readouterr().err
    assert main(["classify", "--model", str(model_dir), "a", "--input", "x.txt"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["classify", "--model", str(model_dir), "a", "--output", str(tmp_path / "o.xml")]) == 2
    assert "unknown output type" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path), "a"]) == 2
    assert "classifier.json" in capsys.readouterr().err


def write_labelled(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def test_eval_json_and_tables(model_dir, clf, tmp_path, capsys):
    data = tmp_path / "data.csv"
    rows = [(t, "spam" if i % 3 == 0 else "ham") for i, t in enumerate(TEXTS * 3)]
    write_labelled(data, rows)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--split", "all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels, _ = expected(clf, [t for t, _ in rows])
    truth = [label for _, label in rows]
    assert report["n"] == 15 and report["label_names"] == ["ham", "spam"]
    assert report["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(labels, truth)]))
    cm = np.zeros((2, 2), int)
    for t, p in zip(truth, labels):
        cm[["ham", "spam"].index(t), ["ham", "spam"].index(p)] += 1
    assert report["confusion_matrix"] == cm.tolist()

    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 0  # the seeded test split
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "precision" in out

    write_labelled(data, rows + [("what", "eggs")])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--split", "all"]) == 2
    assert "'eggs'" in capsys.readouterr().err


def test_eval_sms_spam_test_split(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", "sms-spam", "--data-path", str(SMS),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 300 and report["data"] == "sms-spam:test"
    assert sum(map(sum, report["confusion_matrix"])) == 300 and report["long_texts"] > 0
