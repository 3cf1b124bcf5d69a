"""The seeded split of a user's file without given splits: stratified by label (multi-label: by each
row's rarest label; regression and choice: the plain shuffle), its fractions from --split, and
`jaxcls eval --split` cutting the file again as training did."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from jaxcls.cli import main
from jaxcls.cli.evaluate import _eval_dataset
from jaxcls.config import DataSpec
from jaxcls.data import load_splits
from jaxcls.data.records import Columns
from jaxcls.data.splits import load_spec, split_indices
from jaxcls.errors import ConfigError
from jaxcls.fileio import sha256_files

FRACTIONS = [(0.7, 0.1, 0.2), (0.8, 0.2, 0.0), (0.6, 0.2, 0.2), (0.5, 0.25, 0.25)]


def unbalanced(n, seed):
    """n labels drawn 60/25/10/5% over four names."""
    rng = np.random.default_rng(seed)
    return [str(k) for k in rng.choice(["a", "b", "c", "d"], size=n, p=[0.6, 0.25, 0.1, 0.05])]


def test_each_label_keeps_its_share_within_one_row_in_every_split():
    """Over several sizes, seeds and --split fractions: every row lands in exactly one split, and
    each label with 3+ rows is within one row of its share in each split. Fails
    with the plain cut (planted: `stratify = None` at the top of split_indices)."""
    worst = 0.0
    for n in (23, 57, 200):
        for seed in range(6):
            keys = unbalanced(n, seed)
            for fractions in FRACTIONS:
                parts = split_indices(n, "f.csv", fractions, seed, keys)
                assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(n))
                total = Counter(keys)
                for s, name in enumerate(("train", "validation", "test")):
                    got = Counter(keys[i] for i in parts.get(name, ()))
                    for label, count in total.items():
                        if count > 2:
                            worst = max(worst, abs(got[label] - count * fractions[s]))
    assert worst <= 1.0


def test_the_split_is_seeded_and_keeps_the_shuffle_order(tmp_path):
    """Same seed, same split; another seed, another one; within a split the rows follow the seeded
    shuffle, and with balanced labels the sizes are the plain cut's (35/5/10 of 50). Fails if the
    split ignores the seed (planted: `RandomState(seed)` -> `RandomState(0)` in split_indices)."""
    f = tmp_path / "all.csv"
    f.write_text("text,label\n" + "".join(f"row {i},{'xy'[i % 2]}\n" for i in range(50)))
    a, again, other = load_splits(f), load_splits(f), load_splits(f, seed=7)
    assert (len(a.train), len(a.validation), len(a.test)) == (35, 5, 10)
    assert a.train.texts == again.train.texts and a.test.texts == again.test.texts
    assert a.train.texts != other.train.texts
    rank = {i: r for r, i in enumerate(np.random.RandomState(123).permutation(50))}
    for ds in (a.train, a.validation, a.test):
        rows = [int(t.split()[1]) for t in ds.texts]
        assert rows == sorted(rows, key=rank.get)
        assert abs(sum(ds.labels) - len(ds) / 2) <= 1


def test_labels_with_one_or_two_rows_go_to_train(tmp_path):
    """A label with one or two rows is wholly in train, whatever the seed, so the model sees every
    label validation and test hold. Fails if they are apportioned like the rest (planted: the
    `len(groups[k]) <= 2` rule in _stratified_cut -> `<= 0`)."""
    f = tmp_path / "rare.csv"
    body = "".join(f"common {i},{'ab'[i % 2]}\n" for i in range(40)) + "one,solo\ntwo a,pair\ntwo b,pair\n"
    f.write_text("text,label\n" + body)
    for seed in range(8):
        s = load_splits(f, seed=seed)
        assert {"one", "two a", "two b"} <= set(s.train.texts), seed


def test_multilabel_stratifies_by_each_rows_rarest_label(tmp_path):
    """Rows tagged 'common' and some also 'rare': the rare label (12 of 60 rows) keeps its share in
    every split although every row has 'common'. Fails if multi-label rows were keyed by their
    first label (planted: strata's `min(row, ...)` -> `row[0]`)."""
    f = tmp_path / "tags.jsonl"
    rows = [{"text": f"t{i}", "label": ["common", "rare"] if i % 5 == 0 else ["common"]} for i in range(60)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(4):
        s = load_splits(f, task="multilabel", seed=seed, columns=Columns())
        rare = s.label_names.index("rare")
        counts = [int(ds.labels[:, rare].sum()) for ds in (s.train, s.validation, s.test)]
        assert all(abs(c - 12 * f) <= 1 for c, f in zip(counts, (0.7, 0.1, 0.2))), (seed, counts)


def test_regression_keeps_the_plain_seeded_cut(tmp_path):
    """Regression targets are not stratified: the split is the plain shuffle cut at 70/10/20.
    Fails if they were stratified by value (planted: strata returns `[str(y) for y in labels]`
    for every kind)."""
    f = tmp_path / "scores.csv"
    f.write_text("text,label\n" + "".join(f"r{i},{i % 3}.5\n" for i in range(30)))
    s = load_splits(f, task="regression", seed=5, columns=Columns())
    plain = split_indices(30, f, (0.7, 0.1, 0.2), 5)
    for name in ("train", "validation", "test"):
        assert getattr(s, name).texts == tuple(f"r{i}" for i in plain[name])


def test_split_flag_sets_the_fractions_and_bad_values_are_one_line(tmp_path, capsys):
    """--split 0.8,0.2,0 gives no test split, and names itself in the splits' sources (so a resume
    with another --split is refused); bad fractions, or --split where nothing is cut, are refused
    naming --split. Fails if DataSpec does not check it (planted: the
    `self.split_fractions` line removed from DataSpec.__post_init__: main then goes on to train)."""
    f = tmp_path / "all.csv"
    f.write_text("text,label\n" + "".join(f"row {i},{'xy'[i % 2]}\n" for i in range(20)))
    s = load_spec(DataSpec(data=str(f), split="0.8,0.2,0"))
    assert (len(s.train), len(s.validation), s.test) == (16, 4, None)
    assert s.train.source == f"{f}:train of 0.8,0.2,0.0"  # what a resume compares (loop settings: data)
    assert load_spec(DataSpec(data=str(f))).train.source == f"{f}:train"
    for bad in ("0.8,0.3,0", "0.5,0.5", "0,0.5,0.5", "a,b,c", "1.2,-0.2,0"):
        with pytest.raises(ConfigError, match=rf"^--split {bad}: must be three non-negative fractions"):
            DataSpec(data=str(f), split=bad)
    with pytest.raises(ConfigError, match="--split 0.8,0.2,0: cuts a single --data file, and --validation/--test"):
        load_spec(DataSpec(data=str(f), validation=str(f), split="0.8,0.2,0"))
    with pytest.raises(ConfigError, match="--split 0.8,0.2,0: cuts a single --data file, and sms-spam has fixed"):
        load_spec(DataSpec(data="sms-spam", split="0.8,0.2,0"))
    assert main(["train", "--data", str(f), "--split", "0.9,0.2,0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxcls: error: --split 0.9,0.2,0") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_eval_recuts_the_file_with_the_recorded_split(tmp_path):
    """`jaxcls eval --split test` on the training file cuts it with the fractions metrics.json records,
    and a run recorded before --split existed with the plain cut it was trained on; scoring every row
    notes the recorded train share. Fails if eval used the default fractions (planted: `cut = {}` in
    cli/evaluate.py _eval_dataset)."""
    f = tmp_path / "all.csv"
    f.write_text("text,label\n" + "".join(f"row {i},{'xyz'[i % 3]}\n" for i in range(60)))
    model = tmp_path / "model"
    model.mkdir()
    clf = SimpleNamespace(label_names=("x", "y", "z"))
    args = SimpleNamespace(data=str(f), split="test", text_column=None, label_column=None, data_path=None,
                           model=str(model), seed=None)

    def recorded(**config):
        metrics = {"config": {"data": str(f), "validation": None, "test": None, "seed": 9, **config},
                   "data_sha256": {"train": sha256_files([f])}}
        (model / "metrics.json").write_text(json.dumps(metrics))
        return _eval_dataset(args, clf, lambda s: None)[0]

    want = load_splits(f, seed=9, split_fractions=(0.5, 0.2, 0.3)).test.texts
    assert tuple(recorded(split="0.5,0.2,0.3")) == want and len(want) == 18
    old = split_indices(60, f, (0.7, 0.1, 0.2), 9)["test"]
    assert tuple(recorded()) == tuple(f"row {i}" for i in old)
    notes, args.split = [], None  # every row, with a note of how many trained
    (model / "metrics.json").write_text(json.dumps({"config": {"data": str(f), "split": "0.8,0.2,0"},
                                                    "data_sha256": {"train": sha256_files([f])}}))
    assert len(_eval_dataset(args, clf, notes.append)[0]) == 60
    assert "80% of its rows were training rows" in notes[0]
