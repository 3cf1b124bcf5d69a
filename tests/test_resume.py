"""The kill-and-resume promise of `jaxcls train`, end to end through the CLI in subprocesses.

A run killed with SIGKILL at a random-ish moment after its first save, then resumed with
`--resume`, ends with exactly the weights and metrics of the same run left alone; SIGTERM saves
and exits with a message saying how to resume; a NaN loss exits with status 2 naming the step and
batch, keeping only the saves made before it. Every subprocess shares one persistent XLA
compilation cache, so only the first run of the module pays for compiling.
"""

from __future__ import annotations

import csv
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

import numpy as np
import pytest

from conftest import FIXTURE, SMS, requires_shared
from jaxcls import trainstate
from jaxcls.errors import CheckpointError

pytestmark = requires_shared

ROWS = 160  # -> 112 train / 16 validation / 32 test; batch 8 in length buckets: 15 steps an epoch
MAX_STEPS = 28  # two epochs would be 30: the run also ends mid-epoch on --max-steps
SAVE_EVERY = 4  # saves at 4, 8, 12, 15 (end of epoch 1), 16, 20, 24, 28 (the max-steps stop)
TRAIN_ARGS = ("--epochs", "2", "--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY), "--eval-freq", "10",
              "--lr", "1e-3", "--batch-size", "8", "--quiet")
TIMEOUT = 120  # per subprocess: a hang fails instead of stalling CI


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


def env(workdir: Path) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=str(workdir / "xla-cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_cmd(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxcls", "train", "--checkpoint", str(FIXTURE / "openai"),
            "--data", str(workdir / "sms.csv"), *TRAIN_ARGS, "--out", str(out), *extra]


def start(workdir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(workdir, out, *extra), env=env(workdir), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(workdir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, out, *extra), env=env(workdir), text=True,
                          capture_output=True, timeout=TIMEOUT)


