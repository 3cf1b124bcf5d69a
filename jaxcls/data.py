"""Text-classification data: parse files, balance and split the SMS spam set as the book does,
encode, pad and batch.

Everything here is plain Python, NumPy and pandas; no JAX. Errors a user can cause raise
`DataError` naming the file, the line (1-based, as an editor shows it) and the column.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .errors import DataError

_PAD_ID = 50256  # <|endoftext|>, as jaxcls.tokenizer.PAD_ID; repeated so data.py needs no tiktoken
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_LABELS = ("ham", "spam")
PADDING_MODES = ("longest", "context", "none")

_SUFFIX_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SUPPORTED = ", ".join([*_SUFFIX_SEPARATORS, *_JSONL_SUFFIXES])
_INT_RE = re.compile(r"[+-]?\d+")
# Names the SMS file and its zip go by: UCI's own, and the book's after it unzips and renames.
_SMS_FILES = ("SMSSpamCollection", "SMSSpamCollection.tsv")
_SMS_ZIPS = ("sms+spam+collection.zip", "sms_spam_collection.zip")


@dataclass(frozen=True, eq=False)
class TextDataset:
    """One split: texts and their class indices into `label_names`."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    def __post_init__(self):
        texts = tuple(self.texts)
        labels = np.array(self.labels, dtype=np.int32).reshape(-1)
        labels.flags.writeable = False  # frozen means the labels too
        names = tuple(self.label_names)
        if len(labels) != len(texts):
            raise DataError(f"{self.source}: {len(texts)} texts but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{self.source}: labels must lie in 0..{len(names) - 1} ({names})")
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train plus optional validation and test splits that share one label mapping."""

    train: TextDataset
    validation: TextDataset | None
    test: TextDataset | None
    label_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# SMS spam: the book's recipe


def load_sms_spam(
    path: str | Path | None = None, *, seed: int = 123, progress: bool = True
) -> DataSplits:
    """The book's SMS spam splits (1045 / 149 / 300 at seed 123): ham undersampled to the spam
    count, shuffled, cut 70/10/20.

    `path` is the SMSSpamCollection file, UCI's zip, or a folder holding either. None means
    `cache_home()/"data/sms_spam"`, where the zip is downloaded on first use.
    """
    df = _read_sms_frame(_find_sms_file(path, progress))
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    balanced = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(balanced) * 0.7)
    validation_end = train_end + int(len(balanced) * 0.1)
    parts = {
        "train": balanced[:train_end],
        "validation": balanced[train_end:validation_end],
        "test": balanced[validation_end:],
    }
    made = {
        name: TextDataset(
            texts=tuple(part["Text"]),
            labels=part["Label"].to_numpy(),
            label_names=SMS_SPAM_LABELS,
            source=f"sms-spam:{name}",
        )
        for name, part in parts.items()
    }
    return DataSplits(**made, label_names=SMS_SPAM_LABELS)


def _find_sms_file(path: str | Path | None, progress: bool) -> Path:
    """Resolve `path` to the data file or zip, downloading only into the default cache folder."""
    if path is None:
        from .download import cache_home, download_file

        folder = cache_home() / "data" / "sms_spam"
        found = _sms_in_folder(folder)
        if found is not None:
            return found
        return download_file(SMS_SPAM_URL, folder / _SMS_ZIPS[0], progress=progress)
    path = Path(path)
    if path.is_dir():
        found = _sms_in_folder(path)
        if found is None:
            wanted = ", ".join(_SMS_FILES + _SMS_ZIPS)
            raise DataError(f"{path}: folder holds none of {wanted}")
        return found
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return path


def _sms_in_folder(folder: Path) -> Path | None:
    for name in _SMS_FILES + _SMS_ZIPS:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_sms_frame(path: Path) -> pd.DataFrame:
    """Read as the book does (default quoting, so 5,572 rows); odd bytes are replaced, not fatal."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if Path(m).name == _SMS_FILES[0]]
                if not members:
                    raise DataError(f"{path}: zip has no {_SMS_FILES[0]} (holds {zf.namelist()})")
                source = io.BytesIO(zf.read(members[0]))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: damaged zip ({e})") from None
    else:
        source = path
    try:
        df = pd.read_csv(
            source, sep="\t", header=None, names=["Label", "Text"], encoding_errors="replace"
        )
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: not a label<TAB>text file ({e})") from None
    bad = df[~df["Label"].isin(SMS_SPAM_LABELS)]
    if len(bad):
        raise DataError(
            f"{path}: row {bad.index[0] + 1} has label {bad['Label'].iloc[0]!r}; "
            f"expected one of {SMS_SPAM_LABELS}"
        )
    if df["Text"].isna().any():
        raise DataError(f"{path}: row {int(df['Text'].isna().argmax()) + 1} has no text")
    return df


