"""`jaxcls train --out` never deletes or mixes another run's files: a used folder is refused unless
--resume or --overwrite, --overwrite removes only jaxcls's own files."""


import numpy as np
import pytest

import jaxcls.data
from conftest import TOKENIZER_DIR, write_sms_csv
from jaxcls.cli import main
from jaxcls.errors import ConfigError
from jaxcls.train import state as trainstate



def _train(tmp_path, out, *extra):
    return main(["train", "--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR),
                 "--data", str(write_sms_csv(tmp_path / "data.csv", 24)), "--epochs", "1", "--batch-size", "4",
                 "--max-steps", "2", "--save-every", "1", "--out", str(out), "--quiet", *extra])


def _no_work(monkeypatch):
    """Any attempt to read the data (the first real work) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("train started working before checking --out")
    monkeypatch.setattr(jaxcls.data, "load_spec", refuse)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first")
    out = tmp / "run"
    assert _train(tmp, out) == 0
    return tmp, out


def test_used_out_is_refused_before_any_work_and_left_untouched(first_run, monkeypatch, capsys):
    """Fails if a used --out is reused silently (planted: the `found and not resume` refusal removed
    from prepare_run_folder)."""
    tmp, out = first_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _no_work(monkeypatch)
    capsys.readouterr()
    assert _train(tmp, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(out) in err and "--resume" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


class _Stop(Exception):
    pass


def test_overwrite_clears_only_jaxcls_files_before_work_then_trains(first_run, tmp_path, monkeypatch):
    """When work starts, only unknown files are left, so a run killed midway mixes nothing. Fails if
    --overwrite leaves the old run's files (planted: the clearing loop removed from
    prepare_run_folder), among them a prefix cache it kept in the folder with --keep-cache
    (planted: the kept-cache names left out), or deletes unknown ones (planted: shutil.rmtree(out)
    before the loop)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(first_run[1], out)
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "prefix-cache-0123456789ab.bin").write_bytes(b"\0" * 64)  # what --keep-cache leaves
    (out / "prefix-cache.json").write_text('{"file": "prefix-cache-0123456789ab.bin"}')
    (out / "prefix-cache-mine.bin").write_bytes(b"not jaxcls's name")
    seen = {}

    def look(*a, **k):
        seen["files"] = sorted(p.name for p in out.iterdir())
        raise _Stop

    with monkeypatch.context() as m:
        m.setattr(jaxcls.data, "load_spec", look)
        with pytest.raises(_Stop):
            _train(tmp_path, out, "--overwrite")
    assert seen["files"] == ["extra", "notes.txt", "prefix-cache-mine.bin"], seen
    assert _train(tmp_path, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step_000000001", "step_000000002"]
    assert trainstate.saved_steps(out / "state") == [1, 2]


def test_out_that_cannot_be_written_fails_at_once(tmp_path, monkeypatch, capsys):
    """Fails if --out is first written after the work (planted: the write probe in
    prepare_run_folder removed, so load_spec runs). chmod cannot stop root, so as root the existing
    unwritable folder is /proc/self; a folder under a regular file and a file are refused too."""
    import os
    import sys

    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
    elif sys.platform.startswith("linux"):
        readonly = __import__("pathlib").Path("/proc/self")
    else:
        readonly = None
    if readonly is not None:
        _no_work(monkeypatch)
        capsys.readouterr()
        assert _train(tmp_path, readonly) == 2
        err = capsys.readouterr().err.strip()
        assert str(readonly) in err and "cannot write" in err, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _no_work(monkeypatch)
    capsys.readouterr()
    assert _train(tmp_path, blocker / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker / "run") in err and "cannot write" in err, err
    assert _train(tmp_path, blocker) == 2
    assert "is a file" in capsys.readouterr().err


def test_empty_folder_and_resume_are_accepted_and_flags_conflict(tmp_path):
    """Fails if an empty folder is refused, or --resume of a used one is (planted: `and not resume`
    dropped from the refusal)."""
    trainstate.prepare_run_folder(tmp_path / "missing", resume=False, overwrite=False)
    trainstate.prepare_run_folder(tmp_path, resume=False, overwrite=False)
    (tmp_path / "metrics.jsonl").write_text("")
    trainstate.prepare_run_folder(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        trainstate.prepare_run_folder(tmp_path, resume=True, overwrite=True)


def _snapshot(out):
    """Every file under `out` with its bytes and mtime: a write of the same bytes shows too."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_resuming_a_finished_run_says_so_and_writes_nothing(first_run, tmp_path, monkeypatch, capsys):
    """Fails if a finished run is trained or rewritten again (planted: the finished_run check
    removed from cmd_train: the data is read and every output rewritten)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(first_run[1], out)
    before = _snapshot(out)
    _no_work(monkeypatch)
    capsys.readouterr()
    assert _train(first_run[0], out, "--resume") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{out}: already complete (2 steps, as its metrics.json records); nothing to do. "
                     "Resume with a larger --epochs or --max-steps to train further"], lines
    assert _snapshot(out) == before


def test_a_finished_run_continues_with_more_steps_as_if_never_stopped(first_run, tmp_path):
    """A finished 2-step run resumed with --max-steps 4 ends bit-identical to a 4-step run (constant
    learning rate), reporting start_step 2. Fails if a finished run's --max-steps must match
    (planted: `and _finished(meta)` replaced by `and False` in state.restore: exit 2)."""
    import json
    import shutil

    tmp, first = first_run
    out, straight = tmp_path / "run", tmp_path / "straight"
    shutil.copytree(first, out)
    assert _train(tmp, out, "--resume", "--max-steps", "4") == 0
    assert _train(tmp, straight, "--max-steps", "4") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["start_step"], report["steps_run"], report["steps"]) == (2, 2, 4)
    for name in ("weights.safetensors", "metrics.jsonl"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    assert report["splits"] == json.loads((straight / "metrics.json").read_text())["splits"]


def _saved(folder, *, step, epoch, epochs, max_steps, lr=1e-3):
    """A save of a run that stopped at `step`, in `epoch`, having asked for `epochs`/`max_steps`."""
    config = {"epochs": epochs, "max_steps": max_steps, "lr": lr}
    meta = {"config": config, "step": step, "epoch": epoch, "done_in_epoch": 0, "history": [], "best": None}
    store = trainstate.StateStore(folder)
    store.save(step, {"trainable": {"w": np.zeros(3, np.float32)}, "opt_state": {"n": np.int32(0)}}, meta)
    store.close()
    return config


@pytest.mark.parametrize("saved, asked, outcome", [
    (dict(step=4, epoch=1, epochs=1, max_steps=None), dict(epochs=2, max_steps=None), ["epochs"]),
    (dict(step=2, epoch=0, epochs=1, max_steps=2), dict(epochs=1, max_steps=None), ["max_steps"]),
    (dict(step=2, epoch=0, epochs=1, max_steps=2), dict(epochs=3, max_steps=3), ["epochs", "max_steps"]),
    (dict(step=2, epoch=0, epochs=1, max_steps=2), dict(epochs=1, max_steps=1), "ask for no more steps"),
    (dict(step=4, epoch=1, epochs=1, max_steps=None), dict(epochs=1, max_steps=4), "ask for no more steps"),
    (dict(step=2, epoch=0, epochs=2, max_steps=None), dict(epochs=3, max_steps=None), "other settings (epochs)"),
    (dict(step=4, epoch=1, epochs=1, max_steps=None), dict(epochs=2, max_steps=None, lr=1.0), "other settings (epochs, lr)"),
])
def test_only_a_finished_run_may_be_given_more_epochs_or_steps(tmp_path, saved, asked, outcome):
    """A finished run may raise --epochs/--max-steps (the list returned names them); a run
    stopped midway, any other change, or a target already reached is refused. Fails if a target
    already reached is accepted (planted: the no-more-steps test removed from state.restore: the
    loop would take no step and the outputs be rewritten) or an unfinished run's is (planted:
    `_finished` always True)."""
    _saved(tmp_path, **saved)
    settings = {"epochs": asked["epochs"], "max_steps": asked["max_steps"], "lr": asked.get("lr", 1e-3)}
    template = trainstate.LoopState({"w": np.zeros(3, np.float32)}, {"n": np.int32(0)})
    store = trainstate.StateStore(tmp_path)
    try:
        if isinstance(outcome, list):
            state, latest, extended = trainstate.restore(template, store, settings)
            assert extended == outcome and state.step == saved["step"] and latest.name == f"step_{saved['step']:09d}"
        else:
            with pytest.raises(ConfigError) as e:
                trainstate.restore(template, store, settings)
            assert outcome in str(e.value) and str(tmp_path) in str(e.value), e.value
    finally:
        store.close()
