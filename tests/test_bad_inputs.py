"""Hostile inputs through the command line: each is classified, evaluated or trained on, or stops
with one line naming the file, row or flag, and leaves no file half-written."""

import csv
import json
import os
import shutil

import pytest

from conftest import TOKENIZER_DIR, save_tiny_classifier
from jaxcls.classifier import Classifier
from jaxcls.cli import main

LABELS = ["ham", "spam"]
HUGE_WS = [" " * 1_000_000, "\n" * 1_000_000, " \n\t" * 340_000]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("clf"), LABELS, seed=3)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _labelled_csv(path, extra_rows):
    rows = [("hello there", "ham"), ("win a prize now", "spam"), ("see you at six", "ham"),
            ("free cash, call", "spam")] * 2 + extra_rows
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


def test_classify_texts_of_a_million_spaces(model_dir, tmp_path, capsys):
    """Fails if a whole whitespace run reaches tiktoken, which panics (planted both defences away:
    `_LONG_RUN = re.compile("(?!)")` in tokenizer.py and `self.encode(text)` for first_tokens in
    Predictor.token_ids: a PanicException escapes main)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ok", *HUGE_WS, "win" + HUGE_WS[0] + "now"]))
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and {r["label"] for r in rows} <= set(LABELS)


def test_sliding_refuses_a_text_past_the_token_cap_naming_it(model_dir, tmp_path, capsys):
    """Fails if --long sliding reads a text of any length (planted: the `ids.size > limit` check
    in Predictor.token_ids removed: 300k windows' worth are classified and written)."""
    src = tmp_path / "in.txt"
    src.write_text("fine\n\nalso fine\n" + "x " * 300_000 + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--long", "sliding", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"{src}: text 3: more than 262144 tokens" in err
    assert list(tmp_path.iterdir()) == [src]  # no output, no temporary file


def test_eval_and_train_on_rows_of_a_million_spaces(model_dir, tmp_path, capsys):
    """Eval reads a 1 MiB CSV field and rows mostly made of whitespace; train trains on them, cut
    to their first tokens. Fails with the csv module's 128 KiB default (planted: the
    field_size_limit call removed in TableReader._csv: "field larger than field limit"), or if
    training hands tiktoken a whole run (planted: `_LONG_RUN = re.compile("(?!)")` and
    `encode(text)` for first_tokens in shapes.encode_texts: a PanicException)."""
    data = _labelled_csv(tmp_path / "d.csv", [("win" + HUGE_WS[0] + "now", "spam"), ("ok" + HUGE_WS[1], "ham"),
                                              ("x" * (1 << 20), "spam")])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 11 and report["long_texts"] == 3
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR),
                 "--data", str(data), "--epochs", "1", "--batch-size", "4", "--trainable", "head",
                 "--padding", "context", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "classifier.json").is_file()


@pytest.mark.parametrize("row,why", [("[" * 100_000, "nested too deeply"),
                                     ('{"text": "x", "label": ' + "9" * 5000 + "}", "4300 digits")])
def test_jsonl_nesting_and_huge_numbers_name_the_line(model_dir, tmp_path, capsys, row, why):
    """Fails if json's RecursionError or int-size ValueError escapes (planted: `except
    (ValueError, RecursionError)` narrowed to `except ValueError` in tables._json)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": "ham"}\n' + row + "\n", encoding="utf-8")
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--quiet"]) == 2
    assert f"{data}: line 2: invalid JSON" in (err := one_line_error(capsys)) and why in err
    assert main(["classify", "--model", str(model_dir), "--input", str(data), "--quiet"]) == 2
    assert f"{data}: line 2: invalid JSON" in one_line_error(capsys)


@pytest.fixture
def no_loading(monkeypatch):
    """Checks made before the model loads: loading it fails the test."""
    monkeypatch.setattr(Classifier, "load", lambda *a, **k: pytest.fail("the model was loaded"))


def _read_only_folder(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.path.isdir("/proc"):  # root writes anywhere but in /proc
        return "/proc"
    pytest.skip("running as root with no read-only folder to write into")


def test_unwritable_output_is_refused_before_loading(model_dir, tmp_path, capsys, no_loading):
    """Fails if --output is checked only when the writer opens it, after classifying (planted:
    the check_output_path call removed from cli/predict.py _check_output: the model loads)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    (tmp_path / "folder.jsonl").mkdir()
    cases = [(tmp_path / "folder.jsonl", "is a folder"), (a_file / "out.jsonl", f"{a_file} is a file"),
             (f"{_read_only_folder(tmp_path)}/out.jsonl", "refuses a new file")]
    for out, why in cases:
        assert main(["classify", "--model", str(model_dir), "some text", "--output", str(out)]) == 2
        err = one_line_error(capsys)
        assert f"--output {out}: " in err and why in err
    assert a_file.read_text() == "keep me"


def test_model_that_is_a_file_or_lacks_its_tokenizer(model_dir, tmp_path, capsys, monkeypatch):
    """Fails if a file reaches the loader (planted: the is_file check removed from
    cli/common.py check_model_folder: the loader's message does not name --model), or if a
    folder without tokenizer files sends tiktoken to the network (planted: the tokenizer check
    removed there)."""
    import tiktoken

    monkeypatch.setattr(tiktoken, "get_encoding", lambda *a, **k: pytest.fail("tiktoken went to the network"))
    weights = model_dir / "weights.safetensors"
    assert main(["classify", "--model", str(weights), "a text"]) == 2
    assert f"--model {weights}: a file, not a folder" in one_line_error(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("classifier.json", "weights.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    assert main(["eval", "--model", str(bare), "--data", str(_labelled_csv(tmp_path / "d.csv", []))]) == 2
    assert f"--model {bare}: no tokenizer files" in one_line_error(capsys)
