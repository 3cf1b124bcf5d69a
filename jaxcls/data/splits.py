"""Train/validation/test splits from user files (or the book's SMS set), with one label mapping
shared by every split."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jaxcls.data.labels import DataSplits, LabelMap, TextDataset, multi_hot, targets
from jaxcls.data.records import Columns, ExampleTable, read_examples
from jaxcls.data.sms import load_sms_spam
from jaxcls.data.tables import LabelledTable, read_labelled
from jaxcls.errors import ConfigError, DataError
from jaxcls.task import parse_task_name

_SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def load_splits(
    train: str | Path,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 123,
    task: str = "single",
    columns: Columns | None = None,
    stratify: bool = True,
) -> DataSplits:
    """Splits from user files.

    With only `train`, its rows are shuffled (seeded, as pandas' `sample(frac=1)`) and cut by
    `split_fractions`, stratified by label (`split_indices`); a zero fraction drops that split.
    With `validation` or `test` files, every file is used as given.

    Labels map to indices once, from the training data, for all splits: strings map to their
    sorted unique values (or to `label_names` order); integers are class indices 0..K-1 named
    "0".."K-1" (or indices into `label_names`, unless they spell its names).

    Any `task` but "single" reads whole rows (records.read_examples) with `columns`.
    `stratify=False` cuts the shuffle as jaxcls did before stratified splits (runs recorded then).
    """
    if task != "single":
        return load_task_splits(train, validation, test, task=task, columns=columns or Columns(
            {"text": text_column, "label": label_column}), label_names=label_names,
            split_fractions=split_fractions, seed=seed, stratify=stratify)
    columns = dict(text_column=text_column, label_column=label_column)
    table = read_labelled(train, **columns)
    if validation is None and test is None:
        parts = split(table, split_fractions, seed, stratify=[str(y) for y in table.labels] if stratify else None)
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


def split(table: LabelledTable, fractions: Sequence[float], seed: int,
          stratify: Sequence | None = None) -> dict[str, LabelledTable]:
    """`table`'s rows shuffled by `seed` and cut by the three `fractions` (per `stratify` key when
    given); zero drops a split."""
    return {name: LabelledTable(table.path, [table.texts[i] for i in idx], [table.labels[i] for i in idx],
                                [table.lines[i] for i in idx], table.label_column,
                                source=part_source(table.path, name, fractions))
            for name, idx in split_indices(len(table.texts), table.path, fractions, seed, stratify).items()}


def part_source(path, name: str, fractions) -> str:
    """A split's source: `FILE:test`, with the fractions when they are not the default, so a run
    resumed with another --split is refused as made from other data."""
    fractions = tuple(float(f) for f in fractions)
    return f"{path}:{name}" if fractions == DEFAULT_FRACTIONS else f"{path}:{name} of {','.join(map(str, fractions))}"


def check_fractions(fractions: Sequence[float], what: str = "split_fractions") -> tuple[float, float, float]:
    """Three non-negative fractions summing to 1 with train > 0, or a DataError naming `what`."""
    try:
        out = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)) or min(out) < 0 or out[0] <= 0 or abs(sum(out) - 1) > 1e-6:
        raise DataError(f"{what} must be three non-negative numbers (train > 0) summing to 1, e.g. 0.8,0.2,0; "
                        f"got {tuple(fractions) if not isinstance(fractions, str) else fractions}")
    return out


def split_indices(n: int, path, fractions: Sequence[float], seed: int,
                  stratify: Sequence | None = None) -> dict[str, np.ndarray]:
    """Row indices of each split, each in the order of one seeded shuffle; zero drops a split.

    Without `stratify` the shuffle is cut at `int(n * fraction)` (the last kept split takes the
    remainder). With it (one key per row: the label), each key's rows, in shuffle order, are cut so
    that every key's count in every split is within one row of its share, and the split sizes are
    those of the plain cut where the keys allow. A key with one or two rows goes wholly to train,
    so every label the other splits hold is one training saw."""
    fractions = check_fractions(fractions)
    order = np.random.RandomState(seed).permutation(n)
    kept = [s for s, f in enumerate(fractions) if f > 0]
    sizes = [int(n * fractions[s]) if s in kept else 0 for s in range(3)]
    sizes[kept[-1]] = n - sum(sizes[s] for s in kept[:-1])
    if stratify is None:
        bounds = np.cumsum([0, *sizes])
        cuts = [order[bounds[s]:bounds[s + 1]] for s in range(3)]
    else:
        cuts = _stratified_cut(order, [str(k) for k in stratify], fractions, sizes)
    parts = {}
    for s in kept:
        if len(cuts[s]) == 0:
            raise DataError(f"{path}: the {_SPLITS[s]} split is empty ({n} rows x {fractions[s]} -> 0); "
                            "use more rows or change split_fractions")
        parts[_SPLITS[s]] = cuts[s]
    return parts


def _stratified_cut(order: np.ndarray, keys: list[str], fractions, sizes) -> list[np.ndarray]:
    """Per key, how many of its rows each split takes: the floor of its share, then the rows left
    over, one per split at most, to the splits still short of `sizes` (largest shortfall first,
    which always completes when the sizes can be met). Each count is then floor or floor + 1 of
    its share. The rows themselves come in shuffle order: each split keeps the shuffle's order."""
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(keys[i], []).append(int(i))
    names = sorted(groups)
    share = np.array([[len(groups[k]), 0, 0] if len(groups[k]) <= 2 else [len(groups[k]) * f for f in fractions]
                      for k in names], np.float64)
    counts = np.floor(share + 1e-9).astype(np.int64)
    short = np.asarray(sizes) - counts.sum(axis=0)
    left = np.array([len(groups[k]) for k in names]) - counts.sum(axis=1)
    usable = np.array([f > 0 for f in fractions])
    for k in sorted(range(len(names)), key=lambda k: -left[k]):  # stable: by key within equal leftovers
        taken = set()
        for _ in range(left[k]):
            free = [s for s in range(3) if usable[s] and s not in taken] or [s for s in range(3) if usable[s]]
            s = max(free, key=lambda s: (short[s], share[k, s] - counts[k, s]))
            counts[k, s] += 1
            short[s] -= 1
            taken.add(s)
    cuts: list[list[int]] = [[], [], []]
    for k, name in enumerate(names):
        bounds = np.cumsum([0, *counts[k]])
        for s in range(3):
            cuts[s].extend(groups[name][bounds[s]:bounds[s + 1]])
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return [np.asarray(sorted(c, key=lambda i: rank[i]), np.int64) for c in cuts]


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
    """The book's data sets for "sms-spam" and "imdb" (kw: path, seed, progress), else a training file for
    `load_splits` (kw: its keyword arguments). None-valued kw are ignored, so a CLI can pass every
    option through."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if spec == "imdb":
        from jaxcls.data.imdb import load_imdb

        extra = sorted(set(kw) - {"path", "seed", "progress"})
        if extra:
            raise DataError(f"data 'imdb' has fixed columns and splits; {extra} do not apply")
        return load_imdb(kw.get("path"), seed=kw.get("seed", 123), progress=kw.get("progress", True))
    if spec in ("sms-spam", "sms_spam"):
        extra = sorted(set(kw) - {"path", "seed", "progress"})
        if extra:
            raise DataError(f"data 'sms-spam' has fixed columns and splits; {extra} do not apply")
        return load_sms_spam(
            kw.get("path"), seed=kw.get("seed", 123), progress=kw.get("progress", True)
        )
    kw.pop("progress", None)
    return load_splits(spec, **kw)


def load_spec(spec, *, seed: int = 123, progress: bool = True) -> DataSplits:
    """The splits a DataSpec (jaxcls.config) names: the book's SMS recipe, or a file with its
    optional validation and test files, split by `seed` when those are absent."""
    fractions = spec.split_fractions
    if fractions != DEFAULT_FRACTIONS and (spec.is_sms or spec.data == "imdb" or spec.validation or spec.test):
        why = f"{spec.data} has fixed splits" if spec.is_sms or spec.data == "imdb" else "--validation/--test are given"
        raise ConfigError(f"--split {spec.split}: cuts a single --data file, and {why}; drop --split")
    if spec.is_sms or spec.data == "imdb":
        if spec.task != "single":
            raise DataError(f"--task {spec.task}: {spec.data} is single-label text; give a data file for this task")
        return load_data(spec.data, path=spec.data_path, seed=seed, progress=progress)
    if spec.task != "single":
        return load_splits(spec.data, spec.validation, spec.test, seed=seed, task=spec.task,
                           columns=columns_of(spec), split_fractions=fractions)
    return load_data(spec.data, validation=spec.validation, test=spec.test, text_column=spec.text_column,
                     label_column=spec.label_column, seed=seed, split_fractions=fractions)


def columns_of(spec) -> Columns:
    """A DataSpec's column flags as records.Columns."""
    names = {"text": spec.text_column, "label": spec.label_column, "text_pair": spec.pair_column,
             "context": spec.context_column, "question": spec.question_column, "choices": spec.choices_column}
    choice = tuple(c.strip() for c in spec.choice_columns.split(",")) if spec.choice_columns else ()
    return Columns(names, choice, spec.label_separator)


