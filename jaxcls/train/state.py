"""Resumable train state, saved with orbax-checkpoint: `RUN/state/step_000000NNN/` holds the
trainable parameters and their optimizer state (`trainable/`, `opt_state/`, as the jax.Arrays are
sharded: every process writes the shards its devices hold) and `meta/` (JSON: the settings, where
the loop is in the data, the metrics so far). Saves run in the background; orbax writes each under
a temporary name and renames it into place when complete, so a half-written save is never read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.train.prefix_cache import KEPT_FILE, KEPT_INDEX

KEEP = 2
# Settings a resumed run may change: where saves go, how often, how the cache and devices are
# arranged. And the two that only say when to stop, which a finished run may raise to go on.
NOT_RESUMABLE = ("out", "save_every", "cache", "cache_budget_mb", "cache_dtype", "cache_memory",
                 "cache_dir", "keep_cache", "data_parallel", "fsdp")
EXTENDABLE = ("epochs", "max_steps")
NAMES = ocp.step.standard_name_format(step_prefix="step", step_format_fixed_length=9)


def refuse_legacy(folder: Path) -> None:
    """Saves of the format before orbax (`LATEST` naming `step-N/arrays.npz`) are not read: one line
    says how to go on instead of a silent restart from step 0."""
    if (folder / "LATEST").is_file() or any(folder.glob("step-*/arrays.npz")):
        raise CheckpointError(f"{folder}: holds train state in the format of jaxcls before orbax "
                              "(LATEST, step-N/arrays.npz), which this version does not resume; finish that "
                              "run with the jaxcls version that started it, or start again with --overwrite")


def _abstract(tree):
    """Restore targets: each leaf's shape, dtype and sharding (where it lives now is where it goes)."""
    def leaf(x):
        x = x if isinstance(x, jax.Array) else jax.numpy.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(leaf, tree)


class StateStore:
    """One folder of saves, open for one run. `save` returns once the arrays are copied off the
    devices; the write goes on in the background, and the next save, `wait` and `close` wait for it.
    Every process of a multi-process job makes the same calls."""

    def __init__(self, folder: Path, *, keep: int | None = None, asynchronous: bool = True):
        self.folder = Path(folder)
        refuse_legacy(self.folder)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or KEEP, step_name_format=NAMES,
                                               enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.folder.absolute(), options=options)

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:09d}"

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: dict, meta: dict, *, replace: bool = False) -> None:
        """`arrays`: item name -> pytree of jax.Arrays, saved as sharded; `meta`: JSON. `replace`
        first deletes saves of this step or later (the keep-best save of an epoch that a resumed
        run takes again)."""
        if replace:
            self.wait()
            for old in self.manager.all_steps():
                if old >= step:
                    self.manager.delete(old)
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        if not self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta))):
            raise CheckpointError(f"{self.folder}: a save of step {step} was not made: it holds step "
                                  f"{self.latest()} already (saves only move forward)")

    def meta(self, step: int) -> dict:
        self.wait()
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def load(self, step: int, templates: dict) -> dict:
        """The arrays of a save, placed like `templates` (item name -> pytree): shardings, shapes
        and dtypes must agree."""
        self.wait()
        items = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in templates.items()}
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.path(step)}: cannot be read into this run's state ({first})") from None
        return {name: got[name] for name in templates}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def saved_steps(folder: Path) -> list[int]:
    """Complete saves in `folder`, by step, without opening it (no devices, no other process)."""
    try:
        return sorted(m.step for m in NAMES.find_all(Path(folder))) if Path(folder).is_dir() else []
    except (OSError, ValueError):
        return []


# What a run writes into --out; --overwrite deletes exactly these, nothing else: a prefix cache
# kept with --keep-cache is the run's too when it was spilled into --out (no --cache-dir).
RUN_MARKERS = ("classifier.json", "metrics.json", "metrics.jsonl", "state")
RUN_FILES = (*RUN_MARKERS, "weights.safetensors", "best", "loss.png", "accuracy.png",
             "encoder.json", "vocab.bpe", "vocab.json", "merges.txt", KEPT_INDEX)


