"""jaxcls.data: the book's SMS split, user files, strict errors, encoding, padding and batching."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED, requires_shared
from jaxcls import assets, data
from jaxcls.data import sms as sms_lib
from jaxcls.data import (
    DataSplits,
    TextDataset,
    batches,
    default_bucket_lengths,
    encode_texts,
    label_ids,
    length_buckets,
    load_data,
    load_sms_spam,
    load_splits,
    pad_batch,
    read_table,
    resolve_pad_length,
)
from jaxcls.errors import DataError

SMS_DIR = SHARED / "data" / "sms_spam"
SMS_FILE = SMS_DIR / "SMSSpamCollection"
SMS_ZIP = SMS_DIR / "sms+spam+collection.zip"
needs_sms = requires_shared


# ------------------------------------------------------------------------------------------------
# SMS spam: the book's split


def book_splits(path=SMS_FILE):
    """The book's chapter 6 recipe, verbatim: the reference the loader must reproduce."""
    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    balanced = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(balanced) * 0.7)
    validation_end = train_end + int(len(balanced) * 0.1)
    return {
        "train": balanced[:train_end],
        "validation": balanced[train_end:validation_end],
        "test": balanced[validation_end:],
    }


@pytest.fixture(scope="module")
def sms():
    if not SMS_FILE.is_file():
        pytest.skip(f"{SMS_FILE} not present")
    return load_sms_spam(SMS_FILE)


@needs_sms
def test_sms_split_is_the_books(sms):
    ref = book_splits()
    assert sms.label_names == ("ham", "spam")
    assert (len(sms.train), len(sms.validation), len(sms.test)) == (1045, 149, 300)
    total = np.zeros(2, int)
    for name in ("train", "validation", "test"):
        got, want = getattr(sms, name), ref[name]
        assert got.source == f"sms-spam:{name}"
        assert got.labels.dtype == np.int32 and got.label_names == ("ham", "spam")
        np.testing.assert_array_equal(
            np.bincount(got.labels, minlength=2), np.bincount(want["Label"], minlength=2)
        )
        assert list(got.texts[:3]) == list(want["Text"][:3])
        assert got.labels[:3].tolist() == want["Label"][:3].tolist()
        assert (
            list(got.texts) == list(want["Text"]) and got.labels.tolist() == want["Label"].tolist()
        )
        total += np.bincount(got.labels, minlength=2)
    assert total.tolist() == [747, 747]


@needs_sms
def test_sms_zip_file_and_folder_agree(sms, tmp_path):
    zip_only = tmp_path / "zip_only"
    zip_only.mkdir()
    (zip_only / SMS_ZIP.name).symlink_to(SMS_ZIP)
    for source in (SMS_ZIP, SMS_DIR, str(SMS_DIR), zip_only):
        other = load_sms_spam(source)
        for name in ("train", "validation", "test"):
            a, b = getattr(sms, name), getattr(other, name)
            assert a.texts == b.texts and a.labels.tolist() == b.labels.tolist(), (source, name)


@needs_sms
def test_sms_seed_changes_the_split(sms):
    other = load_sms_spam(SMS_FILE, seed=1)
    assert (len(other.train), len(other.validation), len(other.test)) == (1045, 149, 300)
    assert other.train.texts != sms.train.texts


@needs_sms
def test_sms_downloads_into_cache_when_absent(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, *, sha256=None, progress=True):
        calls.append((url, Path(dest), progress))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SMS_ZIP, dest)
        return Path(dest)

    fake = types.ModuleType("jaxcls.download")
    fake.download_file = fake_download
    fake.cache_home = lambda: tmp_path / "home"
    monkeypatch.setitem(sys.modules, "jaxcls.download", fake)
    monkeypatch.setattr(assets, "SMS_SPAM_ZIP", tmp_path / "not-packaged.zip")  # else no download is needed
    first = load_sms_spam(progress=False)
    dest = tmp_path / "home" / "data" / "sms_spam" / "sms+spam+collection.zip"
    assert calls == [(data.SMS_SPAM_URL, dest, False)]
    second = load_sms_spam()
    assert len(calls) == 1, "a cached zip must not be downloaded again"
    assert first.train.texts == second.train.texts and len(first.train) == 1045