def latest_step(out: Path) -> int | None:
    try:
        return json.loads((out / "state" / "LATEST").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def wait_for_save(proc: subprocess.Popen, out: Path, at_least: int = 1) -> int:
    """Poll (every millisecond) until LATEST names a save of step >= `at_least`."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        step = latest_step(out)
        if step is not None and step >= at_least:
            return step
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before a save of step >= {at_least}:\n"
                        f"{proc.stderr.read()}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"no save of step >= {at_least} in {out / 'state'} within {TIMEOUT}s")


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


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    """Run A, uninterrupted. Each save is copied aside when it appears (the process is paused with
    SIGSTOP for the copy, which changes nothing it computes), so tests can resume from any of them."""
    out = workdir / "A"
    snapshots = workdir / "A-saves"
    snapshots.mkdir()
    proc = start(workdir, out)
    seen = set()
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        step = latest_step(out)
        if step is not None and step not in seen:
            proc.send_signal(signal.SIGSTOP)
            try:
                name = f"step-{step:09d}"
                if (out / "state" / name).is_dir():
                    shutil.copytree(out / "state" / name, snapshots / name)
                    seen.add(step)
            finally:
                proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
        pytest.fail(f"reference run did not finish within {TIMEOUT}s")
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    metas = {s: json.loads((snapshots / f"step-{s:09d}" / "meta.json").read_text()) for s in seen}
    epoch_ends = [s for s, m in metas.items() if m["done_in_epoch"] == 0 and s < MAX_STEPS]
    return {"out": out, "snapshots": snapshots, "saved_steps": sorted(seen), "epoch_ends": epoch_ends}


# ---------------------------------------------------------------------------------------------
# Kill, terminate, resume
# ---------------------------------------------------------------------------------------------


def test_reference_run_saved_at_every_save_point(reference):
    assert len(reference["epoch_ends"]) == 1 and 0 < reference["epoch_ends"][0] < MAX_STEPS
    periodic = set(range(SAVE_EVERY, MAX_STEPS, SAVE_EVERY))
    assert reference["saved_steps"] == sorted(periodic | set(reference["epoch_ends"]) | {MAX_STEPS})
    final = trainstate.latest_state(reference["out"] / "state")
    assert final.name == f"step-{MAX_STEPS:09d}"
    assert not list((reference["out"] / "state").glob(".tmp-*"))


def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(workdir, reference):
    out = workdir / "B-kill"
    delay = random.Random().uniform(0.0, 0.02)  # after the first save; logged on failure
    proc = start(workdir, out)
    wait_for_save(proc, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest_step(out)
    context = f"SIGKILL {delay * 1000:.1f} ms after the first save; last complete save: step {killed_at}"
    assert killed_at is not None and killed_at < MAX_STEPS, context
    # A stale half-written save with a higher step number must not be picked over LATEST.
    fake = out / "state" / ".tmp-step-000000099-12345"
    fake.mkdir(exist_ok=True)
    (fake / "arrays.npz").write_bytes(b"half-writt")
    r = run(workdir, out, "--resume")
    assert r.returncode == 0, f"{context}\n{r.stderr}"
    assert_same_run(reference["out"], out, context)


def test_resume_from_the_end_of_epoch_save_is_bit_exact(workdir, reference):
    """As if killed right after the end-of-epoch save: a fresh run folder holding only that save."""
    out = workdir / "B-epoch-end"
    (step,) = reference["epoch_ends"]
    name = f"step-{step:09d}"
    shutil.copytree(reference["snapshots"] / name, out / "state" / name)
    (out / "state" / "LATEST").write_text(json.dumps({"step": step, "path": name}))
    r = run(workdir, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(reference["out"], out, "resumed from the end-of-epoch-1 save")


def test_sigterm_saves_exits_with_a_resume_hint_and_resume_completes(workdir, reference):
    out = workdir / "C-term"
    delay = random.Random().uniform(0.0, 0.02)
    proc = start(workdir, out)
    wait_for_save(proc, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    context = f"SIGTERM {delay * 1000:.1f} ms after the first save"
    assert proc.returncode == 2, f"{context}: exit {proc.returncode}\n{err}"
    m = re.search(r"stopped by SIGTERM at step (\d+); state saved in (\S+); continue with --resume", err)
    assert m, f"{context}\n{err}"
    stopped_at = int(m.group(1))
    assert Path(m.group(2)) == out / "state"
    assert latest_step(out) == stopped_at, context  # the save made on the way out
    assert "Traceback" not in err
    assert not (out / "weights.safetensors").exists()
    r = run(workdir, out, "--resume")
    assert r.returncode == 0, f"{context}\n{r.stderr}"
    assert_same_run(reference["out"], out, f"{context}, stopped at step {stopped_at}")


def test_nan_loss_exits_2_naming_step_and_batch_and_keeps_only_good_saves(workdir):
    out = workdir / "N-nan"
    r = run(workdir, out, "--lr", "1e30", "--save-every", "1")
    assert r.returncode == 2, r.stderr
    m = re.search(r"loss is (nan|inf|-inf) at step (\d+) \(epoch (\d+), batch (\d+)", r.stderr)
    assert m, r.stderr
    assert "Traceback" not in r.stderr
    nan_step = int(m.group(2))
    saves = sorted((out / "state").glob("step-*"))
    assert saves, "with --save-every 1 at least the step before the NaN is saved"
    assert latest_step(out) == nan_step - 1
    for save in saves:
        step = int(save.name.split("-")[1])
        assert step < nan_step, f"{save} was written at or after the NaN (step {nan_step})"
        with np.load(save / "arrays.npz") as z:
            assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f"), save
    assert not (out / "weights.safetensors").exists() and not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# trainstate.latest_state, unit level
# ---------------------------------------------------------------------------------------------


def _save(folder: Path, step: int) -> Path:
    return trainstate.save_state(folder, step, {"w": np.full(3, step, np.float32)}, {"epoch": 0})


def test_latest_state_ignores_half_written_tmp_folders(tmp_path):
    _save(tmp_path, 5)
    for junk in (".tmp-step-000000010-4242", ".tmp-step-000000999-1"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "arrays.npz").write_bytes(b"\x00" * 7)  # half a file, no meta.json
    path = trainstate.latest_state(tmp_path)
    assert path == tmp_path / "step-000000005"
    tree, meta = trainstate.load_state(path, {"w": np.zeros(3, np.float32)})
    assert meta["step"] == 5 and np.array_equal(tree["w"], np.full(3, 5, np.float32))


def test_latest_state_without_any_save_is_none(tmp_path):
    (tmp_path / ".tmp-step-000000001-7").mkdir()
    assert trainstate.latest_state(tmp_path) is None


def test_latest_pointing_to_a_missing_folder_is_a_checkpoint_error(tmp_path):
    _save(tmp_path, 5)
    (tmp_path / "LATEST").write_text(json.dumps({"step": 10, "path": "step-000000010"}))
    with pytest.raises(CheckpointError, match=r"LATEST.*step-000000010.*incomplete"):
        trainstate.latest_state(tmp_path)


@pytest.mark.parametrize("content", ["", "{", "[]", '{"step": 3}', '{"path": null}'])
def test_unreadable_latest_is_a_checkpoint_error(tmp_path, content):
    _save(tmp_path, 5)
    (tmp_path / "LATEST").write_text(content)
    with pytest.raises(CheckpointError, match="LATEST"):
        trainstate.latest_state(tmp_path)


def test_save_keeps_the_last_two_and_leaves_no_tmp(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000000002", "step-000000003"]