def prepare_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run before any work: refuse another run's files unless resuming or
    overwriting (then delete only jaxcls's own run files), and prove the folder is writable."""
    if resume and overwrite:
        raise ConfigError(f"--out {out}: --resume and --overwrite exclude each other")
    if resume:
        refuse_legacy(out / "state")
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
        kept = [p.name for p in out.iterdir() if KEPT_FILE.fullmatch(p.name)]
        for name in (*RUN_FILES, *kept):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


@dataclasses.dataclass
class LoopState:
    """Exactly what a resumable save holds: parameters that train, optimizer state, where the loop
    is, the metrics history, the best epoch so far and early stopping's count."""

    trainable: object
    opt_state: object
    step: int = 0
    epoch: int = 0
    done_in_epoch: int = 0  # batches of `epoch` already taken
    history: list = dataclasses.field(default_factory=list)
    best: dict | None = None
    stale: int = 0  # evaluations since the best without an improvement (early stopping's count)
    stopped: dict | None = None  # why and where early stopping ended the run

    def meta(self, settings: dict) -> dict:
        return {"config": settings, "step": self.step, "epoch": self.epoch, "done_in_epoch": self.done_in_epoch,
                "history": self.history, "best": self.best, "stale": self.stale, "stopped": self.stopped}


FROZEN_KEY = "frozen_weights"


def frozen_fingerprint(frozen) -> str | None:
    """A digest of the parameters no step changes: per floating leaf, its path, shape and the
    float64 sums of its slices of 4M values to 10 digits (on the host, so any placement or summation
    order gives the same digest). The settings do not say where these weights came from (the
    checkpoint, --weights, --init-from), and a resume that restored the trained parameters over
    other frozen ones would be another model. None where a leaf is not all on this process
    (multi-process runs), which are then not checked."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(frozen):
        if not hasattr(leaf, "dtype") or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        x = np.asarray(leaf).reshape(-1)
        sums = " ".join(f"{x[i:i + (1 << 22)].sum(dtype=np.float64):.9e}" for i in range(0, x.size, 1 << 22))
        h.update(f"{jax.tree_util.keystr(path)} {np.shape(leaf)} {sums};".encode())
    return h.hexdigest()[:16]


def resumable(cfg, model, splits, frozen=None) -> dict:
    """The settings a resumed run must share with the saved one: the loop's (less where saves go
    and how the cache and devices are arranged), the model's switches, the data's sources and,
    given the `frozen` parameters, their digest (`frozen_fingerprint`)."""
    d = dataclasses.asdict(cfg)
    for k in NOT_RESUMABLE:
        d.pop(k)
    d.update(dataclasses.asdict(model.config))
    d.update(pooling=model.pooling, label_names=list(splits.label_names),
             data={name: ds.source for name in ("train", "validation", "test")
                   if (ds := getattr(splits, name)) is not None})
    if frozen is not None and (digest := frozen_fingerprint(frozen)):
        d[FROZEN_KEY] = digest
    return json.loads(json.dumps(d))


def _finished(meta: dict) -> bool:
    """Whether a save is the last of its run: its epochs done, or its --max-steps reached."""
    cfg = meta["config"]
    return meta["epoch"] >= cfg["epochs"] or (cfg.get("max_steps") is not None and meta["step"] >= cfg["max_steps"])


def restore(state: LoopState, store: StateStore, settings: dict) -> tuple[LoopState, Path, list] | None:
    """The newest save in `store` loaded at the placement of `state`'s trees, the save, and the
    settings of EXTENDABLE that differ from it; None when nothing is saved. Refuses a save made
    with other settings, naming them: only a finished run's EXTENDABLE ones may differ, and only
    to ask for more steps. The settings are read and checked before any array."""
    step = store.latest()
    if step is None:
        return None
    latest, meta = store.path(step), store.meta(step)
    if FROZEN_KEY not in meta["config"]:  # saved before the check, or by a multi-process run
        settings = {k: v for k, v in settings.items() if k != FROZEN_KEY}
    diff = sorted(k for k in {*meta["config"], *settings} if meta["config"].get(k) != settings.get(k))
    if FROZEN_KEY in diff:
        raise ConfigError(f"{latest}: saved by a run whose frozen weights differ from this one's (another "
                          "--checkpoint, --weights or --init-from?); resume with the run's own options or "
                          "use a new --out")
    if diff and not (set(diff) <= set(EXTENDABLE) and _finished(meta)):
        raise ConfigError(f"{latest}: saved with other settings ({', '.join(diff)}); "
                          "resume with the same options or use a new --out")
    if diff and _finished({**meta, "config": settings}):
        raise ConfigError(f"{latest}: the run finished at step {meta['step']} after {meta['epoch']} epoch(s); "
                          f"--epochs {settings['epochs']} --max-steps {settings['max_steps']} ask for no more "
                          "steps: pass a larger --epochs or --max-steps to train further")
    got = store.load(step, {"trainable": state.trainable, "opt_state": state.opt_state})
    return LoopState(got["trainable"], got["opt_state"], meta["step"], meta["epoch"], meta["done_in_epoch"],
                     meta["history"], meta.get("best"), meta.get("stale", 0), meta.get("stopped")), latest, diff


def finished_run(out: Path, config: dict) -> int | None:
    """The step count of the finished run in `out` when it was made with `config` (DataSpec,
    ModelSpec and TrainConfig fields together, as metrics.json records them; NOT_RESUMABLE ones
    aside): its classifier and report are written and its last save is the one reported. None
    otherwise, and for anything unreadable: the resume then goes the usual way."""
    try:
        report = json.loads((out / "metrics.json").read_text())
        saved = saved_steps(out / "state")
        same = all(report["config"].get(k) == v for k, v in json.loads(json.dumps(config)).items()
                   if k not in NOT_RESUMABLE)
        done = (out / "classifier.json").is_file() and saved[-1:] == [report["steps"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return report["steps"] if same and done else None
