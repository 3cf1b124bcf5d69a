"""`jaxcls train --out` never deletes or mixes another run's files: a used folder is refused unless
--resume or --overwrite, --overwrite removes only jaxcls's own files, and saves are pruned by the
order they were written, not by step number."""


import numpy as np
import pytest

import jaxcls.data
from conftest import TOKENIZER_DIR, requires_shared, write_sms_csv
from jaxcls.cli import main
from jaxcls.errors import ConfigError
from jaxcls.train import state as trainstate

pytestmark = requires_shared


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
    prepare_run_folder) or deletes unknown ones (planted: shutil.rmtree(out) before the loop)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(first_run[1], out)
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    seen = {}

    def look(*a, **k):
        seen["files"] = sorted(p.name for p in out.iterdir())
        raise _Stop

    with monkeypatch.context() as m:
        m.setattr(jaxcls.data, "load_spec", look)
        with pytest.raises(_Stop):
            _train(tmp_path, out, "--overwrite")
    assert seen["files"] == ["extra", "notes.txt"], seen
    assert _train(tmp_path, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "state").glob("step-*")) == ["step-000000001", "step-000000002"]
    assert trainstate.latest_state(out / "state").name == "step-000000002"


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


def test_saves_are_pruned_by_write_order_not_step_number(tmp_path):
    """A folder already holding saves with higher step numbers: each new save stays and LATEST
    names it. Fails if pruning sorts by step number (planted: `sorted(folder.glob("step-*"))[:-KEEP]`)."""
    tree = {"w": np.zeros(3, np.float32)}
    for step in (50, 60):
        trainstate.save_state(tmp_path, step, tree, {})
    for step in (1, 2, 3):
        trainstate.save_state(tmp_path, step, {"w": np.full(3, step, np.float32)}, {})
        latest = trainstate.latest_state(tmp_path)
        assert latest.name == f"step-{step:09d}"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000002", "step-000000003"]
    loaded, meta = trainstate.load_state(trainstate.latest_state(tmp_path), tree)
    assert meta["step"] == 3 and np.array_equal(loaded["w"], np.full(3, 3, np.float32))
