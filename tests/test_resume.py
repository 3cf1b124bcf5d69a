"""The kill-and-resume promise of `jaxcls train`, end to end through the CLI in subprocesses.

A run killed with SIGKILL at a moment drawn from the whole run, then resumed with `--resume`,
really continues from its last save (metrics.json's start_step and steps_run, the "resumed from"
line) and ends with exactly the weights and metrics of the same run left alone, with dropout too.
SIGTERM saves and exits with a message saying how to resume; a NaN loss exits with status 2
naming the step and batch, keeping only the saves made before it; changed settings are refused.
Subprocesses share persistent XLA compilation caches, so only the first run of each kind pays
for compiling, and they run in three waves of runs side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FIXTURE, SMS, requires_shared
from jaxcls.train import state as trainstate
from jaxcls.errors import CheckpointError

pytestmark = requires_shared

ROWS = 160  # -> 112 train / 16 validation / 32 test; batch 8, last partial batch dropped: 14 steps an epoch
MAX_STEPS = 28  # = two epochs of 14, so the --max-steps stop falls on the end of epoch 2
SAVE_EVERY = 4  # saves at 4, 8, 12, 14 (end of epoch 1), 16, 20, 24, 28 (the max-steps stop)
TRAIN_ARGS = ("--epochs", "2", "--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY), "--eval-freq", "10",
              "--lr", "1e-3", "--batch-size", "8")
DROPOUT = ("--dropout", "0.1")  # no frozen-prefix cache then: every step runs the whole network
TIMEOUT = 120  # per subprocess: a hang fails instead of stalling CI
# Kills wait for a save of step >= k, k drawn from 1..LAST_KILL_POINT; the 8 steps after it keep
# the kill well ahead of the run's end. The seed is in every failure message; set it to replay a k.
LAST_KILL_POINT = MAX_STEPS - 2 * SAVE_EVERY
KILL_SEED = int(os.environ.get("JAXCLS_KILL_SEED") or random.SystemRandom().randrange(2**31))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small CSV drawn from the SMS file, and an XLA compilation cache for every subprocess."""
    root = tmp_path_factory.mktemp("resume")
    with open(SMS, encoding="utf-8") as src, open(root / "sms.csv", "w", newline="", encoding="utf-8") as dst:
        w = csv.writer(dst)
        w.writerow(["text", "label"])
        for line in list(src)[:ROWS]:
            label, text = line.rstrip("\n").split("\t", 1)
            w.writerow([text, label])
    return root


