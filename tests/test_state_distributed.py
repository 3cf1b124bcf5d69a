"""Train state across processes: two CPU processes joined by jax.distributed on 127.0.0.1, one
device each, save an FSDP-split tree with StateStore and restore it at the same shardings and
as whole copies. Each
process writes its own shards (orbax's `ocdbt.process_N` folders) and nothing is gathered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import _env, _free_port

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 120


@pytest.mark.slow  # two interpreters importing JAX and orbax: about 20 s on two busy cores
def test_two_processes_save_their_own_shards_and_restore_equal_state(tmp_path):
    """Fails if the state is gathered before saving (planted: StateStore.save saving
    `process_allgather` numpy copies: no ocdbt.process_1) or restored elsewhere than the
    targets' shardings (planted: the sharding left out of StateStore's abstract targets: orbax
    restores the saved FSDP split, not the whole copies asked for)."""
    addr, folder = f"127.0.0.1:{_free_port()}", tmp_path / "state"
    procs = [subprocess.Popen([sys.executable, str(HERE / "_state_check.py"), addr, "2", str(i), str(folder),
                               str(tmp_path / f"p{i}.json")], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    for r in reports:
        assert r["process_count"] == 2 and all(r["same"]) and len(r["same"]) >= 6, r
        assert r["replicated"] == [True] * len(r["same"]), r  # restored whole where the targets were whole
        assert r["wte_spec"] == ["data", "None"] and r["wte_local_rows"] == [32], r
        assert not r["fully_addressable"], r
        assert r["meta"] == {"step": 3, "process": 0}, r  # the JSON item is written once, by process 0
    step = folder / "step_000000003"
    for item in ("trainable", "opt_state"):
        written = sorted(p.name for p in (step / item).glob("ocdbt.process_*"))
        assert written == ["ocdbt.process_0", "ocdbt.process_1"], (item, written)
        for name in written:
            assert any(f.is_file() for f in (step / item / name).rglob("*")), (item, name)
