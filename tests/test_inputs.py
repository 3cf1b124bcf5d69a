"""Streaming readers of texts to classify, and atomic prediction writers."""

import csv
import io
import json

import numpy as np
import pytest

from jaxcls.data import read_table
from jaxcls.errors import DataError
from jaxcls.infer.io import PredictionWriter, TextReader, read_texts

TEXTS = ["Free entry, win £1000 now!", 'He said "ok"\nthen left', "naïve café 🎉", "  spaced  "]


def test_txt_lines_chunks_and_progress(tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\n   \nthree  \nlast without newline")
    reader = TextReader(f, chunk_size=2)
    chunks = list(reader)
    assert chunks == [["one", "two"], ["three  ", "last without newline"]]
    assert reader.rows == 4 and reader.bytes_read == reader.total_bytes == f.stat().st_size
    assert reader.invalid_lines == 0


def test_stdin_lines():
    stdin = io.BytesIO("a\nb 🎉\n".encode())
    reader = TextReader("-", stdin=stdin)
    assert list(reader) == [["a", "b 🎉"]] and reader.total_bytes is None


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, sep):
    f = tmp_path / f"in{suffix}"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=sep)
        w.writerow(["id", "Text", "body"])
        for i, t in enumerate(TEXTS):
            w.writerow([i, t, f"b{i}"])
        w.writerow([9, "", "empty text cell"])
    assert read_texts(f) == TEXTS + [""]  # "Text" matches the default case-insensitively
    assert read_texts(f, text_column="body", chunk_size=3) == [f"b{i}" for i in range(4)] + ["empty text cell"]
    with pytest.raises(DataError, match=r"no column 'message'.*--text-column"):
        read_texts(f, text_column="message")


def test_csv_errors_name_the_line(tmp_path):
    """The unclosed quote fails if only the first line of a bad row is named (planted: `where =
    f"line {start}"` in TableReader._csv); the repeated header if inference skips the header
    check it shares with training (planted: no set(header) check in TableReader._header)."""
    f = tmp_path / "bad.csv"
    f.write_text("text,label\nok,1\nragged,1,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv: line 3: 3 fields"):
        read_texts(f)
    g = tmp_path / "empty.csv"
    g.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        read_texts(g)
    f.write_text('text\nok\n"never closed\nmore\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv: lines 3-4: malformed \.csv"):
        read_texts(f)
    f.write_text("id,text,id\n1,a,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv: line 1: repeated column names in header"):
        read_texts(f)


def test_training_and_inference_read_the_same_texts(tmp_path):
    """One reader: a BOM, CRLF, a quoted multi-line field, blank lines and a "Text" header read
    the same for `read_table` and `TextReader`. Fails if the BOM is kept (planted: `start = 0`
    in TableReader._lines)."""
    f = tmp_path / "both.csv"
    f.write_bytes(b'\xef\xbb\xbfText,label\r\nhi,a\r\n\r\n"two\r\nlines, quoted",b\r\n  x ,a\r\n')
    want = ["hi", "two\r\nlines, quoted", "  x "]
    assert read_table(f)[0] == want
    assert read_texts(f) == want


def test_reader_streams_chunks(tmp_path):
    """A chunk comes out before a later bad line is read. Fails if the reader takes all rows
    first (planted: `for row in list(self._table)` in TextReader.__iter__)."""
    f = tmp_path / "late.jsonl"
    f.write_text('"a"\n"b"\n{"text": \n', encoding="utf-8")
    chunks = iter(TextReader(f, chunk_size=2))
    assert next(chunks) == ["a", "b"]
    with pytest.raises(DataError, match=r"late.jsonl: line 3: invalid JSON"):
        next(chunks)


def test_jsonl(tmp_path):
    f = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t, "x": 1}) for t in TEXTS] + ["", json.dumps("a bare string")]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_texts(f) == TEXTS + ["a bare string"]
    g = tmp_path / "msg.jsonl"
    g.write_text('{"msg": "hi"}\n{"msg": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"msg.jsonl: line 2: column 'msg' must be a string, got int"):
        read_texts(g, text_column="msg")
    with pytest.raises(DataError, match=r"line 1: no column 'text'"):
        read_texts(g)
    h = tmp_path / "broken.jsonl"
    h.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid JSON"):
        read_texts(h)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("good\n".encode() + "café\n".encode("latin-1") + b"ok\n\xff\xfe bad\n")
    reader = TextReader(f)
    texts = [t for c in reader for t in c]
    assert texts == ["good", "caf\ufffd", "ok", "\ufffd\ufffd bad"]
    assert reader.invalid_lines == 2 and reader.first_invalid_line == 2
    g = tmp_path / "latin1.csv"
    g.write_bytes(b"text\nfine\n\"multi\nline \xe9\"\n")
    reader = TextReader(g)
    assert [t for c in reader for t in c] == ["fine", "multi\nline \ufffd"]
    assert reader.invalid_lines == 1 and reader.first_invalid_line == 4


def test_unknown_types_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"unknown file type '\.xlsx'; supported: .*\.txt"):
        TextReader(tmp_path / "a.xlsx")
    with pytest.raises(DataError, match="no such file"):
        TextReader(tmp_path / "a.txt")