def load_task_splits(train, validation=None, test=None, *, task: str, columns: Columns,
                     label_names: Sequence[str] | None = None, split_fractions=DEFAULT_FRACTIONS,
                     seed: int = 123, stratify: bool = True) -> DataSplits:
    """`load_splits` for any task but single-label text: multi-label names are the training
    data's (sorted) or `label_names`, and a name outside them in any split is an error; regression
    targets are named after the label column (`label_names` to rename); choice labels are option
    indices, and the task takes as many options as the training data's longest list."""
    kind, _ = parse_task_name(task)
    table = read_examples(train, task, columns)
    if validation is None and test is None:
        cut = split_indices(len(table.texts), table.path, split_fractions, seed,
                            strata(kind, table.labels) if stratify else None)
        parts = {name: table.subset(idx, part_source(table.path, name, split_fractions)) for name, idx in cut.items()}
    else:
        parts = {"train": table}
        for name, file in (("validation", validation), ("test", test)):
            if file is not None:
                parts[name] = read_examples(file, task, columns)
    first = parts["train"]
    names = _task_label_names(kind, first, label_names)
    made = {name: _task_dataset(kind, t, names) for name, t in parts.items()}
    if kind == "choice":
        most = max(len(f["choices"]) for d in made.values() for f in d.fields)
        if most > len(names):
            bad = next(d for d in made.values() if any(len(f["choices"]) > len(names) for f in d.fields))
            raise DataError(f"{bad.source}: an example has {most} options, more than the training data's "
                            f"{len(names)}")
    return DataSplits(made["train"], made.get("validation"), made.get("test"), names, task)


