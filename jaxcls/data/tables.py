"""The one reader of CSV, TSV and JSONL tables (and of plain text lines), for training, evaluation
and inference alike.

Rows stream one at a time from the file's bytes, so inference can read a file larger than memory
in chunks while training reads every row through the same code. Errors a user can cause raise
`DataError` naming the file, the line (1-based, as an editor shows it) and the column.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, NamedTuple, Sequence

from jaxcls.errors import DataError

CSV_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
LINE_SUFFIXES = (".txt", ".text")
TABLE_KINDS = ", ".join([*CSV_SEPARATORS, *JSONL_SUFFIXES])
TEXT_KINDS = ", ".join([TABLE_KINDS, *LINE_SUFFIXES, "'-' (stdin)"])
_BOM = b"\xef\xbb\xbf"
_INT_RE = re.compile(r"[+-]?\d+")
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")
# The csv module refuses a field over 128 KiB by default, a limit that is process-wide; a text
# is as long as its file allows (the tokenizer reads only what it needs of it).
CSV_FIELD_LIMIT = 2**31 - 1


class Row(NamedTuple):
    line: int  # the 1-based line the row starts on
    text: str
    label: object  # str or int; None when unlabelled or a JSON null


def table_format(path: str | os.PathLike, *, labelled: bool) -> str:
    """'csv', 'tsv' or 'jsonl' from the name; unlabelled reading also takes 'lines' ('-', .txt).
    'sms' is UCI's SMSSpamCollection file: a TSV without a header, its columns label and text."""
    if str(path) == "-" and not labelled:
        return "lines"
    if Path(path).name == "SMSSpamCollection":
        return "sms"
    suffix = Path(path).suffix.lower()
    if suffix in CSV_SEPARATORS:
        return "tsv" if CSV_SEPARATORS[suffix] == "\t" else "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in LINE_SUFFIXES and not labelled:
        return "lines"
    kinds = TABLE_KINDS if labelled else TEXT_KINDS
    raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; supported: {kinds}")


