"""Train/validation/test splits from user files (or the book's SMS set), with one label mapping
shared by every split."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jaxcls.data.labels import DataSplits, LabelMap, TextDataset
from jaxcls.data.sms import load_sms_spam
from jaxcls.data.tables import LabelledTable, read_labelled
from jaxcls.errors import DataError

_SPLITS = ("train", "validation", "test")


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
    columns = dict(text_column=text_column, label_column=label_column)
    table = read_labelled(train, **columns)
    if validation is None and test is None:
        parts = split(table, split_fractions, seed)
    else:
        parts = {"train": table}
        for name, file in (("validation", validation), ("test", test)):
            if file is not None:
                parts[name] = read_labelled(file, **columns)
    first = parts["train"]
    mapping = LabelMap.for_training(first.labels, label_names, source=str(first.path),
                                    lines=first.lines, column=first.label_column)
    made = {"train": to_dataset(first, mapping)}
    seen = set(made["train"].labels.tolist())
    if len(seen) < 2:
        raise DataError(
            f"{made['train'].source}: the training data has only one class "
            f"({mapping.names[seen.pop()]!r}); a classifier needs at least two"
        )
    for name in ("validation", "test"):
        if name in parts:
            made[name] = to_dataset(parts[name], mapping, seen)
    return DataSplits(made["train"], made.get("validation"), made.get("test"), mapping.names)


def split(table: LabelledTable, fractions: Sequence[float], seed: int) -> dict[str, LabelledTable]:
    """`table`'s rows shuffled by `seed` and cut by the three `fractions`; zero drops a split."""
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
    kept = [(name, f) for name, f in zip(_SPLITS, fractions) if f > 0]
    parts, start = {}, 0
    for k, (name, f) in enumerate(kept):
        end = n if k == len(kept) - 1 else start + int(n * f)
        idx = order[start:end]
        if len(idx) == 0:
            raise DataError(
                f"{table.path}: the {name} split is empty ({n} rows x {f} -> 0); "
                "use more rows or change split_fractions"
            )
        parts[name] = LabelledTable(
            table.path,
            [table.texts[i] for i in idx],
            [table.labels[i] for i in idx],
            [table.lines[i] for i in idx],
            table.label_column,
            source=f"{table.path}:{name}",
        )
        start = end
    return parts


def to_dataset(table: LabelledTable, mapping: LabelMap, allowed: set | None = None) -> TextDataset:
    """`table` with its labels mapped; `allowed` (None for the training split) are the class ids
    a validation or test row may use: those the training data has."""
    for label, line in zip(table.labels, table.lines) if allowed is not None else ():
        index = mapping.lookup.get(str(label))
        if index is None:
            break  # the first bad row is an unknown label: ids() names it
        if index not in allowed:
            raise DataError(
                f"{table.path}: line {line}: label {label!r} in column "
                f"{table.label_column!r} does not occur in the training data"
            )
    labels = mapping.ids(table.labels, source=str(table.path), lines=table.lines,
                         column=table.label_column)
    return TextDataset(tuple(table.texts), labels, mapping.names, table.source or str(table.path))


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
