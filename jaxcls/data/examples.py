"""One encoder from an example's fields to its token rows, for every task layout: training, eval,
`classify`, `serve` and `Classifier.predict` all build rows here, so a text pair means the same
tokens wherever it comes from.

The contract (`ExampleEncoder.rows(fields) -> list of int32 arrays`, R = task.rows_per_example):

  layout      fields                                rows
  text        text                                  [text]
  pair        text, text_pair                       [text DELIM text_pair]
  similarity  text, text_pair                       [text DELIM text_pair, text_pair DELIM text]
  choice      context, question (optional), choices [context question DELIM option_i for each i]
                                                    + a length-0 row per missing option

`fields` is a mapping with those keys (a plain string is `{"text": s}`). Texts are encoded as plain
text (`encode`, which never reads '<|endoftext|>' in data as the special token); the default
delimiter IS the special token, id 50256, and any other delimiter is encoded as plain text. A
choice example's first part is `context` alone, or `context + " " + question`.

Truncation, to `max_length` tokens per row:
  text: the first `max_length` tokens (the book's rule, unchanged).
  two parts (pair, similarity, choice): each part keeps its head; the delimiter is never cut. When
  the parts do not fit in `budget = max_length - len(DELIM)` tokens, the second part (text_pair,
  the option) keeps `min(len, max(budget - len(first), budget // 2))` tokens and the first part the
  rest: a short part is never cut, two long parts share the budget about evenly, and neither is
  ever cut to nothing (`budget >= 2` is required). Keeping heads means only the first `budget + 1`
  tokens of any text are ever needed, so a huge text costs no more than a short one.
`Truncation` counts the examples, the rows and each part that was cut, for the log line.

Errors are DataErrors naming `source`, the example's index and the field: a text, pair text,
context or option that encodes to no tokens, a choice example with more options than the task
takes, and a missing field."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxcls.errors import ConfigError, DataError
from jaxcls.task import DEFAULT_DELIMITER, TaskBase
from jaxcls.tokenizer import PAD_ID

try:  # the bounded encoder (reads only the start of a huge text), where the tokenizer has it
    from jaxcls.tokenizer import first_tokens as _first_tokens
except ImportError:  # pragma: no cover - older tokenizer module
    def _first_tokens(encode, text, max_tokens):
        return list(encode(text))[:max_tokens]

Encode = Callable[[str], Sequence[int]]
PART_NAMES = {"text": ("text", None), "pair": ("text", "text_pair"),
              "similarity": ("text", "text_pair"), "choice": ("context", "option")}


def delimiter_ids(delimiter: str, encode: Encode) -> np.ndarray:
    """The delimiter's tokens: GPT-2's special token for the default, else the string as text."""
    if delimiter == DEFAULT_DELIMITER:
        return np.array([PAD_ID], np.int32)
    ids = np.asarray(list(encode(delimiter)), np.int32).reshape(-1)
    if ids.size == 0:
        raise ConfigError(f"--delimiter {delimiter!r} encodes to no tokens")
    return ids


@dataclasses.dataclass
class Truncation:
    """How often rows were cut, and which part: `first` (text, context) and `second` (text_pair,
    option) count cut parts, `rows` cut rows, `examples` examples with any cut row."""

    examples: int = 0
    rows: int = 0
    first: int = 0
    second: int = 0

    def describe(self, layout: str, n: int, max_length: int) -> str | None:
        """A one-line summary ('12 of 300 examples cut to 64 tokens (text cut in 12 rows, text_pair
        in 3)'), or None when nothing was cut."""
        if not self.examples:
            return None
        first, second = PART_NAMES[layout]
        parts = [f"{first} cut in {self.first} rows"] + ([f"{second} in {self.second}"] if second else [])
        return f"{self.examples} of {n} examples cut to {max_length} tokens ({', '.join(parts)})"