# ---------------------------------------------------------------------------------------------
# User files


@dataclass(frozen=True)
class _Table:
    path: Path
    texts: list[str]
    labels: list  # str or int per row
    lines: list[int]  # the 1-based line each row starts on
    label_column: str
    source: str = ""  # the split's name for TextDataset.source; the file's path when empty


def read_table(
    path: str | Path, *, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list]:
    """Texts and labels from a CSV, TSV (.tsv/.tab) or JSONL (.jsonl/.ndjson) file.

    Columns default to "text" and "label", matched case-insensitively so the book's own
    train.csv ("Label", "Text") loads as is. CSV labels that all read as integers come back as
    ints, otherwise as stripped strings; JSONL keeps each label's JSON type (string or integer).
    Files must be UTF-8.
    """
    table = _read_table(Path(path), text_column, label_column)
    return table.texts, table.labels


def _read_table(path: Path, text_column: str | None, label_column: str | None) -> _Table:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_SEPARATORS and suffix not in _JSONL_SUFFIXES:
        raise DataError(
            f"{path}: unknown file type {suffix or '(none)'!r}; supported: {_SUPPORTED}"
        )
    text = _decode_utf8(path)
    if suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows(path, text, text_column, label_column)
    else:
        rows = _csv_rows(path, text, _SUFFIX_SEPARATORS[suffix], text_column, label_column)
    text_col, label_col, records = rows
    if not records:
        raise DataError(f"{path}: no data rows")
    texts, labels, lines = [], [], []
    for line, text_value, label in records:
        if not text_value.strip():
            raise DataError(f"{path}: line {line}: column {text_col!r} is empty")
        if isinstance(label, str):
            label = label.strip()
        if label is None or label == "":
            raise DataError(f"{path}: line {line}: column {label_col!r} is empty (missing label)")
        texts.append(text_value)
        labels.append(label)
        lines.append(line)
    if suffix not in _JSONL_SUFFIXES and all(_INT_RE.fullmatch(v) for v in labels):
        labels = [int(v) for v in labels]
    return _Table(path, texts, labels, lines, label_col)


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte offset {e.start}: "
            f"{raw[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None


def _pick_column(
    path: Path, columns: Sequence[str], wanted: str | None, default: str, where: str
) -> str:
    """The exact column asked for; for the default name, any single case-insensitive match."""
    if wanted is not None:
        if wanted in columns:
            return wanted
    else:
        matches = [c for c in columns if c.strip().lower() == default]
        if len(matches) == 1:
            return matches[0]
    name = wanted if wanted is not None else default
    raise DataError(f"{path}: {where}no column {name!r}; columns: {list(columns)}")


def _csv_rows(path, text, sep, text_column, label_column):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    records = []
    header = None
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = row
                if len(set(header)) != len(header):
                    raise DataError(
                        f"{path}: line {line}: repeated column names in header {header}"
                    )
                text_col = _pick_column(path, header, text_column, "text", "header has ")
                label_col = _pick_column(path, header, label_column, "label", "header has ")
                ti, li = header.index(text_col), header.index(label_col)
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {line}: {len(row)} fields where the header has "
                    f"{len(header)} ({header}); check quoting and separators"
                )
            records.append((line, row[ti], row[li]))
    except csv.Error as e:
        lines = f"line {start}" if reader.line_num <= start else f"lines {start}-{reader.line_num}"
        raise DataError(f"{path}: {lines}: malformed {path.suffix} ({e})") from None
    if header is None:
        raise DataError(f"{path}: empty file (no header line)")
    return text_col, label_col, records


def _jsonl_rows(path, text, text_column, label_column):
    records = []
    text_col = label_col = None
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {line}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}: line {line}: expected a JSON object, got {type(obj).__name__}"
            )
        where = f"line {line}: "
        if text_col is None or text_col not in obj:
            text_col = _pick_column(path, list(obj), text_column, "text", where)
        if label_col is None or label_col not in obj:
            label_col = _pick_column(path, list(obj), label_column, "label", where)
        text_value, label = obj[text_col], obj[label_col]
        if not isinstance(text_value, str):
            raise DataError(
                f"{path}: line {line}: column {text_col!r} must be a string, "
                f"got {type(text_value).__name__}"
            )
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise DataError(
                f"{path}: line {line}: column {label_col!r} must be a string or an integer, "
                f"got {json.dumps(label)}"
            )
        records.append((line, text_value, label))
    return text_col, label_col, records


