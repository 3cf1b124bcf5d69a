"""Labelled examples for every task but single-label text: whole rows of a CSV/TSV/JSONL file read
into the fields a task layout needs (text, text_pair; context, question, choices) and a raw label
of the kind its objective needs (label names, numbers, an option). Column names follow Hugging
Face's (`text`, `text_pair`, `label`, `context`, `question`, `choices`); the `columns` mapping
renames them. Bad rows are DataErrors naming the file, the line and the column.

Single-label text keeps its own reader (tables.read_labelled), so its behaviour is unchanged."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxcls.data.tables import Row, TableReader
from jaxcls.errors import DataError
from jaxcls.task import parse_task_name

ROLES = ("text", "text_pair", "label", "context", "question", "choices")
_INT_RE = re.compile(r"\s*[+-]?\d+\s*")


class RecordReader(TableReader):
    """The reader's rows as whole records, {column: value}: JSON values keep their type, CSV fields
    are strings. A JSONL line must be an object; a CSV header must not repeat a name."""

    def __init__(self, path):
        super().__init__(path, labelled=True)  # labelled: tables only, no plain text lines
        self.header: list[str] = []

    def _header(self, header, line):
        if len(set(header)) != len(header):
            raise DataError(f"{self.name}: line {line}: repeated column names in header {header}")
        self.header = header
        return 0, 0

    def _csv_row(self, line, row, columns) -> Row:
        return Row(line, dict(zip(self.header, row)), None)

    def _json_row(self, number, obj) -> Row:
        return Row(number, obj, None)


@dataclass
class ExampleTable:
    """Every row of a file read for a task: the main text (text, or context), the other fields,
    the raw labels and the lines they start on."""

    path: Path
    texts: list[str]
    fields: list[dict]
    labels: list
    lines: list[int]
    label_column: str
    source: str = ""

    def subset(self, idx, source: str) -> "ExampleTable":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return ExampleTable(self.path, pick(self.texts), pick(self.fields), pick(self.labels),
                            pick(self.lines), self.label_column, source)


@dataclass
class Columns:
    """Which column holds each role (None: the Hugging Face name, any letter case), the option
    columns of a choice file without a `choices` list, and the separator of multi-label names in
    a CSV field."""

    names: dict = field(default_factory=dict)  # role -> column
    choice_columns: tuple[str, ...] = ()
    label_separator: str = ","


def _column(name: str, record: Mapping, role: str, wanted: str | None, where: str, *, optional=False):
    """The key of `record` for `role`: `wanted` exactly, or the one key spelling the role in any case."""
    if wanted is not None:
        if wanted in record:
            return wanted
    else:
        matches = [k for k in record if str(k).strip().lower() == role]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DataError(f"{name}: {where}: columns {matches} all match {role!r}; "
                            f"choose one with --{role.replace('_', '-')}-column")
    if optional:
        return None
    raise DataError(f"{name}: {where}: no column {wanted or role!r}; columns: {list(record)} "
                    f"(choose one with --{role.replace('_', '-')}-column)")


def _text(name, record, key, where) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{name}: {where}: column {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{name}: {where}: column {key!r} is empty")
    return value


def _choices(name, record, cols: Columns, where, jsonl: bool) -> list[str]:
    if cols.choice_columns:
        missing = [c for c in cols.choice_columns if c not in record]
        if missing:
            raise DataError(f"{name}: {where}: no option column {missing[0]!r} (--choice-columns); "
                            f"columns: {list(record)}")
        options = [record[c] for c in cols.choice_columns]
        options = [o for o in options if o not in (None, "")]  # a shorter row leaves columns empty
        key = ",".join(cols.choice_columns)
    else:
        key = _column(name, record, "choices", cols.names.get("choices"), where)
        options = record[key]
        if isinstance(options, str) and not jsonl:
            try:
                options = json.loads(options)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: {where}: column {key!r} must be a JSON list of options "
                                f"({e.msg} at column {e.colno})") from None
    if not isinstance(options, list) or not options:
        raise DataError(f"{name}: {where}: column {key!r} must be a non-empty list of options, got "
                        f"{json.dumps(options)[:80]}")
    for i, o in enumerate(options):
        if not isinstance(o, str) or not o.strip():
            raise DataError(f"{name}: {where}: option {i} in column {key!r} must be a non-empty string, "
                            f"got {json.dumps(o)[:80]}")
    return options


def read_examples(path: str | Path, task: str, cols: Columns | None = None) -> ExampleTable:
    """Every row of `path` for the `--task` name `task`: its fields and its raw label (a list of
    names for multilabel, a list of floats for regression, an option index for choice, a string or
    integer for single)."""
    cols = cols or Columns()
    kind, layout = parse_task_name(task)
    reader = RecordReader(path)
    name, jsonl = reader.name, reader.format == "jsonl"
    texts, fields, labels, lines, label_key = [], [], [], [], None
    for line, record, _ in reader:
        where = f"line {line}"
        label_key = _column(name, record, "label", cols.names.get("label"), where)
        if layout == "choice":
            key = _column(name, record, "context", cols.names.get("context"), where)
            ex = {"context": _text(name, record, key, where),
                  "choices": _choices(name, record, cols, where, jsonl)}
            q = _column(name, record, "question", cols.names.get("question"), where, optional=True)
            if q is not None and record[q] not in (None, ""):
                ex["question"] = _text(name, record, q, where)
            main = ex["context"]
        else:
            main = _text(name, record, _column(name, record, "text", cols.names.get("text"), where), where)
            ex = {"text": main}
            if layout != "text":
                key = _column(name, record, "text_pair", cols.names.get("text_pair"), where)
                ex["text_pair"] = _text(name, record, key, where)
        label = record[label_key]
        at = f"{name}: {where}: column {label_key!r}"
        labels.append(parse_label(kind, label, at, jsonl, cols.label_separator, ex.get("choices")))
        texts.append(main)
        fields.append(ex)
        lines.append(line)
    if not texts:
        raise DataError(f"{name}: no data rows")
    return ExampleTable(Path(path), texts, fields, labels, lines, label_key or "label")


def parse_label(kind: str, value: Any, at: str, jsonl: bool, separator: str, choices=None):
    """One row's label for objective `kind`; `at` names the file, line and column in errors."""
    if kind == "multilabel":
        return _names(value, at, jsonl, separator)
    if kind == "regression":
        return _numbers(value, at, jsonl)
    if kind == "choice":
        return _option(value, at, choices)
    if isinstance(value, str):
        value = value.strip()
        if not jsonl and _INT_RE.fullmatch(value):
            return int(value)
    if value is None or value == "" or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{at} must be a non-empty string or an integer, got {json.dumps(value)}")
    return value


