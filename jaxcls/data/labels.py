"""The one mapping from label values to class ids, and the labelled data sets it produces.

Training splits, evaluation, `Classifier.fit((texts, labels))` and the CLI all go through
`LabelMap`, so a label means the same class wherever it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from jaxcls.errors import DataError


@dataclass(frozen=True, eq=False)
class TextDataset:
    """One split: texts and their labels. Labels are class indices into `label_names` (int32 (n,):
    single-label, or option indices for choice), or, given as a 2-D array, float32 (n, K) multi-hot
    labels or regression targets, one column per name. `fields` holds each example's other inputs
    for layouts beyond plain text (text_pair; context, question, choices); `texts` is then the
    text, or the context."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str
    fields: tuple[dict, ...] | None = None

    def __post_init__(self):
        texts = tuple(self.texts)
        names = tuple(self.label_names)
        if np.ndim(self.labels) == 2:
            labels = np.array(self.labels, dtype=np.float32)
            if labels.shape[1] != len(names):
                raise DataError(f"{self.source}: {labels.shape[1]} label columns for {len(names)} names {names}")
        else:
            labels = np.array(self.labels, dtype=np.int32).reshape(-1)
            if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
                raise DataError(f"{self.source}: labels must lie in 0..{len(names) - 1} ({names})")
        labels.flags.writeable = False  # frozen means the labels too
        if len(labels) != len(texts):
            raise DataError(f"{self.source}: {len(texts)} texts but {len(labels)} labels")
        if self.fields is not None:
            if len(self.fields) != len(texts):
                raise DataError(f"{self.source}: {len(texts)} texts but {len(self.fields)} examples")
            object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)

    def __len__(self) -> int:
        return len(self.texts)

    def examples(self) -> list:
        """Each example's inputs for data.examples.ExampleEncoder: the text, or its fields."""
        return list(self.texts) if self.fields is None else list(self.fields)


@dataclass(frozen=True, eq=False)
class DataSplits:
    """Train plus optional validation and test splits that share one label mapping, read for the
    `--task` name `task` (label_names: option indices '0'..'N-1' for choice)."""

    train: TextDataset
    validation: TextDataset | None
    test: TextDataset | None
    label_names: tuple[str, ...]
    task: str = "single"