@dataclasses.dataclass
class ExampleEncoder:
    """Token rows of examples for `task`'s layout (see the module docstring for the contract)."""

    task: TaskBase
    encode: Encode
    max_length: int
    truncation: Truncation = dataclasses.field(default_factory=Truncation)

    def __post_init__(self):
        if self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        self.layout = self.task.inputs.kind
        self.delim = delimiter_ids(self.task.inputs.delimiter, self.encode) if self.layout != "text" else None
        if self.delim is not None and self.max_length - len(self.delim) < 2:
            raise ConfigError(f"max_length {self.max_length} leaves no room for two parts and the "
                              f"{len(self.delim)}-token delimiter {self.task.inputs.delimiter!r}")

    def _head(self, text, field: str, where: str, limit: int) -> np.ndarray:
        if not isinstance(text, str):
            raise DataError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
        ids = np.asarray(_first_tokens(self.encode, text, limit), np.int32).reshape(-1)
        if ids.size == 0:
            raise DataError(f"{where}: {field!r} encodes to no tokens: {text[:80]!r}")
        return ids

    def _join(self, a: np.ndarray, b: np.ndarray, cut: list[bool]) -> np.ndarray:
        """first DELIM second within max_length; marks which part was cut in `cut`."""
        budget = self.max_length - len(self.delim)
        if len(a) + len(b) > budget:
            keep_b = min(len(b), max(budget - len(a), budget // 2))
            keep_a = min(len(a), budget - keep_b)
            cut[0] |= keep_a < len(a)
            cut[1] |= keep_b < len(b)
            a, b = a[:keep_a], b[:keep_b]
        return np.concatenate([a, self.delim, b])

    def rows(self, fields: Mapping[str, Any] | str, *, where: str = "example") -> list[np.ndarray]:
        """The example's R token rows (int32); `where` names it in errors ('train.csv: line 4')."""
        if isinstance(fields, str):
            fields = {"text": fields}
        if self.layout == "choice":
            return self._choice_rows(fields, where)
        limit = self.max_length + 1
        text = self._head(_field(fields, "text", where), "text", where, limit)
        if self.layout == "text":
            if len(text) > self.max_length:
                self.truncation.examples += 1
                self.truncation.rows += 1
                self.truncation.first += 1
            return [text[:self.max_length]]
        pair = self._head(_field(fields, "text_pair", where), "text_pair", where, limit)
        cut = [False, False]
        rows = [self._join(text, pair, cut)]
        if self.layout == "similarity":
            back = [False, False]
            rows.append(self._join(pair, text, back))
            self._count(cut, [back[1], back[0]], 2 - (cut == [False, False]) - (back == [False, False]))
        else:
            self._count(cut, [False, False], int(any(cut)))
        return rows

    def _choice_rows(self, fields: Mapping[str, Any], where: str) -> list[np.ndarray]:
        n = self.task.num_choices
        choices = _field(fields, "choices", where)
        if isinstance(choices, str) or not isinstance(choices, Sequence) or not len(choices):
            raise DataError(f"{where}: 'choices' must be a non-empty list of option texts, got {choices!r}")
        if len(choices) > n:
            raise DataError(f"{where}: {len(choices)} options, more than the task's {n} (num_choices)")
        context = _field(fields, "context", where)
        question = fields.get("question")
        if question is not None and not isinstance(question, str):
            raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}")
        if question and isinstance(context, str):
            context = f"{context} {question}"
        limit = self.max_length + 1
        first = self._head(context, "context", where, limit)
        cut, rows = [False, False], []
        for i, option in enumerate(choices):
            row_cut = [False, False]
            rows.append(self._join(first, self._head(option, f"choices[{i}]", where, limit), row_cut))
            self.truncation.rows += any(row_cut)
            cut = [cut[0] | row_cut[0], cut[1] | row_cut[1]]
            self.truncation.first += row_cut[0]
            self.truncation.second += row_cut[1]
        self.truncation.examples += any(cut)
        return rows + [np.zeros(0, np.int32)] * (n - len(choices))

    def _count(self, a: list[bool], b: list[bool], rows: int):
        self.truncation.rows += rows
        self.truncation.examples += rows > 0
        self.truncation.first += a[0] + b[0]
        self.truncation.second += a[1] + b[1]

    def describe(self, n: int) -> str | None:
        return self.truncation.describe(self.layout, n, self.max_length)


def _field(fields: Mapping[str, Any], key: str, where: str):
    value = fields.get(key)
    if value is None:
        raise DataError(f"{where}: the {key!r} field is missing (the task's layout needs it)")
    return value


def encode_examples(task: TaskBase, encode: Encode, examples: Sequence[Mapping[str, Any] | str],
                    max_length: int, *, source: str = "examples",
                    where: Sequence[str] | None = None) -> tuple[list[list[np.ndarray]], ExampleEncoder]:
    """Every example's rows, and the encoder (its `truncation` counts and `describe`). `where[i]`
    names example i in errors (default: '<source>: example i')."""
    enc = ExampleEncoder(task, encode, max_length)
    out = [enc.rows(ex, where=where[i] if where is not None else f"{source}: example {i}")
           for i, ex in enumerate(examples)]
    return out, enc