def _names(value, at, jsonl, separator) -> list[str]:
    if isinstance(value, str) and not jsonl:
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{at}: not a JSON list of label names ({e.msg} at column {e.colno})") from None
        else:
            value = [p.strip() for p in text.split(separator)] if text else []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{at}: multi-label labels must be a list of label names, got {json.dumps(value)[:80]}")
    return sorted({v.strip() for v in value})


def _numbers(value, at, jsonl) -> list[float]:
    if isinstance(value, str) and not jsonl and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: not a JSON list of numbers ({e.msg} at column {e.colno})") from None
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise DataError(f"{at}: regression target {json.dumps(v)[:80]} is not a number")
        try:
            x = float(v)
        except (ValueError, OverflowError):
            raise DataError(f"{at}: regression target {v!r} is not a number") from None
        if not math.isfinite(x):
            raise DataError(f"{at}: regression target {v!r} is not finite")
        out.append(x)
    if not out:
        raise DataError(f"{at}: no regression target (an empty list)")
    return out


def _option(value, at, choices: Sequence[str]) -> int:
    """An option index, or the text of the right option."""
    n = len(choices)
    if isinstance(value, str) and _INT_RE.fullmatch(value) and value.strip() not in choices:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise DataError(f"{at}: label {value} is outside the {n} options (0..{n - 1})")
        return value
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    raise DataError(f"{at}: label {json.dumps(value)[:80]} is neither an option index (0..{n - 1}) "
                    "nor the text of one of the options")