def is_int_label(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _shown(value):
    """A label as a message shows it: 3 and 'spam', not np.int64(3) or np.str_('spam')."""
    if is_int_label(value):
        return int(value)
    return str(value) if isinstance(value, str) else value


def _at(source: str, lines: Sequence[int] | None, i: int, column: str | None) -> tuple[str, str]:
    """The message's prefix naming the row, and its ' in column ...' part."""
    where = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
    return f"{source}: {where}: ", "" if column is None else f" in column {column!r}"


@dataclass(frozen=True)
class LabelMap:
    """Class names, a lookup from each label's text to its class id (integers and strings alike
    go by text), and how to describe the allowed labels in an error."""

    names: tuple[str, ...]
    lookup: Mapping[str, int]
    known: str

    @classmethod
    def onto(cls, names: Sequence[str], labels: Sequence = (), *,
             described: str = "label_names") -> LabelMap:
        """Labels onto fixed `names`: by name, except that integer labels which do not all spell
        names are class indices 0..K-1."""
        names = tuple(str(n) for n in names)
        if all(is_int_label(v) for v in labels) and not all(str(v) in names for v in labels):
            known = f"the class indices 0..{len(names) - 1} of {described} {list(names)}"
            return cls(names, {str(i): i for i in range(len(names))}, known)
        return cls(names, {n: i for i, n in enumerate(names)}, f"{described} {list(names)}")

    @classmethod
    def infer(cls, labels: Sequence, *, source: str, lines: Sequence[int] | None = None,
              column: str | None = None) -> LabelMap:
        """Names from training labels: integers are class indices that must cover 0..K-1 exactly,
        named "0".."K-1"; anything else maps to its sorted distinct values.

        Gapped integers (0 and 7 would make an 8-class head with six empty classes) and a mix of
        integers and strings raise a DataError naming the first offending line rather than
        building a head with classes that have no data; use string labels (or `label_names`)
        to name classes freely. Only the distinct values are looked at, so a huge label costs
        nothing."""
        if not len(labels):
            raise DataError(f"{source}: no labels")
        order = range(len(labels)) if lines is None else sorted(range(len(labels)), key=lines.__getitem__)
        ints = [is_int_label(v) for v in labels]
        if any(ints) and not all(ints):
            i = next(k for k in order if ints[k])
            j = next(k for k in order if not ints[k])
            prefix, col = _at(source, lines, j, column)
            other = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
            raise DataError(f"{prefix}label {_shown(labels[j])!r}{col} is a string but {other} has "
                            f"the integer label {int(labels[i])}; use all integers (class indices) "
                            "or all strings")
        if not all(ints):
            names = tuple(sorted({str(v) for v in labels}))
            return cls(names, {n: i for i, n in enumerate(names)},
                       f"the training data's labels {list(names)}")
        for i, v in enumerate(labels):
            if v < 0:
                prefix, col = _at(source, lines, i, column)
                raise DataError(f"{prefix}integer label {int(v)}{col}; "
                                "integer labels are class indices and must be >= 0")
        distinct = sorted({int(v) for v in labels})
        if distinct[-1] != len(distinct) - 1:
            missing = next(k for k, v in enumerate(distinct) if k != v)
            top = next(i for i in order if int(labels[i]) == distinct[-1])
            prefix, col = _at(source, lines, top, column)
            empty = distinct[-1] + 1 - len(distinct)
            raise DataError(f"{prefix}integer label {distinct[-1]}{col} would make a "
                            f"{distinct[-1] + 1}-class head with no rows for {empty} of its classes "
                            f"(the first is {missing}); integer labels are class indices 0..K-1: "
                            "renumber them or use string labels")
        names = tuple(str(i) for i in distinct)
        return cls(names, {n: i for i, n in enumerate(names)},
                   f"the training data's labels {list(names)}")

    @classmethod
    def for_training(cls, labels: Sequence, label_names: Sequence[str] | None, *, source: str,
                     lines: Sequence[int] | None = None, column: str | None = None) -> LabelMap:
        """`infer` from the labels, or `onto` the user's `label_names` (checked first)."""
        if label_names is None:
            return cls.infer(labels, source=source, lines=lines, column=column)
        names = [str(n) for n in label_names]
        if len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"label_names must be at least two distinct names, got {names}")
        return cls.onto(names, labels)

    def ids(self, labels: Sequence, *, source: str, lines: Sequence[int] | None = None,
            column: str | None = None) -> np.ndarray:
        """Class ids int32; a label outside the mapping raises naming `source` and its line (or
        its 1-based row when there are no `lines`)."""
        out = np.empty(len(labels), dtype=np.int32)
        for i, v in enumerate(labels):
            index = self.lookup.get(str(v))
            if index is None:
                prefix, col = _at(source, lines, i, column)
                raise DataError(f"{prefix}label {_shown(v)!r}{col} is not one of {self.known}")
            out[i] = index
        return out


def label_ids(labels: Sequence, names: Sequence[str], *, source: str,
              described: str = "label_names", lines: Sequence[int] | None = None,
              column: str | None = None) -> np.ndarray:
    """`labels` as class ids into the fixed `names` (see `LabelMap.onto`)."""
    labels = list(labels)
    return LabelMap.onto(names, labels, described=described).ids(
        labels, source=source, lines=lines, column=column)


def multi_hot(label_lists: Sequence[Sequence[str]], names: Sequence[str], *, source: str,
              lines: Sequence[int], column: str) -> np.ndarray:
    """Multi-label name lists as float32 multi-hot (n, K) over `names`; a name not among them (not
    seen in the training data, or not in label_names) raises naming the file, line and column."""
    index = {n: k for k, n in enumerate(names)}
    out = np.zeros((len(label_lists), len(names)), np.float32)
    for i, names_i in enumerate(label_lists):
        for n in names_i:
            if n not in index:
                raise DataError(f"{source}: line {lines[i]}: label {n!r} in column {column!r} is not one of "
                                f"the training data's labels {list(names)}")
            out[i, index[n]] = 1.0
    return out


def targets(values: Sequence[Sequence[float]], k: int, *, source: str, lines: Sequence[int],
            column: str) -> np.ndarray:
    """Regression targets as float32 (n, k); a row with another number of targets raises."""
    for i, v in enumerate(values):
        if len(v) != k:
            raise DataError(f"{source}: line {lines[i]}: {len(v)} regression targets in column {column!r}, "
                            f"where the training data has {k}")
    return np.asarray(values, np.float32).reshape(len(values), k)
