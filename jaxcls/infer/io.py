"""Texts to classify, streamed in chunks, and prediction files written atomically.

Reading goes through jaxcls.data.tables, the reader training uses too, so a file means the same
texts to both. The reader never holds a whole file: it hands out lists of at most `chunk_size`
texts, so a file larger than memory streams through the predictor.

Invalid UTF-8 is not fatal here (unlike training data): a line holding bytes that are not UTF-8 is
decoded with U+FFFD replacement characters and classified anyway, so every input row still gets
its prediction. The reader counts such lines (`invalid_lines`) and remembers the first one
(`first_invalid_line`); `jaxcls classify` reports both on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from jaxcls.data.tables import JSONL_SUFFIXES, TableReader
from jaxcls.infer.answers import answer, csv_header, csv_row, input_fields, option_count
from jaxcls.errors import DataError
from jaxcls.fileio import atomic_open
from jaxcls.infer.resume import PartialFile

CHUNK_SIZE = 4096


class TextReader:
    """Iterate over chunks (lists) of the texts in `path`.

    - `-`: standard input, a text per line; `.txt`: a text per line. Blank lines are skipped; the
      line ending is removed, other whitespace is kept.
    - `.csv` / `.tsv`: a header row, then the column `text_column` (default: the one column named
      "text" in any letter case). Quoted fields may span lines. An empty cell is an empty text.
    - `.jsonl`: an object per line with the key `text_column` (default "text"), or a bare JSON
      string. Blank lines are skipped.

    Errors (missing column, ragged row, malformed JSON) raise DataError naming the file and line.
    `rows` counts the texts read so far, `bytes_read` the bytes consumed (for a progress bar;
    `total_bytes` is the file's size, None for stdin).
    """

    def __init__(self, path: str | os.PathLike, *, text_column: str | None = None,
                 chunk_size: int = CHUNK_SIZE, stdin: IO[bytes] | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._table = TableReader(path, text_column=text_column, errors="replace", stdin=stdin)
        self.path = str(path)
        self.format = self._table.format
        self.text_column = text_column
        self.chunk_size = int(chunk_size)
        self.total_bytes = self._table.total_bytes
        self.rows = 0

    @property
    def bytes_read(self) -> int:
        return self._table.bytes_read

    @property
    def invalid_lines(self) -> int:
        return self._table.invalid_lines

    @property
    def first_invalid_line(self) -> int | None:
        return self._table.first_invalid_line

    def __iter__(self) -> Iterator[list[str]]:
        chunk: list[str] = []
        for row in self._table:
            chunk.append(row.text)
            self.rows += 1
            if len(chunk) >= self.chunk_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class ExampleReader:
    """Iterate over chunks (lists) of the examples in a CSV/TSV/JSONL table, for a layout of
    several parts: {"text", "text_pair"} (pair, similarity) or {"context", "question"?,
    "choices"} (choice). Rows are read by jaxcls.data.records, the reader training uses, with the
    same column names and `Columns` (the --pair-column, --context-column, ... flags); a bad row is
    the DataError training gives (file, line, column). `lines` holds the last chunk's file lines."""

    def __init__(self, path: str | os.PathLike, layout: str, columns=None, *, chunk_size: int = CHUNK_SIZE):
        from jaxcls.data.records import Columns, RecordReader

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if str(path) == "-":
            raise DataError(f"standard input holds a text per line; the {layout} layout needs a .csv, .tsv "
                            "or .jsonl table with a column per field")
        self._table = RecordReader(path)
        self.path, self.layout, self.columns = str(path), layout, columns or Columns()
        self.format, self.chunk_size = self._table.format, int(chunk_size)
        self.total_bytes = self._table.total_bytes
        self.rows, self.lines = 0, []
        self.invalid_lines, self.first_invalid_line = 0, None  # strict UTF-8: a bad byte is an error

    @property
    def bytes_read(self) -> int:
        return self._table.bytes_read

    def __iter__(self) -> Iterator[list[dict]]:
        chunk, self.lines = [], []
        for line, record, _ in self._table:
            chunk.append(self._fields(record, f"line {line}"))
            self.lines.append(line)
            self.rows += 1
            if len(chunk) >= self.chunk_size:
                yield chunk
                chunk, self.lines = [], []
        if chunk:
            yield chunk

    def _fields(self, record, where: str) -> dict:
        from jaxcls.data.records import record_fields

        return record_fields(self._table.name, record, self.layout, self.columns, where, self.format == "jsonl")


def read_texts(path, **kw) -> list[str]:
    """All texts of `path` at once (small files, tests)."""
    return [t for chunk in TextReader(path, **kw) for t in chunk]


# ---------------------------------------------------------------------------------------------
# Writers


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, a prediction file that could not be written: a folder, a name
    under a file, a folder that refuses a new file. Missing folders are fine (they are made)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; name a file in it, such as {path / 'predictions.jsonl'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{path}: cannot be written: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot be written: {folder} refuses a new file ({e.strerror})") from None


def _num(p) -> float:
    """Six significant digits: enough for a probability, short in a file."""
    return float(f"{float(p):.6g}")


class PredictionWriter:
    """Prediction rows to `.jsonl`/`.ndjson` or `.csv`/`.tsv` (`path`), or JSONL to `stream`.

    Each row has the text, its `label` and that label's `probability`, and the class
    probabilities: all of them (JSONL `probs` {name: p} in label order; CSV one `p_<name>`
    column each), or with `top_k` the k most likely in decreasing order (JSONL `probs` holds those
    k; CSV columns label_1, prob_1, ..., label_k, prob_k). Probabilities keep six significant
    digits. With a `task` other than single-label text (jaxcls.task), `write` takes examples and
    each row is infer/answers.py's per-task answer, inputs first; `top_k` is single-label only.
    A file is written to a temporary name and renamed into place on `close()`, so a
    reader never sees half a file; after an error (`abort()`, or leaving the `with` block by an
    exception) nothing is left behind. A JSONL file's temporary name is NAME.partial, written a
    chunk of whole rows at a time: a killed run leaves its rows there, and `resume=True` keeps
    them (infer/resume.py; the caller skips the texts they answer with `skip_done`).
    """

    def __init__(self, label_names: Sequence[str], path: str | os.PathLike | None = None, *,
                 stream: IO[str] | None = None, top_k: int | None = None, include_text: bool = True,
                 task=None, resume: bool = False):
        if (path is None) == (stream is None):
            raise ValueError("give exactly one of path and stream")
        self.task = None if task is None or (task.kind == "single" and task.inputs.kind == "text") else task
        if self.task is not None and top_k is not None:
            raise DataError(f"top-k ranks single-label probabilities; the {task.name} task has none to rank")
        self.label_names = tuple(label_names)
        C = len(self.label_names)
        if top_k is not None and top_k < 1:
            raise DataError(f"top-k must be >= 1, got {top_k}")
        self.top_k = None if top_k is None else min(int(top_k), C)
        self.include_text = include_text
        self.rows = 0
        self._ctx = self._partial = None
        if path is not None:
            suffix = Path(path).suffix.lower()
            if suffix in JSONL_SUFFIXES:
                self.format = "jsonl"
            elif suffix in (".csv", ".tsv"):
                self.format = suffix[1:]
            else:
                raise DataError(f"{path}: unknown output type {suffix or '(none)'!r}; "
                                "use .jsonl or .csv (or .tsv)")
            check_output_path(path)
            if self.format == "jsonl":
                self._partial = PartialFile(path, resume=resume)
                self._raw = self._partial.file
            elif resume:
                raise DataError(f"{path}: only a .jsonl output can be resumed (a CSV row may span lines)")
            else:
                self._ctx = atomic_open(path, "wb")
                self._raw = self._ctx.__enter__()
            self._out = io.TextIOWrapper(self._raw, encoding="utf-8", newline="")
        else:
            if resume:
                raise DataError("only a prediction file (--output FILE.jsonl) can be resumed")
            self.format = "jsonl"
            self._out = stream
        self.path = None if path is None else Path(path)
        self.resumed_rows = 0 if self._partial is None else self._partial.rows
        self._csv = None
        if self.format in ("csv", "tsv"):
            self._csv = csv.writer(self._out, delimiter="," if self.format == "csv" else "\t",
                                   lineterminator="\n")
            if self.task is not None:
                self._csv.writerow(csv_header(self.task, self.label_names, include_text))
                return
            head = ["text"] if include_text else []
            head += ["label", "probability"]
            if self.top_k is None:
                head += [f"p_{n}" for n in self.label_names]
            else:
                for k in range(1, self.top_k + 1):
                    head += [f"label_{k}", f"prob_{k}"]
            self._csv.writerow(head)

    def skip_done(self, chunks, source: str):
        """`chunks` of texts less those whose rows a resumed file already holds (checked)."""
        return chunks if self._partial is None else self._partial.skip_done(chunks, source)

    def write(self, texts: Sequence[str] | None, ids, probs) -> None:
        """One row per prediction: class ids [N] and probabilities [N, C] (with a task: the
        examples, and the Predictor's decisions and probabilities)."""
        probs = np.asarray(probs)
        ids = np.asarray(ids)
        if self.task is not None:
            return self._write_task(texts, ids, probs)
        lines = []
        for i in range(len(ids)):
            p = probs[i]
            label = self.label_names[int(ids[i])]
            if self.top_k is None:
                ranked = list(range(len(self.label_names)))
            else:
                ranked = [int(j) for j in np.argsort(-p, kind="stable")[: self.top_k]]
            text = texts[i] if (self.include_text and texts is not None) else None
            if self._csv is not None:
                row = [text] if self.include_text else []
                row += [label, _num(p[int(ids[i])])]
                if self.top_k is None:
                    row += [_num(p[j]) for j in ranked]
                else:
                    for j in ranked:
                        row += [self.label_names[j], _num(p[j])]
                self._csv.writerow(row)
            else:
                obj = {"text": text} if self.include_text else {}
                obj.update(label=label, probability=_num(p[int(ids[i])]),
                           probs={self.label_names[j]: _num(p[j]) for j in ranked})
                lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
            self.rows += 1
        self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        """Hand a chunk's rows to the OS at once, whole rows only: a run killed after this
        loses none of them (infer/resume.py), and a pipe's reader sees them now."""
        if lines:
            self._out.write("".join(lines))
        self._out.flush()

    def _write_task(self, examples, decisions, probs) -> None:
        lines = []
        for i in range(len(decisions)):
            example = examples[i] if examples is not None else None
            ans = answer(self.task, self.label_names, decisions[i], probs[i], n_options=option_count(example),
                         num=_num)
            if self._csv is not None:
                self._csv.writerow(csv_row(self.task, example, ans, self.include_text))
            else:
                obj = {**input_fields(self.task, example), **ans} if self.include_text else ans
                lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
            self.rows += 1
        self._emit(lines)

    def close(self) -> None:
        """Finish the file: rename it into place (a stream is only flushed)."""
        self._out.flush()
        if self._partial is not None:
            self._out.detach()
            partial, self._partial = self._partial, None
            partial.finish()
        elif self._ctx is not None:
            self._out.detach()
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)

    def abort(self, *, keep: bool = False) -> None:
        """Drop a file being written (an older file under the name stays); with `keep`, or when
        the run resumed a killed one's rows, a JSONL file's rows so far stay in NAME.partial."""
        if self._partial is not None:
            self._out.flush()
            self._out.detach()
            partial, self._partial = self._partial, None
            partial.keep() if keep or partial.rows else partial.discard()
        elif self._ctx is not None:
            self._out.detach()
            ctx, self._ctx = self._ctx, None
            try:
                ctx.__exit__(DataError, DataError("aborted"), None)
            except DataError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """An error drops the file; an interrupt (Ctrl-C, SystemExit) keeps a JSONL file's rows."""
        if exc_type is None:
            self.close()
        else:
            self.abort(keep=not issubclass(exc_type, Exception))
        return False