class TableReader:
    """Iterate over the `Row`s of `path` ('-' is stdin, read as a text per line).

    The text column is `text_column`, or by default the one column named "text" in any letter
    case (so the book's "Label,Text" files load as they are); with `labelled`, the label column
    likewise. CSV/TSV: a header row, quoted fields may span lines, blank lines are skipped.
    JSONL: an object per line, or (unlabelled) a bare JSON string. Lines: blank lines are skipped,
    the line ending is removed, other whitespace is kept.

    `errors="strict"` makes invalid UTF-8 fatal (training data); "replace" reads bad bytes as
    U+FFFD and counts the lines (`invalid_lines`, `first_invalid_line`) so every input row still
    gets a prediction. `bytes_read` of `total_bytes` (None for stdin) can drive a progress bar.
    """

    def __init__(self, path: str | os.PathLike, *, text_column: str | None = None,
                 label_column: str | None = None, labelled: bool = False, errors: str = "strict",
                 stdin: IO[bytes] | None = None):
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        self.format = table_format(path, labelled=labelled)
        self.name = "-" if str(path) == "-" else str(Path(path))
        self.suffix = Path(path).suffix
        self.wanted = {"text": text_column, "label": label_column}
        self.labelled = labelled
        self.errors = errors
        self._stdin = stdin
        self.text_key: str | None = None
        self.label_key: str | None = None
        self.bytes_read = 0
        self.invalid_lines = 0
        self.first_invalid_line: int | None = None
        self.total_bytes: int | None = None
        if self.name != "-":
            if not Path(path).is_file():
                raise DataError(f"{self.name}: no such file")
            self.total_bytes = Path(path).stat().st_size

    def __iter__(self) -> Iterator[Row]:
        own = self.name != "-"
        if own:
            raw = open(self.name, "rb")
        else:
            raw = self._stdin if self._stdin is not None else sys.stdin.buffer
        try:
            lines = self._lines(raw)
            if self.format == "lines":
                yield from self._plain(lines)
            elif self.format == "jsonl":
                yield from self._jsonl(lines)
            elif self.format == "sms":
                yield from self._sms(lines)
            else:
                yield from self._csv(lines, "\t" if self.format == "tsv" else ",")
        finally:
            if own:
                raw.close()

    def _lines(self, raw: IO[bytes]) -> Iterator[tuple[int, str]]:
        """(line number, decoded line with its ending). Neither b"\\n" nor b"\\r" occurs inside
        a UTF-8 multi-byte sequence, so splitting the bytes first is safe. CSV/TSV lines also
        end at a lone "\\r", as the csv module expects; JSONL and text lines only at "\\n"."""
        if self.format in ("csv", "tsv"):
            raw = (piece for data in raw for piece in _cr_split(data))
        for number, data in enumerate(raw, start=1):
            start = 3 if number == 1 and data.startswith(_BOM) else 0
            try:
                line = data[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                if self.errors == "strict":
                    at = self.bytes_read + start + e.start
                    raise DataError(
                        f"{self.name}: line {number}: not valid UTF-8 (byte offset {at}: "
                        f"{data[start + e.start : start + e.start + 1]!r}); save the file as UTF-8"
                    ) from None
                line = data[start:].decode("utf-8", errors="replace")
                self.invalid_lines += 1
                if self.first_invalid_line is None:
                    self.first_invalid_line = number
            self.bytes_read += len(data)
            yield number, line

    def _plain(self, lines) -> Iterator[Row]:
        for number, line in lines:
            text = line.rstrip("\r\n")
            if text.strip():
                yield Row(number, text, None)

    def _sms(self, lines) -> Iterator[Row]:
        """label<TAB>text per line, no header and no quoting: a quote is part of the message."""
        self.label_key, self.text_key = "label", "text"
        for number, line in lines:
            label, tab, text = line.rstrip("\r\n").partition("\t")
            if not tab and label.strip():
                raise DataError(f"{self.name}: line {number}: no tab between label and text")
            if tab:
                yield Row(number, text, label if self.labelled else None)

    def _pick(self, columns: Sequence[str], role: str, where: str) -> str:
        """The exact column asked for; for the default name, any single case-insensitive match."""
        wanted = self.wanted[role]
        if wanted is not None:
            if wanted in columns:
                return wanted
        else:
            matches = [c for c in columns if c.strip().lower() == role]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise DataError(f"{self.name}: {where}columns {matches} all match {role!r}; "
                                f"choose one with --{role}-column")
        raise DataError(
            f"{self.name}: {where}no column {role if wanted is None else wanted!r}; "
            f"columns: {list(columns)} "
            f"(choose one with --{role}-column)"
        )

    def _jsonl(self, lines) -> Iterator[Row]:
        for number, line in lines:
            if not line.strip():
                continue
            obj = _json(self.name, number, line)
            if isinstance(obj, str) and not self.labelled:
                yield Row(number, obj, None)
            elif isinstance(obj, dict):
                yield self._json_row(number, obj)
            else:
                kinds = "a JSON object" if self.labelled else "a JSON object or string"
                raise DataError(
                    f"{self.name}: line {number}: expected {kinds}, got {type(obj).__name__}"
                )

    def _json_row(self, number: int, obj: dict) -> Row:
        where = f"line {number}: "
        self.text_key = self._pick(list(obj), "text", where)
        label = None
        if self.labelled:
            self.label_key = self._pick(list(obj), "label", where)
            label = obj[self.label_key]
        text = obj[self.text_key]
        if not isinstance(text, str):
            raise DataError(
                f"{self.name}: {where}column {self.text_key!r} must be a string, "
                f"got {type(text).__name__}"
            )
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise DataError(
                f"{self.name}: {where}column {self.label_key!r} must be a string or an integer, "
                f"got {json.dumps(label)}"
            )
        return Row(number, text, label)

    def _csv(self, lines, sep: str) -> Iterator[Row]:
        last = [0]  # the number of the last line the csv module has taken

        def feed():
            for number, line in lines:
                last[0] = number
                yield line

        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        reader = csv.reader(feed(), delimiter=sep, strict=True)
        header, start = None, 1
        try:
            for row in reader:
                line, start = start, last[0] + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if header is None:
                    header = row
                    columns = self._header(header, line)
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{self.name}: line {line}: {len(row)} fields where the header has "
                        f"{len(header)} ({header}); check quoting and separators"
                    )
                yield self._csv_row(line, row, columns)
        except csv.Error as e:
            where = f"line {start}" if last[0] <= start else f"lines {start}-{last[0]}"
            raise DataError(f"{self.name}: {where}: malformed {self.suffix} ({e})") from None
        if header is None:
            raise DataError(f"{self.name}: empty file (no header line)")

    def _csv_row(self, line: int, row: list[str], columns: tuple[int, int | None]) -> Row:
        return Row(line, row[columns[0]], row[columns[1]] if self.labelled else None)

    def _header(self, header: list[str], line: int) -> tuple[int, int | None]:
        if len(set(header)) != len(header):
            raise DataError(f"{self.name}: line {line}: repeated column names in header {header}")
        self.text_key = self._pick(header, "text", "header has ")
        if not self.labelled:
            return header.index(self.text_key), None
        self.label_key = self._pick(header, "label", "header has ")
        return header.index(self.text_key), header.index(self.label_key)