def strata(kind: str, labels: Sequence) -> list[str] | None:
    """What a split is stratified by: the label (single), each row's rarest label in the file
    (multilabel; ties by name, '' for a row without labels), nothing for regression and choice."""
    if kind == "single":
        return [str(y) for y in labels]
    if kind != "multilabel":
        return None
    counts: dict[str, int] = {}
    for row in labels:
        for name in row:
            counts[name] = counts.get(name, 0) + 1
    return [min(row, key=lambda name: (counts[name], name)) if row else "" for row in labels]


def _task_label_names(kind: str, table: ExampleTable, label_names) -> tuple[str, ...]:
    if kind == "choice":
        n = max(len(f["choices"]) for f in table.fields)
        if n < 2:
            raise DataError(f"{table.path}: every training example has one option; multiple choice needs two")
        return tuple(str(i) for i in range(n))
    if kind == "regression":
        k = len(table.labels[0])
        names = (table.label_column,) if k == 1 else tuple(f"{table.label_column}_{i}" for i in range(k))
        if label_names is not None and len(label_names) != k:
            raise DataError(f"label_names: {len(label_names)} names for {k} regression targets")
        return tuple(label_names) if label_names is not None else names
    if kind == "single":
        names = LabelMap.for_training(table.labels, label_names, source=str(table.path), lines=table.lines,
                                      column=table.label_column).names
        if len(set(map(str, table.labels))) < 2:
            raise DataError(f"{table.path}: the training data has only one class; a classifier needs at least two")
        return names
    names = tuple(label_names) if label_names is not None else tuple(sorted({n for ls in table.labels for n in ls}))
    if not names:
        raise DataError(f"{table.path}: no training example has any label; multi-label needs at least one")
    return names


def _task_dataset(kind: str, t: ExampleTable, names: tuple[str, ...]) -> TextDataset:
    src = str(t.path)
    if kind == "multilabel":
        labels = multi_hot(t.labels, names, source=src, lines=t.lines, column=t.label_column)
    elif kind == "regression":
        labels = targets(t.labels, len(names), source=src, lines=t.lines, column=t.label_column)
    elif kind == "choice":
        labels = np.asarray(t.labels, np.int32)
    else:
        labels = LabelMap.onto(names, t.labels).ids(t.labels, source=src, lines=t.lines, column=t.label_column)
    return TextDataset(tuple(t.texts), labels, names, t.source or src, tuple(t.fields))


def task_dataset(path, task: str, columns: Columns, label_names: Sequence[str], *, source: str | None = None) -> TextDataset:
    """Every row of one file for `task`, its labels mapped onto fixed `label_names` (a trained
    classifier's): what `jaxcls eval` scores."""
    kind, _ = parse_task_name(task)
    table = read_examples(path, task, columns)
    if source:
        table.source = source
    return _task_dataset(kind, table, tuple(label_names))
