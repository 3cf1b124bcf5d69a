"""`fit`: the training run as named phases, and the loop that takes the steps.

    prepare_data -> build_program (freeze split, mesh, prefix cache, optimizer, jitted steps)
    -> precompile -> restore -> the loop, with its side work on hooks -> the final report

The CLI, `Classifier.fit`, the tests and the benchmarks all go through these phases."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcls import data as data_lib
from jaxcls.config import TrainConfig
from jaxcls.fileio import atomic_open
from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.task import MultiLabel, Regression, SingleLabel, TaskBase, class_weights, pos_weights
from jaxcls.train import hooks as hooks_lib
from jaxcls.train import state as state_lib
from jaxcls.train.batches import Prepared, prepare_data
from jaxcls.train.program import Program, build_program, precompile
from jaxcls.train.state import LoopState


@dataclasses.dataclass
class FitResult:
    trainable: nnx.State
    frozen: nnx.State
    graphdef: object
    history: list[dict]
    report: dict
    pad_length: int | None
    task: TaskBase  # as trained, less training-only settings; multi-label thresholds tuned if asked


def task_for(splits: data_lib.DataSplits, cfg: TrainConfig, task: TaskBase | None = None) -> TaskBase:
    """The task to train: `task` (the classifier's; single-label text by default) with the loss
    settings of `cfg` that apply to it (label smoothing and class weights for single-label,
    positive weights and a fixed threshold for multi-label, standardised targets for regression).
    Settings for another task are refused by name rather than ignored."""
    names = tuple(splits.label_names)
    task = task or SingleLabel(names)
    _refuse_foreign(task, cfg)
    y = splits.train.labels
    if isinstance(task, SingleLabel):
        return dataclasses.replace(task, label_smoothing=cfg.label_smoothing,
                                   class_weights=class_weights(cfg.class_weights, y, len(names)))
    if isinstance(task, MultiLabel):
        fixed = task.thresholds if cfg.thresholds == "tune" else (float(cfg.thresholds),) * task.num_outputs
        return dataclasses.replace(task, pos_weight=pos_weights(cfg.pos_weight, y), thresholds=fixed)
    if isinstance(task, Regression):
        return task.standardised(y) if cfg.standardize else dataclasses.replace(task, target_mean=None, target_std=None)
    return task


EARLY_STOP_FIELDS = ("early_stop_patience", "monitor", "min_delta")


def _check_monitor(cfg: TrainConfig, task: TaskBase, splits: data_lib.DataSplits) -> None:
    """--monitor must name a metric the task reports, and early stopping needs a validation split."""
    valid = hooks_lib.TASK_MONITORS.get(task.kind, ("val_loss",))
    if cfg.monitor not in valid:
        raise ConfigError(f"--monitor {cfg.monitor}: --task {task.name} reports {' | '.join(valid)} on validation")
    if cfg.early_stop_patience and splits.validation is None:
        raise ConfigError("--early-stop-patience counts evaluations on the validation split, and there is none")


def _refuse_foreign(task: TaskBase, cfg: TrainConfig) -> None:
    given = {"class_weights": cfg.class_weights != "none", "label_smoothing": cfg.label_smoothing != 0,
             "pos_weight": cfg.pos_weight != "none", "thresholds": cfg.thresholds != "0.5",
             "standardize": cfg.standardize}
    owner = {"class_weights": SingleLabel, "label_smoothing": SingleLabel, "pos_weight": MultiLabel,
             "thresholds": MultiLabel, "standardize": Regression}
    for key, on in given.items():
        if on and not isinstance(task, owner[key]):
            raise ConfigError(f"--{key.replace('_', '-')} applies to {owner[key].kind} tasks, not --task {task.name}")


def saved_task(task: TaskBase) -> TaskBase:
    """The trained task less its training-only settings (what classifier.json records)."""
    if isinstance(task, SingleLabel):
        return dataclasses.replace(task, label_smoothing=0.0, class_weights=None)
    if isinstance(task, MultiLabel):
        return dataclasses.replace(task, pos_weight=None)
    return task


def fit(model, encode: Callable[[str], list[int]], splits: data_lib.DataSplits, cfg: TrainConfig, *,
        out: Path | None = None, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print,
        on_step: Callable[[dict], None] | None = None, task: TaskBase | None = None) -> FitResult:
    """Fine-tune `model` (a GPT2Classifier) in place of its trainable parameters.

    `on_step`, if given, sees each step as it is taken (step, epoch, batch index, the bucket group
    or None for a mixed batch, the example indices and the padded length): what ran, not what the
    config asked for."""
    if out and not resume and (saved := state_lib.saved_steps(Path(out) / "state")):
        raise ConfigError(f"{Path(out) / 'state'}: holds saves of another run (up to step {saved[-1]}); "
                          "resume it, or train into a new folder")
    if out and not cfg.out:  # the run folder is also where a cache over the budget spills
        cfg = cfg.replace(out=str(out))
    if cfg.compilation_cache:
        from jaxcls.compile_cache import enable_compilation_cache

        enable_compilation_cache(cfg.compilation_cache)
    task = task_for(splits, cfg, task)
    if cfg.thresholds == "tune" and splits.validation is None:
        raise ConfigError("--thresholds tune picks each label's threshold on the validation split, and there is none")
    _check_monitor(cfg, task, splits)
    data = prepare_data(model, encode, splits, cfg, log, task)
    model.pooling = data.pooling  # the saved classifier predicts the way it was trained
    prog, state = build_program(model, data, task, cfg, log)
    log = log if prog.main_process else (lambda s: None)
    compile_s = 0.0
    if prog.mesh is None:  # with a mesh, the first step of each shape compiles instead
        compile_s, n_shapes = precompile(prog, data, state, lambda n: _progress(progress, n, "compile"))
        log(f"compiled {n_shapes} step shapes in {compile_s:.1f}s")
    settings = state_lib.resumable(cfg, model, splits, prog.frozen if out else None)
    if task.name != "single":  # runs saved before tasks existed resume as they were
        settings["task"] = task.to_json()
    for key in EARLY_STOP_FIELDS:  # and so do runs saved before early stopping, when it is off
        if settings[key] == TrainConfig.__dataclass_fields__[key].default:
            del settings[key]
    run = Run(prog, state, data, out, log, settings)
    try:
        return _run(run, splits, resume, progress, on_step, compile_s)
    finally:
        run.close()  # a save still being written is finished before fit returns or raises


def _run(run: Run, splits, resume: bool, progress: bool, on_step, compile_s: float) -> FitResult:
    prog = run.prog
    if resume:
        run.restore()
    if run.out and prog.main_process:
        _rewrite_jsonl(run.out / "metrics.jsonl", run.state.history)
    bar = _progress(progress and prog.main_process, prog.total_steps)
    with _Signals() as run.signals, bar:
        task = bar.add_task("train", total=prog.total_steps, completed=min(run.state.step, prog.total_steps),
                            loss=float("nan"), rate=0.0)
        hooks = [hooks_lib.LossCheck(bar, task), hooks_lib.Evaluate(), hooks_lib.StopOnSignal(),
                 hooks_lib.SaveEvery(), hooks_lib.EpochEnd()]
        if prog.cfg.keep_best or prog.cfg.early_stop_patience:
            hooks.append(hooks_lib.BestEpoch(prog.cfg.monitor, prog.cfg.min_delta, prog.cfg.early_stop_patience))
        if on_step is not None:
            hooks.insert(0, hooks_lib.Observe(on_step))
        run.loop(hooks)
    return finish(run, splits, compile_s)


class Run:
    """One fit's moving parts: the program, the loop state, the data, where saves go, and the
    losses not yet read back from the device."""

    def __init__(self, prog: Program, state: LoopState, data: Prepared, out: Path | None, log, settings: dict):
        self.prog, self.state, self.data, self.log, self.settings = prog, state, data, log, settings
        self.train = data.splits["train"]
        self.out = Path(out) if out else None
        self.state_dir = self.out / "state" if self.out else None
        self.store = state_lib.StateStore(self.state_dir) if self.state_dir else None
        self._best = None  # the keep-best store, opened at the first best epoch
        self._best_held = None  # without --out: a copy of the best epoch's parameters
        self.start_step = 0
        self.plan: list = []
        self.signals = None
        self.pending: list = []  # (step, where, device loss) not yet checked
        self.seen_since, self.t_since = 0, time.perf_counter()
        self.t_start = time.perf_counter()

    def loop(self, hooks: list[hooks_lib.Hook]) -> None:
        """Epochs of planned batches; resumes mid-epoch at `done_in_epoch`. Ends early once a hook
        has set `state.stopped` (hooks.BestEpoch) at an epoch's end."""
        prog, st, cfg = self.prog, self.state, self.prog.cfg
        base_key = jax.random.PRNGKey(cfg.seed)
        while st.epoch < cfg.epochs and st.step < prog.total_steps and st.stopped is None:
            self.plan = prog.plan(self.train, st.epoch)
            for b_index in range(st.done_in_epoch, len(self.plan)):
                g, idx = self.plan[b_index]
                metrics = prog.step(st, self.train, g, idx, jax.random.fold_in(base_key, st.step))
                st.step, st.done_in_epoch = st.step + 1, b_index + 1
                self.seen_since += len(idx)
                self.pending.append((st.step, (st.epoch, b_index, g, idx), metrics["loss"]))
                info = hooks_lib.StepInfo(st.step, st.epoch, b_index, g, idx, b_index == len(self.plan) - 1,
                                          st.step >= prog.total_steps)
                for h in hooks:
                    h.after_step(self, info)
                if info.final:
                    break
            if st.done_in_epoch == len(self.plan):
                for h in hooks:
                    h.after_epoch(self, self.plan)
                st.epoch, st.done_in_epoch = st.epoch + 1, 0
            self.save()
        self.check_losses()

    def check_losses(self):
        """Read pending losses back in one transfer; -> (last loss, examples/s since the last check)."""
        if not self.pending:
            return None
        loss = hooks_lib.check_losses(self.pending, self.train, self.state_dir)
        rate = self.seen_since / max(time.perf_counter() - self.t_since, 1e-9)
        self.seen_since, self.t_since = 0, time.perf_counter()
        self.pending.clear()
        return loss, rate

    def record(self, entry: dict) -> None:
        self.state.history.append(entry)
        hooks_lib.append_jsonl(self.out if self.prog.main_process else None, entry)

    def host(self, tree):
        """Whole numpy copies of a mesh-placed tree (a collective: every process takes part)."""
        if self.prog.mesh is None:
            return tree
        from jaxcls.train import distributed as dist

        return dist.to_host(tree)

    def save(self) -> None:
        """A resumable save, written in the background; every process writes its own shards. A
        run stopped on an epoch's last step saved that step before the epoch's end; resumed, it
        saves the same step again after that work, replacing the earlier save of it."""
        if self.store is not None:
            st = self.state
            self.store.save(st.step, {"trainable": st.trainable, "opt_state": st.opt_state},
                            st.meta(self.settings), replace=self.store.latest() == st.step)

    def best_store(self) -> state_lib.StateStore:
        if self._best is None:
            self._best = state_lib.StateStore(self.out / "best", keep=1)
        return self._best

    def save_best(self) -> None:
        """The best epoch's parameters: in RUN/best/ with --out, else a copy in (device) memory."""
        if self.out:
            self.best_store().save(self.state.step, {"trainable": self.state.trainable}, {"best": self.state.best},
                                   replace=True)
        else:
            self._best_held = jax.tree.map(jnp.copy, self.state.trainable)

    def load_best(self):
        """The trainable parameters of the best epoch, placed like the current ones."""
        if not self.out:
            if self._best_held is None:
                raise CheckpointError("no best epoch was kept")
            return self._best_held
        store = self.best_store()
        step = store.latest()
        if step is None:
            raise CheckpointError(f"{store.folder}: no saved best epoch")
        return store.load(step, {"trainable": self.state.trainable})["trainable"]

    def close(self) -> None:
        for store in (self.store, self._best):
            if store is not None:
                store.close()

    def restore(self) -> None:
        """The newest save, or step 0 when there is none; a finished run resumed with a larger
        --epochs or --max-steps continues from its last step. Arrays land at this run's placement."""
        found = state_lib.restore(self.state, self.store, self.settings) if self.store else None
        if found is None:
            self.log(f"--resume: no saved state in {self.state_dir or '(no --out)'}; starting from step 0")
            return
        self.state, latest, extended = found
        st = self.state
        self.start_step = st.step
        more = f"; continuing the finished run with new {' and '.join(extended)}" if extended else ""
        self.log(f"resumed from {latest} (step {st.step}, epoch {st.epoch + 1}, batch {st.done_in_epoch}){more}")


def finish(run: Run, splits: data_lib.DataSplits, compile_s: float) -> FitResult:
    """Keep the best epoch if asked (--keep-best, early stopping), evaluate every split in full, and report."""
    prog, st, cfg = run.prog, run.state, run.prog.cfg
    trainable, frozen = st.trainable, prog.frozen
    if (cfg.keep_best or cfg.early_stop_patience) and st.best is not None:
        trainable = run.load_best()
        what = ("lowest validation loss" if cfg.monitor == "val_loss" else f"best {cfg.monitor}")
        run.log(f"keeping epoch {st.best['epoch']} ({what} {st.best.get('value', st.best['val_loss']):.4f})")
    operands = prog.operands
    if prog.mesh is not None:
        trainable, frozen, operands = run.host(trainable), run.host(frozen), run.host(operands)
    host_prog = dataclasses.replace(prog, frozen=frozen, operands=operands)
    data, cache = run.data, prog.cache
    report = {"splits": {}, "trainable_params": prog.n_trainable, "total_params": prog.n_trainable + prog.n_frozen,
              "wall_time_s": time.perf_counter() - run.t_start, "compile_s": compile_s, "steps": st.step,
              "start_step": run.start_step, "steps_run": st.step - run.start_step,
              "devices": prog.mesh.size if prog.mesh is not None else 1,
              "fsdp": bool(cfg.fsdp and prog.mesh is not None), "padding": data.mode, "batching": prog.batching,
              "pad_length": data.pad_length, "cached_prefix": cache is not None,
              "cache_dtype": cache.dtype if cache else None, "cache_memory": cache.memory if cache else None,
              "label_names": list(splits.label_names)}
    if cfg.early_stop_patience:
        report["early_stop"] = hooks_lib.early_stop_report(st, cfg)
    task = saved_task(prog.spec.task)
    results = {name: host_prog.evaluate(trainable, d) for name, d in data.splits.items()}
    prog.close()
    if isinstance(task, MultiLabel) and cfg.thresholds == "tune":
        _, logits, y = results["validation"]
        task = task.with_tuned_thresholds(y, task.probabilities(logits))
        run.log(f"thresholds tuned on validation for best F1 per label: {list(task.thresholds)}")
    report["task"] = task.to_json()
    for name, (loss, logits, y) in results.items():
        report["splits"][name] = {"loss": loss, "n": len(data.splits[name]), "truncated": data.splits[name].truncated,
                                  **task.report(y, logits)}
    return FitResult(trainable, frozen, prog.graphdef, st.history, report, data.pad_length, task)


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.stop = None

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rewrite_jsonl(path: Path, history):
    """metrics.jsonl holds exactly the history of the state resumed from, not lines written after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for e in history:
            f.write(json.dumps(e) + "\n")


def _progress(enabled: bool, total: int, what: str = "train"):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if what == "train":
        columns += [TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} ex/s")]
    return Progress(*columns, TimeRemainingColumn(), disable=not enabled, transient=False)
