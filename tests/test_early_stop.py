"""Early stopping (--early-stop-patience, --monitor, --min-delta): where it stops, which weights it
keeps, what metrics.json records, and a resumed run counting on where the save left off."""

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from jaxcls.cli import main
from jaxcls.config import GPT2Config, TrainConfig
from jaxcls.data import DataSplits, TextDataset
from jaxcls.errors import ConfigError
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.task import make_task
from jaxcls.train import fit
from jaxcls.train import hooks as hooks_lib
from jaxcls.train.hooks import Interrupted
from jaxcls.train.loop import _check_monitor
from jaxcls.train.state import LoopState

CFG = GPT2Config(n_vocab=200, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
# 16 training rows, batch 8, drop_last: 2 steps an epoch
BASE = TrainConfig(epochs=6, batch_size=8, lr=1e-3, eval_freq=100, eval_iter=1, padding="longest", cache=False,
                   trainable="head", early_stop_patience=2, min_delta=0.05)
# The validation loss each epoch reports (forced): best at epoch 2; epoch 3 beats it by only 0.01,
# less than min_delta, so epochs 3 and 4 are the two without improvement and the run stops after 4.
FORCED = [1.0, 0.7, 0.69, 0.8, 0.9, 0.95]
STEPS_PER_EPOCH = 2


def splits():
    rng = np.random.default_rng(0)
    texts = tuple(" ".join(str(rng.integers(0, 9)) for _ in range(rng.integers(2, 9))) for _ in range(24))
    labels = np.arange(24, dtype=np.int32) % 2
    ds = lambda a, b, name: TextDataset(texts[a:b], labels[a:b], ("no", "yes"), name)
    return DataSplits(ds(0, 16, "train"), ds(16, 20, "validation"), ds(20, 24, "test"), ("no", "yes"))


def run(cfg, *, out=None, resume=False, on_step=None):
    m = GPT2Classifier(CFG, 2, pooling="last_real", rngs=nnx.Rngs(0))
    return fit(m, lambda t: [int(w) + 1 for w in t.split()], splits(), cfg, out=out, resume=resume,
               progress=False, log=lambda s: None, on_step=on_step)


def flat(state):
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture
def forced(monkeypatch):
    """EpochEnd's validation with FORCED losses (the real logits), keyed by the epoch so a resumed
    run sees the same numbers; the parameters each epoch ended with, by epoch."""
    seen = {}

    def validate(self, run_):
        epoch = run_.state.epoch + 1
        seen[epoch] = flat(run_.state.trainable)
        _, logits, y = run_.prog.evaluate(run_.state.trainable, run_.data.splits["validation"])
        return FORCED[epoch - 1], logits, y

    monkeypatch.setattr(hooks_lib.EpochEnd, "validate", validate)
    return seen


def epochs_of(history):
    return [h["epoch"] for h in history if "val_loss_full" in h]


def test_stops_after_patience_evaluations_without_improvement_and_keeps_the_best(forced):
    """Stops at epoch 4 (min_delta makes epoch 3 no improvement), returns epoch 2's weights and
    reports why. Fails if min_delta is ignored (planted: `value < old - self.min_delta` -> `value
    < old` in hooks.BestEpoch.better: epoch 3 becomes the best and the run goes to epoch 5) or if the
    best is not restored without --out (planted: `return self._best_held` -> `return
    self.state.trainable` in loop.Run.load_best)."""
    got = run(BASE)
    assert epochs_of(got.history) == [1, 2, 3, 4]
    assert got.report["steps"] == 4 * STEPS_PER_EPOCH
    assert got.report["early_stop"] == STOPPED
    kept = flat(got.trainable)
    assert any(not np.array_equal(kept[k], v) for k, v in forced[4].items())  # it trained on after epoch 2
    for k, v in forced[2].items():  # the parameters epoch 2 ended with, which its validation scored
        np.testing.assert_array_equal(kept[k], v, err_msg=k)


STOPPED = {"monitor": "val_loss", "min_delta": 0.05, "patience": 2, "best": 0.7, "best_epoch": 2,
           "best_step": 2 * STEPS_PER_EPOCH, "stopped_at_step": 4 * STEPS_PER_EPOCH, "stopped_at_epoch": 4,
           "reason": "val_loss did not improve by more than 0.05 in 2 evaluation(s) after its best, 0.7 at "
                     "epoch 2 (step 4)"}


def test_a_run_interrupted_after_a_non_improving_evaluation_resumes_to_the_same_stop(forced, tmp_path):
    """SIGINT in epoch 4 (after one evaluation without improvement), then --resume: the run stops
    after epoch 4, as the uninterrupted one, with epoch 2's weights read back from RUN/best/. Fails
    if the count is not saved (planted: `"stale": self.stale` dropped from LoopState.meta: the
    resumed run counts from 0 and stops after epoch 5)."""
    def interrupt(info):
        if info["step"] == 3 * STEPS_PER_EPOCH + 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="stopped by SIGINT at step 7"):
        run(BASE, out=tmp_path, on_step=interrupt)
    resumed = run(BASE, out=tmp_path, resume=True)
    assert resumed.report["start_step"] == 7
    assert resumed.report["early_stop"] == STOPPED
    assert epochs_of(resumed.history) == [1, 2, 3, 4]
    for k, v in forced[2].items():  # recorded by the interrupted run
        np.testing.assert_array_equal(flat(resumed.trainable)[k], v, err_msg=k)


