"""Resumable train-state saves: each one is a folder written under a temporary name and renamed
into place, then named in LATEST (itself replaced atomically). A half-written save is never read."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.fileio import _alive, atomic_write_json

KEEP = 2
_TMP_STEP = re.compile(r"\.tmp-step-\d{9}-(\d+)")
# Settings a resumed run may change: where saves go, how often, how the cache and devices are
# arranged. And the two that only say when to stop, which a finished run may raise to go on.
NOT_RESUMABLE = ("out", "save_every", "cache", "cache_budget_mb", "cache_dtype", "cache_memory",
                 "cache_dir", "keep_cache", "data_parallel", "fsdp")
EXTENDABLE = ("epochs", "max_steps")


def remove_dead_temps(folder: Path) -> list[Path]:
    """`.tmp-step-*` folders whose writer (the PID in the name) no longer runs: a killed save
    never cleans up. A live process's folder, this one's included, stays."""
    removed = []
    for path in folder.glob(".tmp-step-*"):
        m = _TMP_STEP.fullmatch(path.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_state(folder: Path, step: int, tree, meta: dict) -> Path:
    """Write `tree` (any pytree of arrays: trainable params + optimizer state) and `meta`."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(folder)
    final = folder / f"step-{step:09d}"
    tmp = folder / f".tmp-step-{step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(tree))]
    with open(tmp / "arrays.npz", "wb") as f:
        np.savez(f, *leaves)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_json(tmp / "meta.json", {**meta, "step": step, "num_leaves": len(leaves)})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    order = [name for name in _written(folder) if name != final.name and (folder / name).is_dir()]
    order.append(final.name)
    atomic_write_json(folder / "LATEST", {"step": step, "path": final.name, "written": order[-KEEP:]})
    for old in folder.glob("step-*"):
        if old.name not in order[-KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _written(folder: Path) -> list[str]:
    """The saves in the order they were written, oldest first, as LATEST records them. Pruning
    follows this order and not step numbers, so a folder holding saves with higher step numbers
    (from an earlier run) can never make a new save, or the one LATEST names, be deleted."""
    try:
        latest = json.loads((folder / "LATEST").read_text())
        return [str(n) for n in latest.get("written", [latest["path"]])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return []


# What a run writes into --out; --overwrite deletes exactly these, nothing else.
RUN_MARKERS = ("classifier.json", "metrics.json", "metrics.jsonl", "state")
RUN_FILES = (*RUN_MARKERS, "weights.safetensors", "best", "loss.png", "accuracy.png",
             "encoder.json", "vocab.bpe", "vocab.json", "merges.txt")


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run before any work: refuse another run's files unless resuming or
    overwriting (then delete only jaxcls's own run files), and prove the folder is writable."""
    if resume and overwrite:
        raise ConfigError(f"--out {out}: --resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    if found and not resume and not overwrite:
        raise ConfigError(f"--out {out}: holds another run's files ({', '.join(found)}); pass --resume to "
                          "continue it or --overwrite to replace it, or choose a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def latest_state(folder: Path) -> Path | None:
    """The newest complete save, or None. Temporary folders are ignored."""
    pointer = folder / "LATEST"
    if not pointer.is_file():
        return None
    try:
        path = folder / json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({e})") from None
    if not (path / "meta.json").is_file() or not (path / "arrays.npz").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete")
    return path


def load_state(path: Path, template):
    """Arrays of a save, placed into `template`'s tree structure; shapes and dtypes must agree."""
    meta = json.loads((path / "meta.json").read_text())
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path / "arrays.npz") as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(arrays) != len(leaves):
        raise CheckpointError(f"{path}: holds {len(arrays)} arrays, this run's state has {len(leaves)} "
                              "(was it saved with other trainable settings?)")
    for i, (a, t) in enumerate(zip(arrays, leaves)):
        if a.shape != tuple(t.shape) or a.dtype != t.dtype:
            raise CheckpointError(f"{path}: array {i} is {a.dtype}{list(a.shape)}, expected "
                                  f"{t.dtype}{list(t.shape)}")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in arrays]), meta


@dataclasses.dataclass
class LoopState:
    """Exactly what a resumable save holds: parameters that train, optimizer state, where the loop
    is, the metrics history and the best epoch so far."""

    trainable: object
    opt_state: object
    step: int = 0
    epoch: int = 0
    done_in_epoch: int = 0  # batches of `epoch` already taken
    history: list = dataclasses.field(default_factory=list)
    best: dict | None = None

    def meta(self, settings: dict) -> dict:
        return {"config": settings, "epoch": self.epoch, "done_in_epoch": self.done_in_epoch,
                "history": self.history, "best": self.best}


def resumable(cfg, model, splits) -> dict:
    """The settings a resumed run must share with the saved one: the loop's (less where saves go
    and how the cache and devices are arranged), the model's switches and the data's sources."""
    d = dataclasses.asdict(cfg)
    for k in NOT_RESUMABLE:
        d.pop(k)
    d.update(dataclasses.asdict(model.config))
    d.update(pooling=model.pooling, label_names=list(splits.label_names),
             data={name: ds.source for name in ("train", "validation", "test")
                   if (ds := getattr(splits, name)) is not None})
    return json.loads(json.dumps(d))


def _finished(meta: dict) -> bool:
    """Whether a save is the last of its run: its epochs done, or its --max-steps reached."""
    cfg = meta["config"]
    return meta["epoch"] >= cfg["epochs"] or (cfg.get("max_steps") is not None and meta["step"] >= cfg["max_steps"])


def restore(state: LoopState, state_dir: Path, settings: dict) -> tuple[LoopState, Path, list] | None:
    """The newest save in `state_dir` loaded into `state`'s tree, the save, and the settings of
    EXTENDABLE that differ from it; None when nothing is saved. Refuses a save made with other
    settings, naming them: only a finished run's EXTENDABLE ones may differ, and only to ask for
    more steps."""
    latest = latest_state(state_dir)
    if latest is None:
        return None
    (trainable, opt_state), meta = load_state(latest, (state.trainable, state.opt_state))
    diff = sorted(k for k in {*meta["config"], *settings} if meta["config"].get(k) != settings.get(k))
    if diff and not (set(diff) <= set(EXTENDABLE) and _finished(meta)):
        raise ConfigError(f"{latest}: saved with other settings ({', '.join(diff)}); "
                          "resume with the same options or use a new --out")
    if diff and _finished({**meta, "config": settings}):
        raise ConfigError(f"{latest}: the run finished at step {meta['step']} after {meta['epoch']} epoch(s); "
                          f"--epochs {settings['epochs']} --max-steps {settings['max_steps']} ask for no more "
                          "steps: pass a larger --epochs or --max-steps to train further")
    return LoopState(trainable, opt_state, meta["step"], meta["epoch"], meta["done_in_epoch"],
                     meta["history"], meta.get("best")), latest, diff


def finished_run(out: Path, config: dict) -> int | None:
    """The step count of the finished run in `out` when it was made with `config` (DataSpec,
    ModelSpec and TrainConfig fields together, as metrics.json records them; NOT_RESUMABLE ones
    aside): its classifier and report are written and its last save is the one reported. None
    otherwise, and for anything unreadable: the resume then goes the usual way."""
    try:
        report = json.loads((out / "metrics.json").read_text())
        saved = json.loads((out / "state" / "LATEST").read_text())
        same = all(report["config"].get(k) == v for k, v in json.loads(json.dumps(config)).items()
                   if k not in NOT_RESUMABLE)
        done = (out / "classifier.json").is_file() and saved["step"] == report["steps"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return report["steps"] if same and done else None
