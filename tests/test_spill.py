"""The frozen-prefix cache spilled to a memory-mapped file when it is over --cache-budget-mb."""

import os

import numpy as np
import pytest

from conftest import FIXTURE, requires_shared
from jaxcls.classifier import Classifier
from jaxcls.config import TrainConfig
from jaxcls.data import DataSplits, TextDataset
from jaxcls.train import fit
from jaxcls.train.prefix_cache import Prefetch, remove_dead_spills

WORDS = "free prize call now win cash meet me at lunch see you later the cat sat on a mat".split()
CFG = TrainConfig(trainable="last_block", epochs=2, batch_size=4, eval_freq=2, eval_iter=1, seed=3)


def splits(n=28):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(2, 30))) for _ in range(n)]
    labels = np.array([int("prize" in t or "cash" in t) for t in texts], np.int32)
    ds = lambda a, b, name: TextDataset(tuple(texts[a:b]), labels[a:b], ("ham", "spam"), name)
    return DataSplits(ds(0, n - 8, "train"), ds(n - 8, n - 4, "validation"), ds(n - 4, n, "test"), ("ham", "spam"))


def train(cfg, log=None):
    clf = Classifier.from_pretrained(FIXTURE / "openai", label_names=["ham", "spam"])
    return fit(clf.model, clf.encode, splits(), cfg, progress=False, log=log or (lambda s: None))


@requires_shared
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spilled_cache_trains_bit_for_bit_like_the_in_memory_cache(tmp_path, dtype):
    """Fails if the prefetch thread hands a step the next planned batch instead of its own
    (planted: make(*plan[min(j + 1, len(plan) - 1)]) in Prefetch's worker)."""
    logs = []
    memory = train(CFG.replace(cache_dtype=dtype))
    disk = train(CFG.replace(cache_dtype=dtype, cache_budget_mb=0, cache_dir=str(tmp_path)), logs.append)
    assert (memory.report["cache_memory"], disk.report["cache_memory"]) == ("host", "disk")
    assert any("over the 0 MiB budget" in line and "spilling it to" in line for line in logs), logs
    losses = lambda r: [(h.get("train_loss"), h.get("val_loss")) for h in r.history]
    assert losses(disk) == losses(memory) and len(losses(disk)) >= 4
    for name in ("train", "validation", "test"):
        assert disk.report["splits"][name]["loss"] == memory.report["splits"][name]["loss"]
    assert list(tmp_path.iterdir()) == []  # removed at the end


@requires_shared
def test_spill_file_is_kept_when_asked_and_dead_runs_files_are_removed(tmp_path):
    """Fails if a run does not clear a dead run's temporary spill (planted: remove_dead_spills
    call dropped from _open_spill), or deletes a live process's or another host's one."""
    from jaxcls.fileio import host_tag as _host

    dead = tmp_path / f".tmp-prefix-cache-{_host()}-999999999-abc123.bin"
    live = tmp_path / f".tmp-prefix-cache-{_host()}-{os.getppid()}-abc123.bin"
    elsewhere = tmp_path / ".tmp-prefix-cache-otherhost-999999999-abc123.bin"  # another host's, on a shared disk
    for path in (dead, live, elsewhere):
        path.write_bytes(b"part")
    result = train(CFG.replace(epochs=1, cache_budget_mb=0, cache_dir=str(tmp_path), keep_cache=True))
    assert result.report["cache_memory"] == "disk"
    import json

    manifest = json.loads((tmp_path / "prefix-cache.json").read_text())
    kept = tmp_path / manifest["file"]
    assert kept.stat().st_size == manifest["bytes"] > 0 and manifest["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, kept.name, "prefix-cache.json"])
    assert remove_dead_spills(tmp_path) == []


def test_without_a_folder_an_over_budget_cache_is_not_spilled():
    """Fails if a cache spills with nowhere named to put it (planted: `folder = cfg.cache_dir or
    cfg.out or '.'` in _open_spill)."""
    from test_train import BASE, encode, model, toy_splits

    logs = []
    r = fit(model(0), encode, toy_splits(), BASE.replace(trainable="last_block", cache=True, cache_budget_mb=0),
            progress=False, log=logs.append)
    assert not r.report["cached_prefix"]
    assert any("give --cache-dir or --out to spill it" in line for line in logs), logs


def test_fit_spills_into_its_out_folder_as_the_cli_does(tmp_path):
    """`fit(out=...)` from Python is a run folder as `--out` is: a cache over the budget spills
    there. Fails if only cfg.out counts (planted: the `cfg.replace(out=...)` in fit removed)."""
    from test_train import BASE, encode, model, toy_splits

    r = fit(model(0), encode, toy_splits(), BASE.replace(trainable="last_block", cache=True, cache_budget_mb=0,
                                                          keep_cache=True),
            out=tmp_path / "run", progress=False, log=lambda s: None)
    assert r.report["cache_memory"] == "disk"
    assert (tmp_path / "run" / "prefix-cache.json").is_file()


def test_too_little_disk_falls_back_to_uncached_training_naming_the_folder(tmp_path, monkeypatch):
    """docs/scaling.md: a folder with less free space than the cache falls back to uncached
    training with a log line naming the folder. Fails if the room is not checked (planted: the
    `need > free` test removed: the spill is attempted on a full disk)."""
    import collections

    import jaxcls.train.prefix_cache as pc
    from test_train import BASE, encode, model, toy_splits

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pc.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1024, 1024))
    logs = []
    r = fit(model(0), encode, toy_splits(), BASE.replace(trainable="last_block", cache=True, cache_budget_mb=0,
                                                          cache_dir=str(tmp_path)), progress=False, log=logs.append)
    assert not r.report["cached_prefix"] and list(tmp_path.iterdir()) == []
    assert any(f"{tmp_path} has 0 MiB free, too little to spill it" in line for line in logs), logs


def test_prefetch_reads_ahead_in_plan_order_and_restarts_where_asked():
    """Fails if a batch asked for out of order (a resumed epoch) is served from the old read-ahead
    (planted: `if self._thread is None:` in Prefetch.get)."""
    plan = [(0, np.array([i])) for i in range(6)]
    made = []

    def make(g, idx):
        made.append(int(idx[0]))
        if idx[0] == 5:
            raise OSError("disk gone")
        return int(idx[0]) * 10

    p = Prefetch(depth=2)
    p.start(plan, make)
    assert [p.get(*plan[i]) for i in (0, 1)] == [0, 10]
    assert p.get(*plan[3]) == 30 and p.get(*plan[4]) == 40
    with pytest.raises(OSError, match="disk gone"):
        p.get(*plan[5])
    with pytest.raises(ValueError, match="not in the started plan"):
        p.get(0, np.array([0]))
    p.stop()
    assert made[:2] == [0, 1] and 3 in made
