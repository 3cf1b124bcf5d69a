"""The loop's side work, one hook each: reading losses back (and stopping on a non-finite one),
the progress bar, periodic evaluation, the stop signal, periodic saves, the end-of-epoch metrics,
the best epoch (keep-best and early stopping), and an observer of the steps taken. Each hook sees
the run after every step and at the end of every epoch; the loop itself only takes steps (loop.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxcls.errors import TrainingError
from jaxcls.train.batches import batch_length

FETCH_EVERY = 10  # steps between reading metrics back from the device (and NaN checks)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """The step just taken."""

    step: int
    epoch: int
    batch_index: int
    group: int | None  # the length group, or None for a batch mixing groups
    indices: np.ndarray  # example indices of the split
    last_of_epoch: bool
    final: bool  # the run's last step


class Hook:
    def after_step(self, run, info: StepInfo) -> None:
        pass

    def after_epoch(self, run, plan: list) -> None:
        pass


class LossCheck(Hook):
    """Losses stay on the device and are read back together, every FETCH_EVERY steps and before
    anything that must not see a bad step (evaluation, saves, stops, the epoch's end); a
    non-finite loss stops the run naming its step and batch. The progress bar moves then too."""

    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def after_step(self, run, info):
        cfg = run.prog.cfg
        s = info.step
        if (s % FETCH_EVERY == 0 or s % cfg.eval_freq == 0 or info.last_of_epoch or s % cfg.save_every == 0
                or run.signals.stop or info.final):
            loss, rate = run.check_losses()
            self.bar.update(self.task, completed=s, loss=loss, rate=rate)


class Evaluate(Hook):
    """Every `eval_freq` steps: the loss on the first `eval_iter` batches of train and validation
    (the book's evaluate_model), appended to the history and metrics.jsonl."""

    def after_step(self, run, info):
        cfg = run.prog.cfg
        if info.step % cfg.eval_freq:
            return
        tr = run.prog.evaluate(run.state.trainable, run.train, run.plan, cfg.eval_iter)[0]
        va = (run.prog.evaluate(run.state.trainable, run.data.splits["validation"], None, cfg.eval_iter)[0]
              if "validation" in run.data.splits else None)
        run.record({"step": info.step, "epoch": info.epoch + 1, "train_loss": tr, "val_loss": va,
                    "examples_seen": info.step * run.prog.rows, "elapsed_s": time.perf_counter() - run.t_start})


class StopOnSignal(Hook):
    """SIGINT/SIGTERM: save what was checked and stop at this step's boundary."""

    def after_step(self, run, info):
        if not run.signals.stop:
            return
        run.check_losses()  # never save steps whose loss was not checked
        run.save()
        where = (f"state saved in {run.state_dir}; continue with --resume" if run.state_dir
                 else "nothing saved (no --out)")
        raise Interrupted(f"stopped by {run.signals.stop} at step {info.step}; {where}")


class SaveEvery(Hook):
    """A resumable save every `save_every` steps (the epoch's end and the last step save anyway)."""

    def after_step(self, run, info):
        if info.step % run.prog.cfg.save_every == 0 and not info.last_of_epoch and not info.final:
            run.save()


class EpochEnd(Hook):
    """Train accuracy on the first batches, validation loss and the task's metric on the whole
    split (and the monitored metric, when it is another), for BestEpoch to compare."""

    def after_epoch(self, run, plan):
        prog, st = run.prog, run.state
        task = prog.spec.task
        key = score_key(task)
        entry = {"epoch": st.epoch + 1, "step": st.step,
                 f"train_{key}": _score(task, prog.evaluate(st.trainable, run.train, plan, prog.cfg.eval_iter))}
        if "validation" in run.data.splits:
            va_loss, logits, y = self.validate(run)
            entry.update({f"val_{key}": _score(task, (va_loss, logits, y)), "val_loss_full": va_loss})
            name = MONITORS[prog.cfg.monitor][0]
            if name not in ("loss", "accuracy", task.primary_metric) and len(y):
                entry[prog.cfg.monitor] = float(task.report(y, logits)[name])
        run.record(entry)

    def validate(self, run) -> tuple:
        """(loss, logits, labels) of the whole validation split with the current parameters."""
        return run.prog.evaluate(run.state.trainable, run.data.splits["validation"])


# --monitor -> (the task report's key, or 'loss'; whether larger is better)
MONITORS = {"val_loss": ("loss", False), "val_accuracy": ("accuracy", True), "val_macro_f1": ("macro_f1", True)}
# The monitors each task kind reports.
TASK_MONITORS = {"single": ("val_loss", "val_accuracy", "val_macro_f1"), "multilabel": ("val_loss", "val_macro_f1"),
                 "regression": ("val_loss",), "choice": ("val_loss", "val_accuracy")}


def monitored(entry: dict, monitor: str) -> float | None:
    """The monitored number in an epoch's entry: the full validation loss, `val_acc`, or its own key."""
    key = {"val_loss": "val_loss_full", "val_accuracy": "val_acc"}.get(monitor, monitor)
    return entry.get(key)


class BestEpoch(Hook):
    """The one owner of "best": after each epoch's validation (EpochEnd), the monitored metric is
    compared with the best so far; an improvement (better by more than min_delta) saves the
    parameters (run.save_best) and restarts the count of evaluations without one, which stops
    the run once it reaches the patience. Best and count live in the loop state, so a resumed run
    goes on counting where the save left it."""

    def __init__(self, monitor: str, min_delta: float, patience: int | None):
        self.monitor, self.min_delta, self.patience = monitor, min_delta, patience
        self.larger = MONITORS[monitor][1]

    def better(self, value: float, best: dict | None) -> bool:
        if best is None:
            return True
        old = best.get("value", best.get("val_loss"))  # saves before --monitor held val_loss only
        return value > old + self.min_delta if self.larger else value < old - self.min_delta

    def after_epoch(self, run, plan):
        st = run.state
        entry = st.history[-1] if st.history else {}
        value = monitored(entry, self.monitor)
        if entry.get("epoch") != st.epoch + 1 or value is None:
            return
        if self.better(value, st.best):
            st.best = {"monitor": self.monitor, "value": value, "epoch": st.epoch + 1, "step": st.step,
                       "val_loss": entry.get("val_loss_full")}
            st.stale = 0
            run.save_best()
            return
        st.stale += 1
        if self.patience is not None and st.stale >= self.patience:
            st.stopped = {"step": st.step, "epoch": st.epoch + 1,
                          "reason": f"{self.monitor} did not improve by more than {self.min_delta:g} in "
                                    f"{st.stale} evaluation(s) after its best, {st.best['value']:.6g} at "
                                    f"epoch {st.best['epoch']} (step {st.best['step']})"}
            run.log(f"early stop at epoch {st.epoch + 1} (step {st.step}): {st.stopped['reason']}")


def early_stop_report(state, cfg) -> dict:
    """metrics.json's `early_stop`: what was watched, the best, and when and why the run stopped."""
    best, stopped = state.best or {}, state.stopped
    reason = stopped["reason"] if stopped else (
        f"not stopped: {cfg.monitor} never went {cfg.early_stop_patience} evaluation(s) without improving "
        "before --epochs/--max-steps ended the run")
    return {"monitor": cfg.monitor, "min_delta": cfg.min_delta, "patience": cfg.early_stop_patience,
            "best": best.get("value"), "best_epoch": best.get("epoch"), "best_step": best.get("step"),
            "stopped_at_step": stopped["step"] if stopped else None,
            "stopped_at_epoch": stopped["epoch"] if stopped else None, "reason": reason}


class Observe(Hook):
    """Hands each step to a caller's function: what ran, not what the config asked for."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def after_step(self, run, info):
        self.fn({"step": info.step, "epoch": info.epoch, "batch_index": info.batch_index, "group": info.group,
                 "indices": info.indices, "length": batch_length(run.train, info.group, info.indices)})


class Interrupted(TrainingError):
    pass


def score_key(task) -> str:
    """The epoch entry's key for the task's headline metric: 'acc' (train_acc, val_acc, as before)
    for accuracy, else the metric's own name (val_micro_f1, val_mse)."""
    return "acc" if task.primary_metric == "accuracy" else task.primary_metric


def _score(task, result) -> float | None:
    _, logits, y = result
    if not len(y):
        return None
    value = task.score(y, logits)
    return None if value is None else float(value)


def check_losses(pending: list, train_split, state_dir: Path | None) -> float:
    """The last of `pending` (step, where, device loss) after one transfer; raises on a non-finite one."""
    losses = jax.device_get([l for _, _, l in pending])
    for (s, where, _), loss in zip(pending, losses):
        if not math.isfinite(float(loss)):
            saved = f" (see {state_dir})" if state_dir else ""
            raise TrainingError(f"loss is {float(loss)} at step {s} (epoch {where[0] + 1}, batch {where[1]}, "
                                f"group of length {batch_length(train_split, *where[2:])}); parameters after "
                                f"the last good save are discarded{saved}")
    return float(losses[-1])


def append_jsonl(out: Path | None, entry: dict) -> None:
    if out:
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
