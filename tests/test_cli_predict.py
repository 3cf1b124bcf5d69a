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


def test_classify_texts_top_k_adds_the_ranked_classes(model_dir, clf, capsys):
    """`--top-k 2` on TEXT arguments adds a `top 2` column: both classes, most likely first, with
    their probabilities. Fails if the column is not drawn (planted: show_top = False)."""
    assert main(["classify", "--model", str(model_dir), "--top-k", "2", TEXTS[1]]) == 0
    out = capsys.readouterr().out
    _, probs = expected(clf, TEXTS[1:2])
    names = [clf.label_names[j] for j in np.argsort(-probs[0], kind="stable")]
    assert "top 2" in out
    assert f"{names[0]} {probs[0].max():.3f}, {names[1]} {probs[0].min():.3f}" in out, out


def test_invalid_utf8_lines_are_classified_and_counted(model_dir, clf, tmp_path, capsys):
    """docs/predict.md: invalid UTF-8 does not stop classify; bad bytes are read as U+FFFD, every
    line keeps its prediction, and one warning names how many lines and the first. Fails if the
    warning is not printed (planted: its err.print removed) or a bad line is dropped."""
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine text\nbad \xff byte\nalso fine\n\xfe\xfe again bad\n")
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: 2 lines of {src} were not valid UTF-8 (first: line 2); bad bytes were read as U+FFFD"
            in err.replace("\n", " ")), err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["fine text", "bad \ufffd byte", "also fine", "\ufffd\ufffd again bad"]
    labels, _ = expected(clf, [r["text"] for r in rows])
    assert [r["label"] for r in rows] == labels


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


