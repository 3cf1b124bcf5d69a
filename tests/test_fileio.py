"""jaxcls.fileio: atomic writes get the umask's permissions, recognisable temp names, and the temp
files of killed runs are cleaned up by the next write to the same folder."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcls.fileio import atomic_open, atomic_write_bytes, atomic_write_json, host_tag

JAXCLS_DIR = Path(__file__).resolve().parents[1] / "jaxcls"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, expected):
    """Fails if the mkstemp file keeps its 0600 (planted: drop the os.fchmod in atomic_open) or if
    the umask is ignored (planted: os.fchmod(..., 0o644))."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "model.safetensors", b"x")
        atomic_write_json(tmp_path / "sub" / "classifier.json", {"a": 1})
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert _mode(plain) == expected, "the reference: what open() gives under this umask"
    assert _mode(tmp_path / "model.safetensors") == expected
    assert _mode(tmp_path / "sub" / "classifier.json") == expected


def test_temp_name_carries_the_host_and_pid(tmp_path):
    """Fails if the temp name does not hold the host and pid (planted: prefix=f".{path.name}.{os.getpid()}."
    in atomic_open), which stale-file cleanup relies on."""
    target = tmp_path / "metrics.json"
    with atomic_open(target) as f:
        f.write(b"{}")
        temps = [p.name for p in tmp_path.iterdir()]
    assert len(temps) == 1
    assert re.fullmatch(rf"\.metrics\.json\.{host_tag()}-{os.getpid()}\.[a-z0-9_]{{8}}\.tmp", temps[0]), temps
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    """A writer killed with SIGKILL mid-write leaves its temp file; the next atomic write to the
    folder removes it. Fails without the cleanup (planted: drop remove_stale_temps(path.parent)
    in atomic_open)."""
    script = (
        "import os, signal, sys, types\n"
        f"pkg = types.ModuleType('jaxcls'); pkg.__path__ = [{str(JAXCLS_DIR)!r}]\n"
        "sys.modules['jaxcls'] = pkg  # fileio alone, without importing jax\n"
        "from jaxcls.fileio import atomic_open\n"
        "with atomic_open(sys.argv[1]) as f:\n"
        "    f.write(b'half'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.safetensors")])
    assert run.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.safetensors.") and left[0].endswith(".tmp")
    atomic_write_bytes(tmp_path / "other.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_cleanup_spares_live_writers_and_other_files(tmp_path):
    """Only pattern-matching temps of this host's dead pids go: a live writer's, our own, another
    host's (its pid means nothing here) and anything else stay. Fails if liveness is not checked
    (planted: _alive returns False), if the host is not (planted: `dead_here` without
    `host == host_tag()`), or if the pattern is loose (planted: `\\.tmp` dropped from _TMP_NAME)."""
    dead, host = _dead_pid(), host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".model.safetensors.{host}-{dead}.abcd_123.tmp"
        busy = tmp_path / f".model.safetensors.{host}-{live.pid}.efgh4567.tmp"
        own = tmp_path / f".metrics.json.{host}-{os.getpid()}.ijkl8901.tmp"
        others = [tmp_path / n for n in (f"notes.{host}-{dead}.abcdefgh.tmp", ".swap.tmp",
                                         f".x.{host}-{dead}.tmp", f".x.{host}-{dead}.abcdefgh.tmp.bak",
                                         f".x.other_host-{dead}.abcdefgh.tmp",  # another host's, on a shared disk
                                         f".x.{dead}.abcdefgh.tmp")]  # before hosts were named: its host unknown
        for p in [stale, busy, own, *others]:
            p.write_bytes(b"")
        atomic_write_bytes(tmp_path / "LATEST", b"{}")
        names = {p.name for p in tmp_path.iterdir()}
    finally:
        live.kill()
        live.wait()
    assert stale.name not in names
    assert {busy.name, own.name, "LATEST", *(p.name for p in others)} == names
