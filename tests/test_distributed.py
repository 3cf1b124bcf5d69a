"""Data parallelism and FSDP equal the single-device step: on 4 forced host devices in one process,
and across two processes on 127.0.0.1 joined by jaxcls.distributed.initialize (gloo collectives).

The three interpreters (4 devices; process 0; process 1) start together in one fixture and the
single-device reference runs here meanwhile: compiles dominate, so this keeps the file short."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _dp_check as check

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 90
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    script = str(HERE / "_dp_check.py")
    addr = f"127.0.0.1:{_free_port()}"
    procs = {
        "local": subprocess.Popen(
            [sys.executable, script, "local", str(tmp / "local.json")],
            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        **{f"p{i}": subprocess.Popen(
            [sys.executable, script, "proc", str(tmp / f"p{i}.npz"), addr, "2", str(i)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)},
    }
    try:
        ref_losses, ref_params, ref_eval = check.run_single()
        deadline = time.monotonic() + TIMEOUT_S
        logs = {}
        for name, p in procs.items():
            try:
                logs[name], _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                p.kill()
                logs[name] = p.communicate()[0]
                pytest.fail(f"{name} ran past {TIMEOUT_S}s:\n{logs[name][-3000:]}")
            assert p.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return tmp, (ref_losses, ref_params, ref_eval)


def _params(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_close(params, ref):
    assert params.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=0, atol=TOL, err_msg=k)


def test_four_devices_data_parallel_and_fsdp_equal_one_device(runs):
    tmp, (ref_losses, ref_params, ref_eval) = runs
    out = json.loads((tmp / "local.json").read_text())
    assert out["devices"] == 4 and out["slice"] == [0, check.ROWS]
    for mode in ("dp", "fsdp"):
        np.testing.assert_allclose(out[mode]["losses"], ref_losses, rtol=0, atol=TOL)
        _assert_close(_params(tmp / f"local.{mode}.npz"), ref_params)
    # data parallel: everything stays whole on every device
    assert set(out["dp"]["specs"].values()) == {"P()"} and out["dp"]["opt_specs"] == ["P()"]
    # FSDP: big leaves split along their largest divisible axis, small ones replicated, and
    # Adam's moments split like their parameters
    specs = out["fsdp"]["specs"]
    assert specs["wte/embedding"] == "P('data', None)"
    assert specs["h/0/mlp/c_fc/kernel"] == "P(None, 'data')"
    assert specs["h/0/ln_1/scale"] == "P()" and specs["head/bias"] == "P()"
    assert {"P('data', None)", "P(None, 'data')", "P()"} <= set(out["fsdp"]["opt_specs"])
    for mode in ("dp", "fsdp"):  # fit.py's evaluation call, unchanged, on placed parameters
        np.testing.assert_allclose(out[mode]["eval"][:2], ref_eval[:2], rtol=1e-5)
        np.testing.assert_allclose(out[mode]["eval"][2], ref_eval[2], atol=TOL)


def test_two_processes_each_feeding_half_equal_one_process(runs):
    tmp, (ref_losses, ref_params, ref_eval) = runs
    outs = [json.loads((tmp / f"p{i}.json").read_text()) for i in range(2)]
    for i, out in enumerate(outs):
        assert (out["process_count"], out["devices"], out["local_devices"]) == (2, 2, 1)
        half = check.ROWS // 2
        assert out["slice"] == [i * half, (i + 1) * half]  # each process feeds its own half
        for mode in ("dp", "fsdp"):
            np.testing.assert_allclose(out[mode]["losses"], ref_losses, rtol=0, atol=TOL)
        assert set(out["fsdp"]["specs"].values()) > {"P()"}
        for mode in ("dp", "fsdp"):
            np.testing.assert_allclose(out[mode]["eval"][2], ref_eval[2], atol=TOL)
    for mode in ("dp", "fsdp"):
        p0, p1 = (_params(tmp / f"p{i}.{mode}.npz") for i in range(2))
        for k in p0:  # the two processes hold bit-identical parameters
            np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        _assert_close(p0, ref_params)


def test_fsdp_spec_and_process_slice_rules():
    import jax

    from jaxcls import distributed as dist
    from jaxcls.errors import ConfigError

    P = jax.sharding.PartitionSpec
    assert dist.fsdp_spec((50257, 768), 4, 1) == P(None, "data")  # 50257 is not divisible
    assert dist.fsdp_spec((768, 3072), 4, 1) == P(None, "data")
    assert dist.fsdp_spec((1024, 768), 4, 1) == P("data", None)
    assert dist.fsdp_spec((768,), 4) == P()  # under min_size
    assert dist.fsdp_spec((6, 7), 4, 1) == P()  # nothing divisible
    assert dist.fsdp_spec((1024, 768), 1, 1) == P()
    mesh = dist.data_mesh()
    n = mesh.shape["data"]
    assert dist.process_slice(2 * n, mesh) == slice(0, 2 * n)  # one process feeds everything
    four = type("Mesh4", (), {"shape": {"data": 4}})()  # check_batch_rows reads only the axis size
    dist.check_batch_rows(8, four)
    with pytest.raises(ConfigError, match="multiple of the 4 devices"):
        dist.check_batch_rows(6, four)
    with pytest.raises(ConfigError, match="together"):
        dist.initialize("127.0.0.1:1", None, 0)