PROBS = np.array([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]], np.float32)
IDS = PROBS.argmax(-1)
NAMES = ("ham", "spam", "other")


def test_jsonl_writer_all_and_top_k(tmp_path):
    out = tmp_path / "p.jsonl"
    with PredictionWriter(NAMES, out) as w:
        w.write(["a", "b ü"], IDS, PROBS)
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"text": "a", "label": "ham", "probability": 0.7,
                       "probs": {"ham": 0.7, "spam": 0.2, "other": 0.1}}
    assert rows[1]["label"] == "other" and rows[1]["text"] == "b ü"
    with PredictionWriter(NAMES, out, top_k=2) as w:
        w.write(["a", "b"], IDS, PROBS)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert list(rows[1]["probs"].items()) == [("other", 0.8), ("spam", 0.15)]


def test_csv_writer_and_stream(tmp_path):
    out = tmp_path / "p.csv"
    with PredictionWriter(NAMES, out) as w:
        w.write(['with "quotes", comma\nand newline', "b"], IDS, PROBS)
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    assert rows[0]["text"] == 'with "quotes", comma\nand newline'
    assert rows[0]["label"] == "ham" and float(rows[0]["p_spam"]) == 0.2
    assert list(rows[0]) == ["text", "label", "probability", "p_ham", "p_spam", "p_other"]
    with PredictionWriter(NAMES, out, top_k=1) as w:
        w.write(["a", "b"], IDS, PROBS)
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[1].values()) == ["b", "other", "0.8", "other", "0.8"]
    stream = io.StringIO()
    PredictionWriter(NAMES, stream=stream, include_text=False).write(None, IDS[:1], PROBS[:1])
    assert json.loads(stream.getvalue())["label"] == "ham"


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        with PredictionWriter(NAMES, out) as w:
            w.write(["a"], IDS[:1], PROBS[:1])
            assert out.read_text() == "old\n"  # nothing visible under the final name yet
            raise RuntimeError("crash mid-stream")
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # no temp file left
    with pytest.raises(DataError, match="unknown output type"):
        PredictionWriter(NAMES, tmp_path / "p.txt")


def test_prediction_writer_refuses_an_unwritable_path_at_once(tmp_path):
    """Fails if the path is first tried at close(), after every row (planted: the
    check_output_path call removed from PredictionWriter.__init__)."""
    (tmp_path / "taken.jsonl").mkdir()
    (tmp_path / "f").write_text("")
    for path, why in [(tmp_path / "taken.jsonl", "is a folder"), (tmp_path / "f" / "p.csv", "is a file")]:
        with pytest.raises(DataError, match=why):
            PredictionWriter(["a", "b"], path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "taken.jsonl"]