def _cr_split(data: bytes) -> Sequence[bytes]:
    """`data` cut after each lone CR; a line ending CRLF or nothing else is the usual case."""
    cr = data.count(b"\r")
    if cr == 0 or (cr == 1 and data.endswith(b"\r\n")):
        return (data,)
    return [piece for piece in _LONE_CR.split(data) if piece]


def _json(name: str, number: int, line: str):
    try:
        return json.loads(line.rstrip("\r\n"))  # so a column number points into the line
    except json.JSONDecodeError as e:
        why = f"{e.msg} at column {e.colno}"
    except (ValueError, RecursionError) as e:  # an integer of >4300 digits, nesting too deep
        why = str(e).split(";")[0] if isinstance(e, ValueError) else "nested too deeply"
    raise DataError(f"{name}: line {number}: invalid JSON ({why})")


@dataclass(frozen=True)
class LabelledTable:
    """Every row of a labelled file, with the line each starts on (for messages)."""

    path: Path
    texts: list[str]
    labels: list  # str or int per row
    lines: list[int]
    label_column: str
    source: str = ""  # the split's name for TextDataset.source; the file's path when empty


def read_labelled(path: str | Path, *, text_column: str | None = None,
                  label_column: str | None = None) -> LabelledTable:
    """Rows with a non-empty text and label. CSV labels that all read as integers become ints,
    otherwise stripped strings; JSONL keeps each label's JSON type. Files must be UTF-8."""
    reader = TableReader(path, text_column=text_column, label_column=label_column,
                         labelled=True)
    texts, labels, lines = [], [], []
    for line, text, label in reader:
        if not text.strip():
            raise DataError(f"{reader.name}: line {line}: column {reader.text_key!r} is empty")
        if isinstance(label, str):
            label = label.strip()
        if label is None or label == "":
            raise DataError(
                f"{reader.name}: line {line}: column {reader.label_key!r} is empty (missing label)"
            )
        texts.append(text)
        labels.append(label)
        lines.append(line)
    if not texts:
        raise DataError(f"{reader.name}: no data rows")
    if reader.format != "jsonl" and all(_INT_RE.fullmatch(v) for v in labels):
        labels = [int(v) for v in labels]
    return LabelledTable(Path(path), texts, labels, lines, reader.label_key)


def read_table(
    path: str | Path, *, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list]:
    """Texts and labels from a CSV, TSV (.tsv/.tab) or JSONL (.jsonl/.ndjson) file; see
    `read_labelled` for the rules."""
    table = read_labelled(path, text_column=text_column, label_column=label_column)
    return table.texts, table.labels