def load_splits(
    train: str | Path,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 123,
) -> DataSplits:
    """Splits from user files.

    With only `train`, its rows are shuffled (seeded, as pandas' `sample(frac=1)`) and cut by
    `split_fractions` like the book; a zero fraction drops that split and the last kept split
    takes the rounding remainder. With `validation` or `test` files, every file is used as given.

    Labels map to indices once, from the training data, for all splits: strings map to their
    sorted unique values (or to `label_names` order); integers are class indices 0..K-1 named
    "0".."K-1" (or indices into `label_names`, unless they spell its names).
    """
    table = _read_table(Path(train), text_column, label_column)
    if validation is None and test is None:
        parts = _split_table(table, split_fractions, seed)
    else:
        parts = {"train": table}
        for name, file in (("validation", validation), ("test", test)):
            if file is not None:
                parts[name] = _read_table(Path(file), text_column, label_column)
    names, lookup, known = _label_mapping(parts["train"], label_names)
    made = {"train": _to_dataset(parts["train"], names, lookup, known, None)}
    seen = set(made["train"].labels.tolist())
    if len(seen) < 2:
        raise DataError(
            f"{made['train'].source}: the training data has only one class "
            f"({names[seen.pop()]!r}); a classifier needs at least two"
        )
    for name in ("validation", "test"):
        if name in parts:
            made[name] = _to_dataset(parts[name], names, lookup, known, seen)
    return DataSplits(made["train"], made.get("validation"), made.get("test"), names)