def env(workdir: Path, args) -> dict:
    """One compilation cache for the runs with dropout and one for the rest: runs side by side
    never write the same cache entry at once."""
    cache = "xla-cache-dropout" if "--dropout" in args else "xla-cache"
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=str(workdir / cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# The CLI with every save kept (trainstate.KEEP raised), so tests can resume from any of them.
KEEP_ALL = "import sys; from jaxcls import cli; from jaxcls.train import state; state.KEEP = 10**6; sys.exit(cli.main(sys.argv[1:]))"


def train_cmd(workdir: Path, out: Path, *extra: str, keep_all: bool = False) -> list[str]:
    return [sys.executable, *(("-c", KEEP_ALL) if keep_all else ("-m", "jaxcls")), "train",
            "--checkpoint", str(FIXTURE / "openai"), "--data", str(workdir / "sms.csv"), *TRAIN_ARGS,
            "--out", str(out), *extra]


@dataclasses.dataclass
class Started:
    """A training subprocess whose output goes to files (a pipe nobody reads could fill and block it)."""

    proc: subprocess.Popen
    out: Path
    logs: Path

    def stdout(self) -> str:
        return (self.logs / "stdout").read_text()

    def stderr(self) -> str:
        return (self.logs / "stderr").read_text()


def start(workdir: Path, out: Path, *extra: str, keep_all: bool = False) -> Started:
    logs = workdir / "logs" / f"{out.name}-{len(list(workdir.glob(f'logs/{out.name}-*')))}"
    logs.mkdir(parents=True)
    with open(logs / "stdout", "w") as o, open(logs / "stderr", "w") as e:
        proc = subprocess.Popen(train_cmd(workdir, out, *extra, keep_all=keep_all), env=env(workdir, extra), text=True,
                                stdout=o, stderr=e)
    return Started(proc, out, logs)


def latest_step(out: Path) -> int | None:
    """The newest complete save (orbax renames a save into place once it is whole)."""
    return (trainstate.saved_steps(out / "state") or [None])[-1]


def read_meta(state: Path, step: int) -> dict:
    store = trainstate.StateStore(state)
    try:
        return store.meta(step)
    finally:
        store.close()


def kill_moment(what: str) -> tuple[int, float, str]:
    """(k, a delay of up to about one step, a context line): kill `delay` after a save of step >= k."""
    rng = random.Random(f"{KILL_SEED}-{what}")
    k, delay = rng.randint(1, LAST_KILL_POINT), rng.uniform(0.0, 0.02)
    return k, delay, f"{what} {delay * 1000:.1f} ms after a save of step >= {k} (JAXCLS_KILL_SEED={KILL_SEED})"


def assert_resumed(stdout: str, out: Path, step: int, context: str) -> None:
    """The run continued from the save of `step`, not from step 0: metrics.json and the log agree."""
    report = json.loads((out / "metrics.json").read_text())
    assert report["start_step"] == step > 0, f"started at step {report['start_step']}, not {step} ({context})"
    assert report["steps_run"] == MAX_STEPS - step, context
    m = re.search(r"^resumed from (\S+) \(step (\d+), epoch \d+, batch \d+\)$", stdout, re.M)
    assert m, f"no 'resumed from' line ({context}):\n{stdout}"
    assert (Path(m.group(1)), int(m.group(2))) == (out / "state" / f"step_{step:09d}", step), context


def assert_same_run(a: Path, b: Path, context: str) -> None:
    """Every tensor of weights.safetensors bit-equal, the same test metrics and history."""
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert sorted(wa) == sorted(wb), context
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, (name, context)
        diff = np.max(np.abs(wa[name].astype(np.float64) - wb[name].astype(np.float64)), initial=0.0)
        assert np.array_equal(wa[name], wb[name]), f"{name}: max |diff| {diff:.3g} ({context})"
    ra, rb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ra["steps"] == rb["steps"] == MAX_STEPS, context
    assert ra["splits"]["test"]["accuracy"] == rb["splits"]["test"]["accuracy"], context
    assert ra["splits"] == rb["splits"], context  # losses, P/R/F1, confusion matrices

    def history(x):  # timings differ between runs; every number computed from the model must not
        rows = [json.loads(l) for l in (x / "metrics.jsonl").read_text().splitlines() if l.strip()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert history(a) == history(b), context


@dataclasses.dataclass
class Job:
    """A run for `side_by_side`: its extra flags; whether it keeps every save; and an optional
    (signal, k, delay): send the signal `delay` seconds after a save of a step >= k is complete."""

    extra: tuple[str, ...]
    keep_all: bool = False
    stop: tuple[signal.Signals, int, float] | None = None


def side_by_side(workdir: Path, jobs: dict[str, Job]) -> dict[str, dict]:
    """Start each job (run folder name -> Job) at once and wait for all of them: two cores do twice
    the work of one. Signals go by what a run has saved, never by time alone."""
    started = {name: start(workdir, workdir / name, *job.extra, keep_all=job.keep_all)
               for name, job in jobs.items()}
    due, signalled = {}, set()
    deadline = time.monotonic() + TIMEOUT * len(jobs)
    while any(s.proc.poll() is None for s in started.values()) and time.monotonic() < deadline:
        for name, job in jobs.items():
            s = started[name]
            if job.stop is None or name in signalled or s.proc.poll() is not None:
                continue
            sig, k, delay = job.stop
            step = latest_step(s.out)
            if step is not None and step >= k:
                due.setdefault(name, time.monotonic() + delay)
            if name in due and time.monotonic() >= due[name]:
                s.proc.send_signal(sig)
                signalled.add(name)
        time.sleep(0.001)
    late = [s for s in started.values() if s.proc.poll() is None]
    for s in late:
        s.proc.kill()
    if late:
        pytest.fail(f"{', '.join(s.out.name for s in late)} did not finish within {TIMEOUT * len(jobs)}s")
    result = {name: {"out": s.out, "returncode": s.proc.returncode, "stdout": s.stdout(), "stderr": s.stderr(),
                     "latest": latest_step(s.out), "signalled": name in signalled,
                     "weights": (s.out / "weights.safetensors").exists()}
              for name, s in started.items()}
    for name, job in jobs.items():
        if job.keep_all:
            r = result[name]
            assert r["returncode"] == 0, r["stderr"]
            metas = {step: read_meta(r["out"] / "state", step) for step in trainstate.saved_steps(r["out"] / "state")}
            r.update(saved_steps=sorted(metas), metas=metas,
                     epoch_ends=[st for st, m in metas.items() if m["done_in_epoch"] == 0 and st < MAX_STEPS])
    return result


def copy_save(ref: dict, step: int, out: Path) -> None:
    """A fresh run folder holding only the save of `step`, as if killed right after it."""
    name = f"step_{step:09d}"
    shutil.copytree(ref["out"] / "state" / name, out / "state" / name)


DROPOUT_RESUME_STEP = 2 * SAVE_EVERY  # mid-epoch 1: the resumed run crosses into epoch 2
KILL = kill_moment("SIGKILL")
TERM = kill_moment("SIGTERM")
# A stale half-written save with a higher step number (orbax's temporary name for it), planted
# before resuming the killed run.
FAKE_TMP = "step_000000099.orbax-checkpoint-tmp"

# The subprocesses run in three waves, each side by side; a wave holds what needs only earlier
# waves' results (or their compiled programs in the XLA cache).


@pytest.fixture(scope="module")
def wave1(workdir) -> dict:
    """A, the reference, uninterrupted; D, the same with dropout, started with --resume in an
    empty folder. Both keep every save."""
    return side_by_side(workdir, {"A": Job(("--quiet",), keep_all=True),
                                  "D": Job((*DROPOUT, "--resume"), keep_all=True)})


@pytest.fixture(scope="module")
def wave2(workdir, wave1) -> dict:
    """Runs killed with SIGKILL and stopped with SIGTERM at the drawn moments; resumes from copies
    of A's end-of-epoch save (one with a changed --lr) and of one of D's; the NaN run."""
    (epoch_end,) = wave1["A"]["epoch_ends"]
    copy_save(wave1["A"], epoch_end, workdir / "E-epoch-end")
    copy_save(wave1["A"], epoch_end, workdir / "E-changed-lr")
    copy_save(wave1["D"], DROPOUT_RESUME_STEP, workdir / "D-resumed")
    result = side_by_side(workdir, {
        "B-kill": Job(("--quiet",), stop=(signal.SIGKILL, *KILL[:2])),
        "C-term": Job(("--quiet",), stop=(signal.SIGTERM, *TERM[:2])),
        "E-epoch-end": Job(("--resume",)),
        "E-changed-lr": Job(("--resume", "--quiet", "--lr", "2e-3")),
        "D-resumed": Job((*DROPOUT, "--resume")),
        "N-nan": Job(("--quiet", "--lr", "1e30", "--save-every", "1"))})
    result["E-epoch-end"]["step"] = result["E-changed-lr"]["step"] = epoch_end
    return result


@pytest.fixture(scope="module")
def wave3(workdir, wave2) -> dict:
    """--resume of the killed and of the stopped run."""
    fake = workdir / "B-kill" / "state" / FAKE_TMP
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "trainable").mkdir()
    (fake / "trainable" / "manifest.ocdbt").write_bytes(b"half-writt")
    return side_by_side(workdir, {"B-kill": Job(("--resume",)), "C-term": Job(("--resume",))})


# ---------------------------------------------------------------------------------------------
# Kill, terminate, resume
# ---------------------------------------------------------------------------------------------


def test_reference_run_saved_at_every_save_point(wave1):
    ref = wave1["A"]
    assert len(ref["epoch_ends"]) == 1 and 0 < ref["epoch_ends"][0] < MAX_STEPS
    periodic = set(range(SAVE_EVERY, MAX_STEPS, SAVE_EVERY))
    assert ref["saved_steps"] == sorted(periodic | set(ref["epoch_ends"]) | {MAX_STEPS})
    assert latest_step(ref["out"]) == MAX_STEPS
    assert not list((ref["out"] / "state").glob("*tmp*"))
    report = json.loads((ref["out"] / "metrics.json").read_text())
    assert (report["start_step"], report["steps_run"]) == (0, MAX_STEPS)


def test_sigkill_at_a_drawn_moment_then_resume_is_bit_exact(wave1, wave2, wave3):
    """Fails if --resume is ignored (planted: Run.restore a no-op), or resumes from an older save
    (planted: StateStore.latest returning the older of the two kept saves): start_step is not the save."""
    killed, k, context = wave2["B-kill"], KILL[0], KILL[2]
    assert killed["signalled"] and killed["returncode"] == -signal.SIGKILL, \
        f"{context}: exit {killed['returncode']}\n{killed['stderr']}"
    killed_at = killed["latest"]
    context += f"; last complete save: step {killed_at}"
    assert killed_at is not None and k <= killed_at < MAX_STEPS, context
    r = wave3["B-kill"]
    assert r["returncode"] == 0, f"{context}\n{r['stderr']}"
    assert_resumed(r["stdout"], r["out"], killed_at, context)
    assert_same_run(wave1["A"]["out"], r["out"], context)
    assert not (r["out"] / "state" / FAKE_TMP).exists(), "the half-written save planted before --resume stayed"


def test_sigterm_saves_exits_with_a_resume_hint_and_resume_completes(wave1, wave2, wave3):
    """Fails if --resume is ignored (planted: Run.restore a no-op), or resumes from an older save
    (planted: StateStore.latest returning the older of the two kept saves): start_step is not the save."""
    stopped, k, context = wave2["C-term"], TERM[0], TERM[2]
    out, err = stopped["out"], stopped["stderr"]
    assert stopped["signalled"] and stopped["returncode"] == 2, f"{context}: exit {stopped['returncode']}\n{err}"
    m = re.search(r"stopped by SIGTERM at step (\d+); state saved in (\S+); continue with --resume", err)
    assert m, f"{context}\n{err}"
    stopped_at = int(m.group(1))
    context += f", stopped at step {stopped_at}"
    assert Path(m.group(2)) == out / "state"
    assert k <= stopped_at < MAX_STEPS, context
    assert stopped["latest"] == stopped_at, context  # the save made on the way out
    assert "Traceback" not in err
    assert not stopped["weights"], context
    r = wave3["C-term"]
    assert r["returncode"] == 0, f"{context}\n{r['stderr']}"
    assert_resumed(r["stdout"], out, stopped_at, context)
    assert_same_run(wave1["A"]["out"], out, context)


def test_resume_from_the_end_of_epoch_save_is_bit_exact(wave1, wave2):
    """Fails if --resume is ignored (planted: Run.restore a no-op), or if that save counts its
    epoch twice (the bug this test found)."""
    r = wave2["E-epoch-end"]
    assert r["returncode"] == 0, r["stderr"]
    assert_resumed(r["stdout"], r["out"], r["step"], "resumed from the end-of-epoch-1 save")
    assert_same_run(wave1["A"]["out"], r["out"], "resumed from the end-of-epoch-1 save")


def test_resume_with_dropout_is_bit_exact(wave1, wave2):
    """Resumed mid-epoch, with a dropout key per step. Fails if the dropout key restarts with the
    resumed run (planted: fold_in(base_key, step - start_step) in fit)."""
    assert wave1["D"]["metas"][DROPOUT_RESUME_STEP]["done_in_epoch"] > 0 and wave1["D"]["epoch_ends"]
    r = wave2["D-resumed"]
    context = f"dropout {DROPOUT[1]}, resumed from step {DROPOUT_RESUME_STEP}"
    assert r["returncode"] == 0, r["stderr"]
    assert_resumed(r["stdout"], r["out"], DROPOUT_RESUME_STEP, context)
    assert_same_run(wave1["D"]["out"], r["out"], context)


def test_resume_with_nothing_saved_says_so_and_starts_from_step_0(wave1):
    """Run D was started with --resume in an empty folder. Fails if fit stops saying so (planted:
    that log call removed)."""
    d = wave1["D"]
    assert f"--resume: no saved state in {d['out'] / 'state'}; starting from step 0\n" in d["stdout"], d["stdout"]
    assert "resumed from" not in d["stdout"]
    report = json.loads((d["out"] / "metrics.json").read_text())
    assert (report["start_step"], report["steps_run"], report["steps"]) == (0, MAX_STEPS, MAX_STEPS)


def test_resume_with_a_changed_setting_is_refused_naming_it(wave2):
    """--lr 2e-3 against a save made with 1e-3: exit 2, one line naming the save and lr, nothing
    written. Fails if settings are not compared on resume (planted: that check skipped in fit)."""
    r = wave2["E-changed-lr"]
    out, name = r["out"], f"step_{r['step']:09d}"
    assert r["returncode"] == 2, f"exit {r['returncode']}\n{r['stderr']}"
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1, r["stderr"]
    m = re.fullmatch(r"jaxcls: error: (\S+): saved with other settings \(([^)]*)\); .*new --out", lines[0])
    assert m, lines[0]
    assert (Path(m.group(1)), m.group(2)) == (out / "state" / name, "lr"), lines[0]
    assert latest_step(out) == r["step"]
    assert sorted(p.name for p in (out / "state").iterdir()) == [name]
    assert not (out / "metrics.jsonl").exists() and not (out / "weights.safetensors").exists()


def test_nan_loss_exits_2_naming_step_and_batch_and_keeps_only_good_saves(wave2):
    n = wave2["N-nan"]
    out, err = n["out"], n["stderr"]
    assert n["returncode"] == 2, err
    m = re.search(r"loss is (nan|inf|-inf) at step (\d+) \(epoch (\d+), batch (\d+)", err)
    assert m, err
    assert "Traceback" not in err
    nan_step = int(m.group(2))
    saves = trainstate.saved_steps(out / "state")
    assert saves, "with --save-every 1 at least the step before the NaN is saved"
    assert latest_step(out) == nan_step - 1
    import orbax.checkpoint as ocp

    for step in saves:
        assert step < nan_step, f"step {step} was saved at or after the NaN (step {nan_step})"
        for item in ("trainable", "opt_state"):
            tree = ocp.StandardCheckpointer().restore(out / "state" / f"step_{step:09d}" / item)
            floats = [np.asarray(x) for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f"]
            assert floats and all(np.isfinite(x).all() for x in floats), (step, item)
    assert not (out / "weights.safetensors").exists() and not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# trainstate.StateStore, unit level
# ---------------------------------------------------------------------------------------------


def _tree(step: int, n: int = 3) -> dict:
    return {"trainable": {"w": np.full(n, step, np.float32)}, "opt_state": {"count": np.int32(step)}}


def _save(folder: Path, *steps: int, **kw) -> None:
    store = trainstate.StateStore(folder, **kw)
    try:
        for step in steps:
            store.save(step, _tree(step), {"epoch": 0, "step": step})
    finally:
        store.close()


def test_a_half_written_save_is_never_picked_and_is_removed(tmp_path):
    """orbax's temporary folders (a save killed before its rename), even of higher steps, are
    never read, and opening the folder removes them; other files stay. Fails if they are kept
    (planted: cleanup_tmp_directories=False in StateStore)."""
    _save(tmp_path, 5)
    junk = ["step_000000010.orbax-checkpoint-tmp", "step_000000999.orbax-checkpoint-tmp"]
    for name in junk:
        (tmp_path / name / "trainable").mkdir(parents=True)
        (tmp_path / name / "trainable" / "manifest.ocdbt").write_bytes(b"\x00" * 7)
    (tmp_path / "notes.txt").write_text("mine")
    store = trainstate.StateStore(tmp_path)
    try:
        assert store.latest() == 5 and trainstate.saved_steps(tmp_path) == [5]
        got = store.load(5, _tree(0))
        assert np.array_equal(got["trainable"]["w"], np.full(3, 5, np.float32)) and store.meta(5)["step"] == 5
    finally:
        store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_000000005"]


def test_only_a_half_written_save_means_nothing_saved(tmp_path):
    """Fails if restore reads on when no save is complete (planted: its `if step is None` return
    removed: orbax's restore of step None raises)."""
    (tmp_path / "step_000000001.orbax-checkpoint-tmp").mkdir()
    assert trainstate.saved_steps(tmp_path) == []
    store = trainstate.StateStore(tmp_path)
    try:
        assert trainstate.restore(trainstate.LoopState(*_tree(0).values()), store, {}) is None
    finally:
        store.close()


def test_a_damaged_save_is_a_checkpoint_error_naming_it(tmp_path):
    """A save whose array data is gone is one CheckpointError line naming it, never a silent
    restart. Fails if orbax's error escapes as it is (planted: the except clause of
    StateStore.load removed)."""
    _save(tmp_path, 5)
    shutil.rmtree(tmp_path / "step_000000005" / "trainable" / "d")
    store = trainstate.StateStore(tmp_path)
    try:
        with pytest.raises(CheckpointError) as e:
            store.load(5, _tree(0))
    finally:
        store.close()
    assert str(e.value).startswith(f"{tmp_path / 'step_000000005'}: cannot be read") and "\n" not in str(e.value)


def test_save_keeps_the_last_two_and_leaves_no_tmp(tmp_path):
    """Fails if old saves are not pruned (planted: max_to_keep=None in StateStore)."""
    _save(tmp_path, 1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002", "step_000000003"]


def test_a_save_behind_the_newest_is_refused(tmp_path):
    """Saves only move forward: one at a step below a save present is an error naming the folder,
    not silently dropped (orbax's save returns False). Fails if that return is ignored (planted:
    the raise in StateStore.save removed)."""
    _save(tmp_path, 60)
    with pytest.raises(CheckpointError, match=r"a save of step 3 was not made: it holds step 60"):
        _save(tmp_path, 3)
    assert trainstate.saved_steps(tmp_path) == [60]


def test_fit_without_resume_refuses_a_folder_holding_saves(tmp_path):
    """Orbax keeps the highest steps, so a new run's saves must not land beside another run's:
    fit refuses before any work. Fails if that check is dropped from fit (the None model is then
    used and fails otherwise)."""
    from jaxcls.config import TrainConfig
    from jaxcls.errors import ConfigError
    from jaxcls.train import fit

    _save(tmp_path / "state", 8)
    with pytest.raises(ConfigError, match=r"state: holds saves of another run \(up to step 8\); resume it"):
        fit(None, None, None, TrainConfig(), out=tmp_path)
    assert trainstate.saved_steps(tmp_path / "state") == [8]


def test_a_stop_on_an_epochs_last_step_resumes_to_the_same_end(tmp_path):
    """SIGTERM during the last step of an epoch saves that step before the epoch's end-of-epoch
    work; the resumed run does that work and saves the same step again, then trains on to the
    uninterrupted run's parameters and epoch entries. Fails if that second save of the step is
    refused (planted: Run.save never replacing: "a save of step N was not made: it holds step N
    already", which the randomized SIGTERM test hit once in CI at step 14)."""
    import os
    import signal

    import jax

    from jaxcls.train import fit
    from jaxcls.train.hooks import Interrupted
    from test_train import BASE, encode, model, toy_splits

    cfg = BASE.replace(trainable="last_block", save_every=1000)
    steps = []
    ref = fit(model(0), encode, toy_splits(), cfg, out=tmp_path / "ref", progress=False, log=lambda s: None,
              on_step=lambda s: steps.append((s["step"], s["epoch"])))
    last_of_first = max(step for step, epoch in steps if epoch == 0)

    def stop_there(s):
        if s["step"] == last_of_first:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=f"stopped by SIGTERM at step {last_of_first}"):
        fit(model(0), encode, toy_splits(), cfg, out=out, progress=False, log=lambda s: None, on_step=stop_there)
    assert trainstate.saved_steps(out / "state") == [last_of_first]
    again = fit(model(0), encode, toy_splits(), cfg, out=out, resume=True, progress=False, log=lambda s: None)
    for a, b in zip(jax.tree.leaves(again.trainable), jax.tree.leaves(ref.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    epochs = lambda r: [h for h in r.history if "val_loss_full" in h]  # noqa: E731
    assert [h["step"] for h in epochs(again)] == [h["step"] for h in epochs(ref)] == [last_of_first, len(steps)]


def test_replace_overwrites_a_save_of_the_same_step(tmp_path):
    """The keep-best save of an epoch taken again after a resume (killed between that save and the
    state save) replaces the one there; without `replace` the same step is an error. Fails if
    replace deletes nothing (planted: its loop removed: orbax refuses the existing step)."""
    _save(tmp_path, 14)
    store = trainstate.StateStore(tmp_path, keep=1)
    try:
        with pytest.raises(CheckpointError, match="a save of step 14 was not made: it holds step 14"):
            store.save(14, _tree(7), {"step": 14})
        store.save(14, _tree(7), {"step": 14, "again": True}, replace=True)
        store.wait()
        assert np.array_equal(store.load(14, _tree(0))["trainable"]["w"], np.full(3, 7, np.float32))
        assert store.meta(14)["again"]
    finally:
        store.close()


def test_saves_are_written_in_the_background(tmp_path):
    """`save` returns while the write goes on; `wait` finishes it. Fails if saves are synchronous
    (planted: asynchronous=False as StateStore's default)."""
    store = trainstate.StateStore(tmp_path)
    try:
        store.save(1, _tree(1, n=1 << 22), {"step": 1})
        assert store.manager.is_saving_in_progress()
        store.wait()
        assert not store.manager.is_saving_in_progress() and trainstate.saved_steps(tmp_path) == [1]
    finally:
        store.close()


def test_a_pre_orbax_state_folder_is_refused_with_one_line_saying_how(tmp_path, capsys):
    """A run folder saved before orbax (LATEST naming step-N/arrays.npz): `--resume` exits 2 with
    one line naming the folder and both ways on, before any work; its files stay. Fails if the
    old folder is ignored and the run restarts from step 0 (planted: refuse_legacy's test always
    False)."""
    from jaxcls.cli import main

    out = tmp_path / "run"
    old = out / "state" / "step-000000004"
    old.mkdir(parents=True)
    np.savez(old / "arrays.npz", np.zeros(3, np.float32))
    (old / "meta.json").write_text(json.dumps({"step": 4, "epoch": 0, "done_in_epoch": 4, "config": {}}))
    (out / "state" / "LATEST").write_text(json.dumps({"step": 4, "path": old.name, "written": [old.name]}))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code = main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(tmp_path / "absent.csv"),
                 "--out", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"jaxcls: error: {out / 'state'}: holds train state in the format of jaxcls before "
                             "orbax") and "version that started it" in err[0] and "--overwrite" in err[0], err[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