@needs_sms
@pytest.mark.skipif(
    importlib.util.find_spec("jaxcls.download") is None, reason="jaxcls.download not written yet"
)
def test_sms_uses_real_cache_home(tmp_path, monkeypatch):
    import jaxcls.download as download

    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))
    folder = tmp_path / "data" / "sms_spam"
    folder.mkdir(parents=True)
    (folder / "SMSSpamCollection").symlink_to(SMS_FILE)
    monkeypatch.setattr(download, "download_file", lambda *a, **k: pytest.fail("must not download"))
    assert len(load_sms_spam().test) == 300


@needs_sms
@pytest.mark.skipif(
    importlib.util.find_spec("jaxcls.download") is None, reason="jaxcls.download not written yet"
)
def test_sms_download_from_local_server(tmp_path, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SMS_DIR))
    handler.log_message = lambda *a: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/{SMS_ZIP.name}"
            monkeypatch.setattr(sms_lib, "SMS_SPAM_URL", url)
            monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))
            monkeypatch.setattr(assets, "SMS_SPAM_ZIP", tmp_path / "not-packaged.zip")
            got = load_sms_spam(progress=False)
        finally:
            server.shutdown()
    assert (tmp_path / "data" / "sms_spam" / SMS_ZIP.name).read_bytes() == SMS_ZIP.read_bytes()
    assert (len(got.train), len(got.validation), len(got.test)) == (1045, 149, 300)