def _split_table(table: _Table, fractions: Sequence[float], seed: int) -> dict[str, _Table]:
    fractions = tuple(float(f) for f in fractions)
    if (
        len(fractions) != 3
        or min(fractions) < 0
        or fractions[0] <= 0
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise DataError(
            f"split_fractions must be three non-negative numbers (train > 0) summing to 1, "
            f"got {fractions}"
        )
    n = len(table.texts)
    order = np.random.RandomState(seed).permutation(n)
    kept = [(name, f) for name, f in zip(("train", "validation", "test"), fractions) if f > 0]
    bounds, end = [], 0
    for k, (name, f) in enumerate(kept):
        end = n if k == len(kept) - 1 else end + int(n * f)
        bounds.append((name, f, end))
    parts, start = {}, 0
    for name, f, end in bounds:
        idx = order[start:end]
        if len(idx) == 0:
            raise DataError(
                f"{table.path}: the {name} split is empty ({n} rows x {f} -> 0); "
                "use more rows or change split_fractions"
            )
        parts[name] = _Table(
            table.path,
            [table.texts[i] for i in idx],
            [table.labels[i] for i in idx],
            [table.lines[i] for i in idx],
            table.label_column,
            source=f"{table.path}:{name}",
        )
        start = end
    return parts


def _label_mapping(
    train: _Table, label_names: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[str, int], str]:
    """Names, a lookup from each label's text to its index (ints and strings alike go by text),
    and how to describe the allowed labels in an error."""
    all_int = all(isinstance(v, int) for v in train.labels)
    if label_names is None:
        if all_int:
            negative = [(v, ln) for v, ln in zip(train.labels, train.lines) if v < 0]
            if negative:
                v, ln = negative[0]
                raise DataError(
                    f"{train.path}: line {ln}: integer label {v} in column {train.label_column!r}; "
                    "integer labels are class indices and must be >= 0"
                )
            names = tuple(str(i) for i in range(max(train.labels) + 1))
        else:
            names = tuple(sorted({str(v) for v in train.labels}))
        return (
            names,
            {n: i for i, n in enumerate(names)},
            f"the training data's labels {list(names)}",
        )
    names = tuple(str(n) for n in label_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"label_names must be at least two distinct names, got {list(names)}")
    if all_int and not all(str(v) in names for v in train.labels):
        known = f"the class indices 0..{len(names) - 1} of label_names {list(names)}"
        return names, {str(i): i for i in range(len(names))}, known
    return names, {n: i for i, n in enumerate(names)}, f"label_names {list(names)}"


def _to_dataset(table: _Table, names, lookup, known: str, train_labels: set | None) -> TextDataset:
    """Map labels to indices; `train_labels` (None for the training split) are the indices a
    validation or test row may use."""
    labels = np.empty(len(table.labels), dtype=np.int32)
    for i, (v, line) in enumerate(zip(table.labels, table.lines)):
        index = lookup.get(str(v))
        if index is None:
            raise DataError(
                f"{table.path}: line {line}: label {v!r} in column {table.label_column!r} "
                f"is not one of {known}"
            )
        if train_labels is not None and index not in train_labels:
            raise DataError(
                f"{table.path}: line {line}: label {v!r} in column {table.label_column!r} "
                "does not occur in the training data"
            )
        labels[i] = index
    return TextDataset(tuple(table.texts), labels, names, table.source or str(table.path))


def load_data(spec: str, **kw) -> DataSplits:
    """The book's data set for "sms-spam" (kw: path, seed, progress), else a training file for
    `load_splits` (kw: its keyword arguments). None-valued kw are ignored, so a CLI can pass every
    option through."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if spec in ("sms-spam", "sms_spam"):
        extra = sorted(set(kw) - {"path", "seed", "progress"})
        if extra:
            raise DataError(f"data 'sms-spam' has fixed columns and splits; {extra} do not apply")
        return load_sms_spam(
            kw.get("path"), seed=kw.get("seed", 123), progress=kw.get("progress", True)
        )
    kw.pop("progress", None)
    return load_splits(spec, **kw)


# ---------------------------------------------------------------------------------------------
# Tokens, padding, batches


def encode_texts(
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    max_length: int,
    *,
    source: str = "texts",
) -> tuple[list[np.ndarray], int]:
    """Token arrays (int32) cut to `max_length`, and how many were cut.

    The book keeps the first `max_length` tokens; so does this. A text with no tokens cannot be
    classified (there is no last token to pool), so it raises naming `source` and its index.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    seqs, truncated = [], 0
    for i, text in enumerate(texts):
        ids = np.asarray(encode(text), dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise DataError(f"{source}: text at index {i} encodes to no tokens: {text!r}")
        if ids.size > max_length:
            ids = ids[:max_length]
            truncated += 1
        seqs.append(ids)
    return seqs, truncated


def pad_batch(
    seqs: Sequence[np.ndarray], length: int | None = None, pad_id: int = _PAD_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to `length` (None: the batch's longest): ids int32 [B, L] and lengths int32 [B].

    The lengths let the model pool at each text's last real token instead of a pad.
    """
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    if length is None:
        length = int(lengths.max()) if len(seqs) else 0
    if len(seqs) and lengths.min() == 0:
        raise DataError(f"sequence {int(np.argmin(lengths))} of the batch is empty")
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(
                f"sequence {i} of the batch has {len(s)} tokens, more than the pad length {length}"
            )
        ids[i, : len(s)] = s
    return ids, lengths


def resolve_pad_length(
    padding: str | int, train_seqs: Sequence[np.ndarray], context_length: int
) -> int | None:
    """Fixed pad length for `padding`, or None for per-batch lengths.

    "longest" (the book's default) is the longest training sequence, "context" the model's
    context_length, "none" pads each batch to its own longest; an int (or digit string, as from
    the command line) must lie in 1..context_length.
    """
    if isinstance(padding, str) and padding.strip().isdigit():
        padding = int(padding)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer, str)):
        raise DataError(f"padding must be one of {PADDING_MODES} or an integer, got {padding!r}")
    if isinstance(padding, str):
        if padding == "none":
            return None
        if padding == "context":
            return int(context_length)
        if padding != "longest":
            raise DataError(
                f"padding must be one of {PADDING_MODES} or an integer, got {padding!r}"
            )
        if not len(train_seqs):
            raise DataError("padding 'longest' needs training sequences, got none")
        longest = max(len(s) for s in train_seqs)
        if longest > context_length:
            raise DataError(
                f"padding 'longest': the longest training sequence has {longest} tokens, more than "
                f"context_length {context_length}; truncate the texts first"
            )
        return int(longest)
    if not 1 <= padding <= context_length:
        raise DataError(
            f"padding must be between 1 and context_length {context_length}, got {padding}"
        )
    return int(padding)


def batches(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool
) -> list[np.ndarray]:
    """Index batches over range(n). The shuffled order depends only on (seed, epoch), so a run
    resumed at an epoch replays exactly the order it would have seen."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def length_buckets(lengths: np.ndarray, bucket_lengths: Sequence[int]) -> np.ndarray:
    """The smallest bucket length >= each length: padding to a few lengths bounds recompiles."""
    buckets = np.sort(np.asarray(bucket_lengths, dtype=np.int64))
    lengths = np.asarray(lengths)
    if buckets.size == 0:
        raise ValueError("bucket_lengths is empty")
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(
            f"length {int(lengths.max())} exceeds the largest bucket {int(buckets[-1])}"
        )
    return buckets[np.searchsorted(buckets, lengths, side="left")].astype(np.int32)


def fine_bucket_lengths(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two and 1.5 times them (16, 24, 32, 48, 64, 96, 128, 192, ...) from `smallest`,
    capped by `max_length`: inference pads less than with powers of two alone, for a few more
    compiled shapes."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}")
    sizes = sorted({n for k in range(1, max_length.bit_length() + 1) for n in (2 ** k, 3 * 2 ** (k - 1))})
    out = [n for n in sizes if smallest <= n < max_length]
    return (*out, max_length)


def default_bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest`, capped by `max_length` as the last bucket."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}")
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)