def write_labelled(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
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

    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "precision" in out

    write_labelled(data, rows + [("what", "eggs")])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--split", "all"]) == 2
    assert "'eggs'" in capsys.readouterr().err


def test_eval_sms_spam_uses_the_seed_training_recorded(model_dir, clf, tmp_path, capsys):
    """A run trained on sms-spam with --seed 7 is scored on seed 7's test split, and another seed
    is refused. Fails if the recorded seed is ignored (planted: `recorded = None` in _split_seed)."""
    from jaxcls.data import load_sms_spam

    run = tmp_path / "run"
    run.mkdir()
    for f in model_dir.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "metrics.json").write_text(json.dumps({"config": {"data": "sms-spam", "seed": 7}}))
    assert main(["eval", "--model", str(run), "--data", "sms-spam", "--data-path", str(SMS), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    test = load_sms_spam(SMS, seed=7, progress=False).test
    assert test.texts != load_sms_spam(SMS, progress=False).test.texts
    assert report["confusion_matrix"] == clf.evaluate(test)["confusion_matrix"]
    assert main(["eval", "--model", str(run), "--data", "sms-spam", "--data-path", str(SMS), "--seed", "123"]) == 2
    assert "split by seed 7" in capsys.readouterr().err


def test_eval_sms_spam_test_split(model_dir, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", "sms-spam", "--data-path", str(SMS),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 300 and report["data"] == "sms-spam:test"
    assert sum(map(sum, report["confusion_matrix"])) == 300 and report["long_texts"] > 0


@pytest.mark.parametrize("split, n", [("validation", 149), ("train", 1045), ("all", 1494)])
def test_eval_sms_spam_other_splits(model_dir, capsys, split, n):
    """`eval --data sms-spam --split validation|train|all` scores the book's split of that name
    (all: the 1,494 balanced rows). Fails if --split is ignored for sms-spam (planted: the split
    fixed to test)."""
    assert main(["eval", "--model", str(model_dir), "--data", "sms-spam", "--data-path", str(SMS),
                 "--split", split, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == n and report["data"] == f"sms-spam:{split}", report["data"]


def _sms_rows(n, start=0):
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][start:start + n]
    return [(text, label) for label, text in rows]


def test_eval_scores_every_row_of_a_file_by_default(model_dir, clf, tmp_path, capsys):
    """A test file is scored whole, not cut 70/10/20 (planted: --split defaulting to 'test'), and
    with no training record --split refuses to cut it."""
    data = tmp_path / "test.csv"
    rows = _sms_rows(50)
    write_labelled(data, rows)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels, _ = expected(clf, [t for t, _ in rows])
    assert report["n"] == 50 and report["data"] == f"{data}:all"
    assert report["accuracy"] == pytest.approx(np.mean([a == b for a, (_, b) in zip(labels, rows)]))
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "is not re-split" in err and "no readable metrics.json" in err and "drop --split" in err


def test_eval_quiet_drops_the_long_text_summary(model_dir, tmp_path, capsys):
    """Fails if eval has no --quiet or ignores it (planted: `if not args.quiet` removed in cmd_eval)."""
    data = tmp_path / "long.csv"
    write_labelled(data, [("spam " * 100, "spam"), ("hi", "ham")])
    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 0
    assert "had more than 64 tokens" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "accuracy" in captured.out


def _train(out, data, *extra):
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR),
                 "--data", str(data), *extra, "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                 "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: one on a file (columns "message", "category") split 70/10/20 by seed 7, one
    on train/validation/test files."""
    root = tmp_path_factory.mktemp("runs")
    write_labelled(root / "data.csv", _sms_rows(50), header=("message", "category"))
    write_labelled(root / "train.csv", _sms_rows(30))
    write_labelled(root / "val.csv", _sms_rows(10, 30))
    write_labelled(root / "test.csv", _sms_rows(50, 40))
    split = _train(root / "split", root / "data.csv", "--seed", "7", "--text-column", "message",
                   "--label-column", "category")
    files = _train(root / "files", root / "train.csv", "--validation", str(root / "val.csv"),
                   "--test", str(root / "test.csv"))
    return {"root": root, "split": split, "files": files}


def test_eval_split_recuts_the_training_file_with_trainings_seed(runs, tmp_path, capsys):
    """--split test on the file a model was split from gives the rows training held out, with the
    recorded seed and columns, found by content after a move. Fails if eval cuts with seed 123
    (planted: `recorded = None` in _split_seed), matches files by path only (planted: data_sha256
    not written) or ignores the recorded columns (planted: `if role is not None` -> `if False`)."""
    from jaxcls.data import load_splits

    root = runs["root"]
    moved = tmp_path / "renamed.csv"
    moved.write_bytes((root / "data.csv").read_bytes())
    seeds = {s: load_splits(moved, seed=s, text_column="message", label_column="category").test for s in (7, 123)}
    assert seeds[7].texts != seeds[123].texts  # so the wrong seed would show
    assert main(["eval", "--model", str(root / "split"), "--data", str(moved), "--split", "test", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    held_out = runs["split"]["splits"]["test"]
    assert report["n"] == held_out["n"] == 10
    assert report["accuracy"] == pytest.approx(held_out["accuracy"])
    assert report["confusion_matrix"] == held_out["confusion_matrix"]
    assert report["confusion_matrix"] == _confusion_of(root / "split", seeds[7])

    assert main(["eval", "--model", str(root / "split"), "--data", str(moved), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 50
    assert "is the file" in captured.err and "70% of its rows were training rows" in captured.err
    assert main(["eval", "--model", str(root / "split"), "--data", str(moved), "--split", "test",
                 "--seed", "123"]) == 2
    assert "split by seed 7" in capsys.readouterr().err


def _confusion_of(model, data):
    clf = Classifier.load(model)
    ids, _ = clf.predictor(batch_size=32).predict(list(data.texts))
    cm = np.zeros((2, 2), int)
    for t, p in zip(data.labels, ids):
        cm[t, p] += 1
    return cm.tolist()


def test_eval_never_resplits_files_of_a_run_with_validation_and_test_files(runs, capsys):
    """A model trained with --validation/--test files: its test file is scored whole (50 rows, not
    10), and its training file is never cut into a 'test' split of rows it trained on. Fails if
    eval re-splits any file (planted: the `role != "train" or not was_split` check removed)."""
    root = runs["root"]
    model = str(root / "files")
    assert main(["eval", "--model", model, "--data", str(root / "test.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 50 == runs["files"]["splits"]["test"]["n"]
    assert report["confusion_matrix"] == runs["files"]["splits"]["test"]["confusion_matrix"]

    assert main(["eval", "--model", model, "--data", str(root / "train.csv"), "--split", "test"]) == 2
    assert "trained on every row of it" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--data", str(root / "test.csv"), "--split", "test"]) == 2
    assert "the test file" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--data", str(root / "train.csv"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 30 and "every row of it was a training row" in captured.err


def test_serve_takes_quiet_and_base(model_dir, monkeypatch):
    """serve --quiet turns the request log off and --base reaches the loader. Fails if --quiet is
    not passed on (planted: log=True in cmd_serve)."""
    import jaxcls.infer.serve

    seen = {}
    monkeypatch.setattr(jaxcls.infer.serve, "serve", lambda clf, **kw: seen.update(clf=clf, **kw))
    loads = []
    real_load = Classifier.load
    monkeypatch.setattr(Classifier, "load", classmethod(
        lambda cls, d, base=None: loads.append(base) or real_load(d, base=base)))
    assert main(["serve", "--model", str(model_dir), "--port", "0", "--quiet", "--base", "/elsewhere"]) == 0
    assert seen["log"] is False and seen["clf"].label_names == ("ham", "spam") and loads == ["/elsewhere"]
    assert main(["serve", "--model", str(model_dir), "--port", "0"]) == 0
    assert seen["log"] is True