def test_sms_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="holds none of"):
        load_sms_spam(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_sms_spam(tmp_path / "missing")
    bad = tmp_path / "SMSSpamCollection"
    bad.write_text("ham\thello\neggs\tworld\n")
    with pytest.raises(DataError, match=r"SMSSpamCollection: row 2 has label 'eggs'"):
        load_sms_spam(bad)


# ------------------------------------------------------------------------------------------------
# User files


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows_csv(n=20, sep=",", labels=("neg", "pos"), header=("text", "label")):
    lines = [sep.join(header)] + [
        f"text number {i}{sep}{labels[i % len(labels)]}" for i in range(n)
    ]
    return "\n".join(lines) + "\n"


def test_read_csv_tsv_jsonl(tmp_path):
    csv_ = write(tmp_path / "a.csv", 'text,label\nhello,pos\n"a, quoted\nmulti-line text",neg\n')
    assert read_table(csv_) == (["hello", "a, quoted\nmulti-line text"], ["pos", "neg"])
    tsv = write(tmp_path / "a.tsv", "label\ttext\n1\thi there\n0\tbye\n")
    assert read_table(tsv) == (["hi there", "bye"], [1, 0])
    tab = write(tmp_path / "a.TAB", "text\tlabel\nx\t 3 \n")
    assert read_table(tab) == (["x"], [3])
    jl = tmp_path / "a.jsonl"
    jl.write_text(
        json.dumps({"text": "é ünïcode", "label": 1})
        + "\n\n"
        + json.dumps({"label": 0, "text": "b", "id": 7})
        + "\n"
    )
    assert read_table(jl) == (["é ünïcode", "b"], [1, 0])
    nd = write(
        tmp_path / "a.ndjson", '{"text": "x", "label": "spam"}\r\n{"text": "y", "label": "ham"}\r\n'
    )
    assert read_table(nd) == (["x", "y"], ["spam", "ham"])


def test_read_custom_columns_bom_and_book_headers(tmp_path):
    f = tmp_path / "c.csv"
    f.write_bytes("\ufeffid,body,cls\n1,hello,x\n2,world,y\n".encode())
    assert read_table(f, text_column="body", label_column="cls") == (["hello", "world"], ["x", "y"])
    book = write(tmp_path / "train.csv", "Label,Text\n0,hi\n1,win cash\n")
    assert read_table(book) == (["hi", "win cash"], [0, 1])


def test_load_splits_single_file_is_seeded_like_the_book(tmp_path):
    f = write(tmp_path / "all.csv", rows_csv(50))
    a = load_splits(f)
    assert (len(a.train), len(a.validation), len(a.test)) == (35, 5, 10)
    assert a.label_names == ("neg", "pos")
    assert a.train.source.endswith("all.csv:train") and a.test.source.endswith("all.csv:test")
    again = load_splits(f)
    assert a.train.texts == again.train.texts and a.test.texts == again.test.texts
    other = load_splits(f, seed=7)
    assert other.train.texts != a.train.texts
    everything = sorted(a.train.texts + a.validation.texts + a.test.texts)
    assert everything == sorted(f"text number {i}" for i in range(50))
    order = np.random.RandomState(123).permutation(50)
    assert a.train.texts[:3] == tuple(f"text number {i}" for i in order[:3])
    for ds in (a.train, a.validation, a.test):
        for t, y in zip(ds.texts, ds.labels):
            assert y == int(t.split()[-1]) % 2


def test_load_splits_zero_fractions_drop_splits(tmp_path):
    f = write(tmp_path / "all.csv", rows_csv(21))
    s = load_splits(f, split_fractions=(0.8, 0.2, 0.0))
    assert s.test is None and len(s.train) == 16 and len(s.validation) == 5
    s = load_splits(f, split_fractions=(1, 0, 0))
    assert s.validation is None and s.test is None and len(s.train) == 21


def test_load_splits_given_files_share_the_mapping(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\nc,neutral\n")
    val = write(tmp_path / "val.tsv", "text\tlabel\nd\tneutral\n")
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "e", "label": "pos"}\n{"text": "f", "label": "neg"}\n')
    s = load_splits(train, val, test)
    assert s.label_names == ("neg", "neutral", "pos")
    assert s.train.labels.tolist() == [2, 0, 1]
    assert s.validation.labels.tolist() == [1] and s.test.labels.tolist() == [2, 0]
    assert s.train.texts == ("a", "b", "c") and s.validation.source == str(val)
    named = load_splits(train, val, label_names=["pos", "neg", "neutral"])
    assert named.label_names == ("pos", "neg", "neutral") and named.train.labels.tolist() == [
        0,
        1,
        2,
    ]
    assert named.test is None and named.validation.labels.tolist() == [2]


def test_integer_labels(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,0\nb,2\nc,1\n")
    val = write(tmp_path / "val.jsonl", '{"text": "d", "label": 2}\n')
    s = load_splits(train, val)
    assert s.label_names == ("0", "1", "2") and s.train.labels.tolist() == [0, 2, 1]
    assert s.validation.labels.tolist() == [2]
    named = load_splits(train, label_names=["a", "b", "c"], split_fractions=(1, 0, 0))
    assert named.label_names == ("a", "b", "c")
    spelled = write(tmp_path / "stars.csv", "text,label\na,1\nb,2\n")
    s = load_splits(spelled, label_names=["2", "1"], split_fractions=(1, 0, 0))
    by_text = dict(zip(s.train.texts, s.train.labels.tolist()))
    assert by_text == {"a": 1, "b": 0}, "integers that spell label_names map by name"


def test_load_data(tmp_path):
    f = write(tmp_path / "all.csv", rows_csv(30))
    s = load_data(str(f), seed=5, validation=None, progress=False)
    assert isinstance(s, DataSplits) and len(s.train) == 21
    assert s.train.texts == load_splits(f, seed=5).train.texts
    with pytest.raises(DataError, match="text_column"):
        load_data("sms-spam", text_column="x")
    if SMS_FILE.is_file():
        assert len(load_data("sms-spam", path=SMS_DIR).validation) == 149


def test_text_dataset_is_frozen_and_checked():
    ds = TextDataset(["a", "b"], [1, 0], ["x", "y"], "src")
    assert ds.texts == ("a", "b") and ds.labels.dtype == np.int32 and len(ds) == 2
    with pytest.raises(ValueError):
        ds.labels[0] = 5
    with pytest.raises(DataError, match="src"):
        TextDataset(("a",), np.array([2]), ("x", "y"), "src")
    with pytest.raises(DataError, match="src"):
        TextDataset(("a",), np.array([0, 1]), ("x", "y"), "src")


# ------------------------------------------------------------------------------------------------
# Bad user input: every message names the file and the line or column


BAD_FILES = [
    # name, content, pattern the message must match (after the file name)
    (
        "x.txt",
        "text,label\na,b\n",
        r"unknown file type '\.txt'; supported: \.csv, \.tsv, \.tab, \.jsonl, \.ndjson",
    ),
    ("q.csv", 'text,label\nok,a\n"bad"quote,b\n', r"line 3: malformed \.csv"),
    ("u.csv", 'text,label\nok,a\n"never closed,b\nmore,a\n', r"lines 3-4: malformed \.csv"),
    ("f.tsv", "text\tlabel\nok\ta\nextra\tb\tc\n", r"line 3: 3 fields where the header has 2"),
    ("j.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n', r"line 2: invalid JSON"),
    (
        "o.jsonl",
        '{"text": "a", "label": 1}\n\n["b", 1]\n',
        r"line 3: expected a JSON object, got list",
    ),
    ("c.csv", "body,label\na,b\n", r"header has no column 'text'; columns: \['body', 'label'\]"),
    ("l.csv", "text,cls\na,b\n", r"header has no column 'label'; columns: \['text', 'cls'\]"),
    (
        "k.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b"}\n',
        r"line 2: no column 'label'; columns: \['text'\]",
    ),
    ("e.csv", "text,label\nok,a\n,b\n", r"line 3: column 'text' is empty"),
    ("w.tsv", "text\tlabel\nok\ta\n   \tb\n", r"line 3: column 'text' is empty"),
    ("m.csv", "text,label\nok,a\nfine,\n", r"line 3: column 'label' is empty \(missing label\)"),
    ("n.jsonl", '{"text": "a", "label": null}\n', r"line 1: column 'label' is empty"),
    ("t.jsonl", '{"text": 5, "label": 1}\n', r"line 1: column 'text' must be a string, got int"),
    (
        "r.jsonl",
        '{"text": "a", "label": 1.5}\n',
        r"line 1: column 'label' must be a string or an integer, got 1.5",
    ),
    ("h.csv", "text,label\n", r"no data rows"),
    ("z.csv", "", r"empty file \(no header line\)"),
    ("d.csv", "text,text,label\na,b,c\n", r"line 1: repeated column names"),
    (
        "a.csv",
        "text,Text,label\na,b,c\n",
        r"header has columns \['text', 'Text'\] all match 'text'; choose one with --text-column",
    ),
    (
        "col.jsonl",
        '{"text": "a", "label": 1}\r\n[\r\n',
        r"line 2: invalid JSON \(Expecting value at column 2\)",
    ),
    (
        "deep.jsonl",
        '{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        r"line 1: invalid JSON \(nested too deeply\)",
    ),
    (
        "big.jsonl",
        '{"text": "a", "label": ' + "9" * 5000 + "}\n",
        r"line 1: invalid JSON \(Exceeds the limit \(4300 digits\)",
    ),
]


@pytest.mark.parametrize("name,content,pattern", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files(tmp_path, name, content, pattern):
    """a.csv fails if an ambiguous default column reads as missing (planted: no `if matches`
    raise in TableReader._pick); col.jsonl if the line ending reaches json.loads (planted: no
    rstrip in _json); deep/big.jsonl if RecursionError/ValueError escape _json (planted: except
    json.JSONDecodeError only)."""
    f = write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"{name}: {pattern}"):
        load_splits(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load_splits(tmp_path / "nope.csv")
    train = write(tmp_path / "train.csv", rows_csv(4))
    with pytest.raises(DataError, match=r"val\.csv: no such file"):
        load_splits(train, tmp_path / "val.csv")


def test_non_utf8_names_line_and_offset(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: line 3: not valid UTF-8 \(byte offset 19"):
        read_table(f)


def test_non_utf8_offset_counts_the_bom(tmp_path):
    """Fails if the byte offset leaves out a stripped BOM (planted: `at = self.bytes_read +
    e.start` in TableReader._lines)."""
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbf" + "text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"bom\.csv: line 3: not valid UTF-8 \(byte offset 22: "):
        read_table(f)
    f.write_bytes(b"\xef\xbb\xbf" + "text,lab\xe9l\nok,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"bom\.csv: line 1: not valid UTF-8 \(byte offset 11: "):
        read_table(f)


def test_lone_cr_ends_csv_lines(tmp_path):
    """Old Mac line endings: a lone CR ends a CSV line outside quotes and stays inside them.
    Fails without the split at lone CRs (planted: _cr_split returns (data,)), or if a line
    ending CRLF is never split (planted: `cr == 0 or data.endswith(b"\\r\\n")` in _cr_split)."""
    f = tmp_path / "cr.csv"
    f.write_bytes(b'Text,label\rhello,pos\r"two\rlines",neg\r\rlast,pos\r"bad"x,pos\r')
    with pytest.raises(DataError, match=r"cr\.csv: line 7: malformed \.csv"):
        read_table(f)
    f.write_bytes(b'Text,label\rhello,pos\r"two\rlines",neg\r\rlast,pos\rcrlf,neg\r\n')
    assert read_table(f) == (["hello", "two\rlines", "last", "crlf"], ["pos", "neg", "pos", "neg"])


def test_label_ids_one_rule_for_every_caller():
    """Fails if integers that spell names are taken as indices (planted: drop `and not
    all(str(v) in names ...)` in LabelMap.onto), if NumPy integers are not integers (planted:
    is_int_label checks `int` only), or if an unknown label is let through (planted:
    `self.lookup.get(str(v), 0)` in LabelMap.ids)."""
    assert label_ids([1, 2, 2], ("1", "2"), source="s").tolist() == [0, 1, 1]
    assert label_ids(np.array([1, 0]), ("ham", "spam"), source="s").tolist() == [1, 0]
    assert label_ids(["spam", "ham"], ("ham", "spam"), source="s").tolist() == [1, 0]
    with pytest.raises(DataError, match=r"<train>: row 2: label 'eggs' is not one of "
                                        r"label_names \['ham', 'spam'\]$"):
        label_ids(["spam", "eggs"], ("ham", "spam"), source="<train>")
    with pytest.raises(DataError, match=r"s: row 2: label 1 is not one of label_names"):
        label_ids(["spam", 1], ("ham", "spam"), source="s")  # mixed: by name throughout
    with pytest.raises(DataError, match=r"f\.csv: line 9: label 2 in column 'y' is not one of "
                                        r"the class indices 0\.\.1 of the classifier's labels"):
        label_ids([0, 2], ("ham", "spam"), source="f.csv", lines=[3, 9], column="y",
                  described="the classifier's labels")


def test_classifier_fit_pairs_use_the_label_mapping():
    """(texts, labels) given to Classifier.fit map like a file's labels. Fails with the old
    lookup, where integer labels never matched names (planted: `lookup[l] if l in lookup else
    int(l)` in Classifier._dataset)."""
    from jaxcls.classifier import Classifier

    stars = types.SimpleNamespace(label_names=("1", "2"))
    ds = Classifier._dataset(stars, (["good", "bad"], [2, 1]), "train")
    assert ds.labels.tolist() == [1, 0] and ds.source == "<train>"
    with pytest.raises(DataError, match=r"<validation>: row 1: label 'x' is not one of"):
        Classifier._dataset(stars, (["a"], ["x"]), "validation")


def test_unseen_and_unusable_labels(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    val = write(tmp_path / "val.csv", "text,label\nc,pos\nd,neutral\n")
    unseen = r"val\.csv: line 3: label 'neutral' in column 'label' is not one of the training data"
    with pytest.raises(DataError, match=unseen):
        load_splits(train, val)
    named = r"train\.csv: line 3: label 'neg' in column 'label' is not one of label_names \['pos'"
    with pytest.raises(DataError, match=named):
        load_splits(train, val, label_names=["pos", "other"])
    sparse = write(tmp_path / "sparse.csv", "text,label\na,0\nb,2\n")
    test = write(tmp_path / "test.csv", "text,label\nc,1\n")
    with pytest.raises(DataError, match=r"sparse\.csv: line 3: integer label 2 in column 'label' "
                                        r"would make a 3-class head with no rows for 1 of its"):
        load_splits(sparse, test=test)
    absent = write(tmp_path / "absent.csv", "text,label\nc,neutral\n")
    with pytest.raises(
        DataError,
        match=r"absent\.csv: line 2: label 'neutral' in column 'label' does not occur in the "
              r"training data",
    ):
        load_splits(train, test=absent, label_names=["pos", "neg", "neutral"])
    one = write(tmp_path / "one.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(
        DataError, match=r"one\.csv: the training data has only one class \('pos'\)"
    ):
        load_splits(one, val)
    neg = write(tmp_path / "neg.csv", "text,label\na,0\nb,-1\n")
    with pytest.raises(DataError, match=r"neg\.csv: line 3: integer label -1"):
        load_splits(neg, val)
    ints = write(tmp_path / "ints.csv", "text,label\na,0\nb,2\n")
    with pytest.raises(DataError, match=r"ints\.csv: line 3: label 2 .* class indices 0\.\.1"):
        load_splits(ints, label_names=["x", "y"], split_fractions=(1, 0, 0))


def test_split_errors_name_file_and_original_line(tmp_path):
    few = write(tmp_path / "few.csv", rows_csv(3))
    with pytest.raises(DataError, match=r"few\.csv: the validation split is empty"):
        load_splits(few)
    with pytest.raises(DataError, match="split_fractions"):
        load_splits(few, split_fractions=(0.5, 0.1, 0.1))
    # one odd label: the stratified split keeps it in train whatever the seed (a label with one or
    # two rows goes to train first); in a given file outside train it is named with its own line
    f = write(tmp_path / "odd.csv", rows_csv(40) + "lonely,odd\n")
    for seed in range(5):
        assert "lonely" in load_splits(f, seed=seed).train.texts
    with pytest.raises(DataError, match=r"odd\.csv: line 42: label 'odd'"):
        load_splits(write(tmp_path / "even.csv", rows_csv(40)), f)


# ------------------------------------------------------------------------------------------------
# Encoding, padding, batching


def fake_encode(s):
    return [ord(c) for c in s]


def test_encode_texts_truncates_and_counts():
    seqs, cut = encode_texts(fake_encode, ["abc", "abcdef", "a", "abcd"], 4)
    assert cut == 1
    assert [s.tolist() for s in seqs] == [[97, 98, 99], [97, 98, 99, 100], [97], [97, 98, 99, 100]]
    assert all(s.dtype == np.int32 for s in seqs)
    with pytest.raises(DataError, match=r"sms-spam:test: text at index 1 encodes to no tokens"):
        encode_texts(fake_encode, ["ok", ""], 4, source="sms-spam:test")
    with pytest.raises(ValueError):
        encode_texts(fake_encode, ["ok"], 0)


def test_pad_batch():
    seqs = [np.array([1, 2, 3], np.int32), np.array([4], np.int32)]
    ids, lengths = pad_batch(seqs)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    np.testing.assert_array_equal(ids, [[1, 2, 3], [4, 50256, 50256]])
    np.testing.assert_array_equal(lengths, [3, 1])
    ids, _ = pad_batch(seqs, length=5, pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]])
    with pytest.raises(
        DataError, match="sequence 0 of the batch has 3 tokens, more than the pad length 2"
    ):
        pad_batch(seqs, length=2)
    with pytest.raises(DataError, match="sequence 1 of the batch is empty"):
        pad_batch([np.array([1]), np.array([], np.int32)])
    assert pad_batch([], length=4)[0].shape == (0, 4)


def test_resolve_pad_length():
    train = [np.zeros(n, np.int32) for n in (5, 120, 7)]
    assert resolve_pad_length("longest", train, 1024) == 120
    assert resolve_pad_length("context", train, 1024) == 1024
    assert resolve_pad_length("none", train, 1024) is None
    assert resolve_pad_length(256, train, 1024) == 256
    assert resolve_pad_length("256", train, 1024) == 256
    for bad in (0, -3, 2000, "widest", True, 1.5):
        with pytest.raises(DataError, match="padding"):
            resolve_pad_length(bad, train, 1024)
    with pytest.raises(DataError, match="padding 'longest'.*120 tokens.*context_length 64"):
        resolve_pad_length("longest", train, 64)


def test_batches_cover_and_replay_by_seed_and_epoch():
    plain = batches(10, 4, shuffle=False, seed=0, epoch=0, drop_last=False)
    assert [b.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = batches(10, 4, shuffle=False, seed=0, epoch=0, drop_last=True)
    assert [b.tolist() for b in dropped] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = batches(103, 8, shuffle=True, seed=123, epoch=2, drop_last=False)
    assert sorted(np.concatenate(a).tolist()) == list(range(103)) and len(a[-1]) == 7
    b = batches(103, 8, shuffle=True, seed=123, epoch=2, drop_last=False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    next_epoch = batches(103, 8, shuffle=True, seed=123, epoch=3, drop_last=False)
    other_seed = batches(103, 8, shuffle=True, seed=124, epoch=2, drop_last=False)
    assert not np.array_equal(np.concatenate(a), np.concatenate(next_epoch))
    assert not np.array_equal(np.concatenate(a), np.concatenate(other_seed))
    expected = np.random.default_rng((123, 2)).permutation(103)
    np.testing.assert_array_equal(np.concatenate(a), expected)
    d = batches(103, 8, shuffle=True, seed=123, epoch=2, drop_last=True)
    assert len(d) == 12 and all(len(x) == 8 for x in d)
    assert batches(0, 8, shuffle=True, seed=1, epoch=0, drop_last=False) == []
    with pytest.raises(ValueError):
        batches(5, 0, shuffle=False, seed=0, epoch=0, drop_last=False)


def test_length_buckets():
    got = length_buckets(np.array([1, 32, 33, 64, 65, 120]), (32, 64, 120))
    np.testing.assert_array_equal(got, [32, 32, 64, 64, 120, 120])
    np.testing.assert_array_equal(length_buckets([3, 40], [64, 32]), [32, 64])
    with pytest.raises(ValueError):
        length_buckets([121], (32, 64, 120))
    assert default_bucket_lengths(120) == (32, 64, 120)
    assert default_bucket_lengths(128) == (32, 64, 128)
    assert default_bucket_lengths(1024) == (32, 64, 128, 256, 512, 1024)
    assert default_bucket_lengths(20) == (20,)
    assert default_bucket_lengths(100, smallest=16) == (16, 32, 64, 100)


def test_fine_bucket_lengths():
    from jaxcls.data import fine_bucket_lengths

    assert fine_bucket_lengths(1024) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    assert fine_bucket_lengths(120) == (16, 24, 32, 48, 64, 96, 120)
    assert fine_bucket_lengths(10) == (10,)


def test_huge_integer_label_is_refused_quickly(tmp_path):
    """Issue 13's probe: one row labelled 1000000000 once built names for every integer below it
    (23 GB). Fails, by running out of time or memory, if names enumerate 0..max (planted: names =
    tuple(str(i) for i in range(distinct[-1] + 1)) with no gap check in LabelMap.infer)."""
    import time

    huge = write(tmp_path / "huge.csv", "text,label\na,0\nb,1\nc,1000000000\nd,1\n")
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_splits(huge, split_fractions=(1, 0, 0))
    assert time.perf_counter() - start < 2
    message = str(e.value)
    assert "\n" not in message
    assert re.search(r"huge\.csv: line 4: integer label 1000000000 in column 'label' would make "
                     r"a 1000000001-class head with no rows for 999999998 of its classes", message)


def test_gapped_and_mixed_labels_are_refused(tmp_path):
    """Gapped integers would train classes without data; a mix of integers and strings has no
    single meaning. Fails if gaps are accepted (planted: drop the `distinct[-1] != len(distinct) -
    1` check in LabelMap.infer) or if mixes are sorted as text (planted: drop the `any(ints) and
    not all(ints)` check)."""
    gapped = write(tmp_path / "gapped.csv", "text,label\na,0\nb,7\nc,0\nd,7\ne,0\n")
    with pytest.raises(DataError, match=r"^[^\n]*gapped\.csv: line 3: integer label 7 in column "
                                        r"'label' would make a 8-class head with no rows for 6 of "
                                        r"its classes \(the first is 1\)"):
        load_splits(gapped, split_fractions=(1, 0, 0))
    mixed = write(tmp_path / "mixed.jsonl", '{"text": "a", "y": 1}\n{"text": "b", "y": 0}\n'
                                            '{"text": "c", "y": "spam"}\n')
    with pytest.raises(DataError, match=r"^[^\n]*mixed\.jsonl: line 3: label 'spam' in column 'y' "
                                        r"is a string but line 1 has the integer label 1"):
        load_splits(mixed, label_column="y", split_fractions=(1, 0, 0))
    fine = write(tmp_path / "fine.csv", "text,label\na,2\nb,0\nc,1\n")
    s = load_splits(fine, split_fractions=(1, 0, 0))
    assert s.label_names == ("0", "1", "2")
    assert dict(zip(s.train.texts, s.train.labels.tolist())) == {"a": 2, "b": 0, "c": 1}
    named = load_splits(gapped, label_names=["x", "y", "z", "a", "b", "c", "d", "e"],
                        split_fractions=(1, 0, 0))
    by_text = dict(zip(named.train.texts, named.train.labels.tolist()))
    assert by_text == {"a": 0, "b": 7, "c": 0, "d": 7, "e": 0}, "label_names still name classes"
