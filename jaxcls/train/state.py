"""Resumable train-state saves: each one is a folder written under a temporary name and renamed
into place, then named in LATEST (itself replaced atomically). A half-written save is never read."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.fileio import atomic_write_json

KEEP = 2


def save_state(folder: Path, step: int, tree, meta: dict) -> Path:
    """Write `tree` (any pytree of arrays: trainable params + optimizer state) and `meta`."""
    folder.mkdir(parents=True, exist_ok=True)
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
    atomic_write_json(folder / "LATEST", {"step": step, "path": final.name})
    for old in sorted(folder.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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

    def meta(self, cfg) -> dict:
        return {"config": resumable(cfg), "epoch": self.epoch, "done_in_epoch": self.done_in_epoch,
                "history": self.history, "best": self.best}


def resumable(cfg) -> dict:
    """The settings a resumed run must share with the saved one."""
    d = dataclasses.asdict(cfg)
    for k in ("out", "save_every", "cache", "cache_budget_mb", "cache_dtype", "cache_memory", "data_parallel",
              "fsdp"):
        d.pop(k)
    return json.loads(json.dumps(d))


def restore(state: LoopState, state_dir: Path, cfg) -> tuple[LoopState, Path] | None:
    """The newest save in `state_dir` loaded into `state`'s tree, or None when nothing is saved.
    Refuses a save made with other settings, naming them."""
    latest = latest_state(state_dir)
    if latest is None:
        return None
    (trainable, opt_state), meta = load_state(latest, (state.trainable, state.opt_state))
    if meta["config"] != resumable(cfg):
        diff = sorted(k for k in meta["config"] if meta["config"][k] != resumable(cfg).get(k))
        raise ConfigError(f"{latest}: saved with other settings ({', '.join(diff)}); "
                          "resume with the same options or use a new --out")
    return LoopState(trainable, opt_state, meta["step"], meta["epoch"], meta["done_in_epoch"],
                     meta["history"], meta.get("best")), latest