def best_epoch_run(history):
    """BestEpoch's view of a run: its loop state, and the saves of the best it asks for."""
    saved = []
    st = LoopState(None, None, history=[])
    return SimpleNamespace(state=st, save_best=lambda: saved.append(st.epoch + 1), log=lambda s: None), saved


def test_a_monitor_where_larger_is_better():
    """val_macro_f1 improves upwards: best at epoch 2 (0.8), stop after two epochs without a rise.
    Fails if every monitor were read as a loss (planted: MONITORS' val_macro_f1 -> (..., False))."""
    hook = hooks_lib.BestEpoch("val_macro_f1", 0.0, 2)
    run_, saved = best_epoch_run([])
    for epoch, f1 in enumerate([0.5, 0.8, 0.8, 0.7, 0.9], start=1):
        if run_.state.stopped:
            break
        run_.state.epoch, run_.state.step = epoch - 1, 10 * epoch
        run_.state.history.append({"epoch": epoch, "val_loss_full": 1.0, "val_macro_f1": f1})
        hook.after_epoch(run_, [])
    assert saved == [1, 2]
    assert run_.state.best["value"] == 0.8 and run_.state.best["step"] == 20
    assert run_.state.stopped["epoch"] == 4 and run_.state.stopped["step"] == 40


def test_monitors_a_task_does_not_report_are_refused_in_one_line():
    """Regression reports only a loss; multi-label F1 but no accuracy. Fails if the check is skipped
    (planted: `if cfg.monitor not in valid` -> `if False`)."""
    reg = make_task("regression", ("score",))
    multi = make_task("multilabel", ("a", "b"))
    s = splits()
    with pytest.raises(ConfigError, match=r"^--monitor val_accuracy: --task regression reports val_loss on "
                                          r"validation$"):
        _check_monitor(BASE.replace(monitor="val_accuracy"), reg, s)
    with pytest.raises(ConfigError, match=r"--task multilabel reports val_loss \| val_macro_f1"):
        _check_monitor(BASE.replace(monitor="val_accuracy"), multi, s)
    _check_monitor(BASE.replace(monitor="val_macro_f1"), multi, s)
    with pytest.raises(ConfigError, match="validation split, and there is none"):
        _check_monitor(BASE, make_task("single", ("no", "yes")), DataSplits(s.train, None, s.test, s.label_names))


@pytest.mark.parametrize("argv,message", [
    (["--early-stop-patience", "0"], "TrainConfig.early_stop_patience: must be a positive number"),
    (["--monitor", "val_f1"], "TrainConfig.monitor: must be one of"),
    (["--min-delta", "-0.1"], "TrainConfig.min_delta: must be a finite number >= 0"),
    (["--monitor", "val_accuracy"], "--monitor/--min-delta (val_accuracy, 0.0) say what --keep-best"),
])
def test_bad_early_stop_flags_exit_2_with_one_line(argv, message, capsys, tmp_path):
    """Refused before any model or data is read. Fails if --monitor without --keep-best or
    --early-stop-patience were accepted and ignored (planted: the `if (self.monitor != ...` check
    in TrainConfig removed)."""
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
