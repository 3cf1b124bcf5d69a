"""Data parallelism and FSDP through `jaxcls.train.fit` and `jaxcls train` equal the single-device
run: on forced host devices in one process, and across two processes on 127.0.0.1 joined by
jaxcls.train.distributed.initialize (gloo collectives).

The five interpreters (fit with FSDP on 4 devices; fit in process 0 and 1; the CLI with
--data-parallel on 4 devices and with --fsdp on 2) start together in one fixture and the single-device reference runs here
meanwhile: compiles dominate, so this keeps the file short.

Tolerances. Every run takes 3 AdamW steps at lr 1e-3, which move each parameter by up to 3e-3.
Losses agree within 1e-5 (observed under 1e-6). Parameters agree within 1e-4: Adam divides each
coordinate's gradient by its own running size, so where a gradient nearly cancels (a rare token's
wte row) the summation order's rounding becomes a visible part of the step (observed 1.4e-5).
The attention key bias is not compared: its gradient is exactly zero in exact arithmetic, so its
change is that rounding alone, scaled by Adam to the size of a real step (observed 3.5e-4 in the
single-device run, 4.6e-4 between runs). It cannot reach a logit, which the matching losses of
models whose key biases differ show."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import _dp_check as check
from conftest import FIXTURE

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600  # a hang guard: five interpreters share the machine's cores
LOSS_TOL = 1e-5
PARAM_TOL = 1e-4
CLI_DEVICES = {"data_parallel": 4, "fsdp": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices=None):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cli(data, out, flag):
    return [sys.executable, "-m", "jaxcls", "train", "--checkpoint", str(FIXTURE / "openai"), "--data", str(data),
            *check.cli_flags(), flag, "--out", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    data = check.write_csv(tmp / "sms.csv")
    script = str(HERE / "_dp_check.py")
    addr = f"127.0.0.1:{_free_port()}"
    spawn = lambda cmd, env: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,  # noqa: E731
                                              stderr=subprocess.STDOUT, text=True)
    procs = {
        "local": spawn([sys.executable, script, "local", str(data), str(tmp / "local.json")], _env(4)),
        **{f"p{i}": spawn([sys.executable, script, "proc", str(data), str(tmp / f"p{i}.json"), addr, "2", str(i)],
                          _env()) for i in range(2)},
        **{f"cli_{m}": spawn(_cli(data, tmp / f"cli_{m}", f"--{m.replace('_', '-')}"), _env(CLI_DEVICES[m]))
           for m in CLI_DEVICES},
    }
    try:
        ref = check.run_fit(data)
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
    return tmp, ref, logs


def test_data_parallel_over_the_frozen_prefix_cache_trains_as_one_device(tmp_path):
    """docs/scaling.md: with data parallelism the cached states stay in host memory and each
    step's batch is sharded over the mesh; `--cache-memory device` says in the log that it
    applies to one device and keeps the host. Two forced host devices, `last_block` with the
    cache (the default multi-GPU path): losses and trained parameters are the single-device cached
    run's. Fails if the mesh path loses the cache or places it on a device (planted: `_place`
    ignoring multi_device: the states go to one device of the mesh)."""
    data = check.write_csv(tmp_path / "sms.csv")
    p = subprocess.run([sys.executable, str(HERE / "_dp_check.py"), "cached", str(data), str(tmp_path / "c.json")],
                       env=_env(2), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads((tmp_path / "c.json").read_text())
    ref, ref_params = check.run_cached(data)
    assert ref["cached_prefix"] and ref["devices"] == 1
    for mode in ("dp_cached", "dp_cached_device"):
        info = got[mode]
        assert info["devices"] == 2 and info["cached_prefix"] and info["cache_memory"] == "host", (mode, info)
        _assert_same_losses(info, ref)
        params = _params(tmp_path / f"c.{mode}.npz")
        assert params.keys() == ref_params.keys()
        for k in ref_params:
            got_k, want = params[k], ref_params[k]
            if k.endswith("attn/c_attn/bias"):  # the key bias: no gradient, Adam's noise (see above)
                keys = np.s_[want.shape[0] // 3: 2 * want.shape[0] // 3]
                got_k, want = np.delete(got_k, keys), np.delete(want, keys)
            np.testing.assert_allclose(got_k, want, rtol=0, atol=PARAM_TOL, err_msg=k)
    assert any("--cache-memory device keeps the cache on one device" in line
               for line in got["dp_cached_device"]["cache_log"]), got["dp_cached_device"]["cache_log"]


def _params(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_trained_alike(params, ref, init):
    """Every parameter but the key bias within PARAM_TOL of the reference, whose own steps are
    far larger than that."""
    assert params.keys() == ref.keys()
    for k in ref:
        got, want, start = params[k], ref[k], init[k]
        if k.endswith("attn/c_attn/bias"):
            keys = np.s_[want.shape[0] // 3: 2 * want.shape[0] // 3]
            got, want, start = (np.delete(x, keys) for x in (got, want, start))
        assert np.abs(want - start).max() > 10 * PARAM_TOL, k
        np.testing.assert_allclose(got, want, rtol=0, atol=PARAM_TOL, err_msg=k)


def _assert_same_losses(info, ref_info):
    assert info["steps_run"] == check.STEPS
    for k in ("train_loss", "val_loss"):  # evaluated after every step, on the placed parameters
        np.testing.assert_allclose(info[k], ref_info[k], rtol=0, atol=LOSS_TOL, err_msg=k)
    for name, r in ref_info["splits"].items():  # the final evaluation
        assert info["splits"][name]["confusion"] == r["confusion"], name
        np.testing.assert_allclose(info["splits"][name]["loss"], r["loss"], rtol=0, atol=LOSS_TOL, err_msg=name)


def _assert_placement(info, n, fsdp):
    """After every step, wte and its two Adam moments sit on the n-device mesh: whole on every
    device, or with FSDP split along their 16 columns."""
    assert [s["step"] for s in info["steps"]] == list(range(1, check.STEPS + 1))
    spec, piece = ("P(None, 'data')", [check.WTE[0], check.WTE[1] // n]) if fsdp else ("P()", list(check.WTE))
    for s in info["steps"]:
        assert s["wte"] == [[spec, piece]] * 3, s


def test_fit_with_fsdp_on_four_devices_equals_one_device(runs):
    """Fails if fit ignores fsdp in the placement (planted: fsdp=False in _place_on_mesh's shardings call:
    wte stays whole) or altogether (planted: cfg.fsdp dropped from _place_on_mesh's condition)."""
    tmp, (ref_info, ref_params, init), _ = runs
    out = json.loads((tmp / "local.json").read_text())
    assert out["devices"] == 4 and out["slice"] == [0, check.ROWS]
    assert ref_info["devices"] == 1 and ref_info["mesh_log"] == [] and not ref_info["fsdp"]
    info = out["fsdp"]
    assert (info["devices"], info["fsdp"]) == (4, True)
    assert info["mesh_log"] == ["data parallel over 4 devices (1 processes), parameters sharded (FSDP)"]
    _assert_placement(info, 4, True)
    _assert_same_losses(info, ref_info)
    _assert_trained_alike(_params(tmp / "local.fsdp.npz"), ref_params, init)


def test_fit_in_two_processes_each_feeding_half_equals_one_process(runs):
    tmp, (ref_info, ref_params, init), _ = runs
    outs = [json.loads((tmp / f"p{i}.json").read_text()) for i in range(2)]
    for i, out in enumerate(outs):
        assert (out["process_count"], out["devices"], out["local_devices"]) == (2, 2, 1)
        half = check.ROWS // 2
        assert out["slice"] == [i * half, (i + 1) * half]  # each process feeds its own half
        for mode in ("dp", "fsdp"):
            assert (out[mode]["devices"], out[mode]["fsdp"]) == (2, mode == "fsdp")
            assert out[mode]["mesh_log"] == [  # logged before fit quiets the other processes
                "data parallel over 2 devices (2 processes)" + (", parameters sharded (FSDP)" if mode == "fsdp" else "")]
            _assert_placement(out[mode], 2, mode == "fsdp")
            _assert_same_losses(out[mode], ref_info)
    for mode in ("dp", "fsdp"):
        p0, p1 = (_params(tmp / f"p{i}.{mode}.npz") for i in range(2))
        for k in p0:  # the two processes hold bit-identical parameters
            np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        _assert_trained_alike(p0, ref_params, init)


@pytest.mark.parametrize("flag", ["data_parallel", "fsdp"])
def test_cli_trains_on_the_mesh_and_equals_one_device(runs, flag):
    """`jaxcls train --data-parallel` on 4 forced host devices, `--fsdp` on 2: the report and the log
    name the mesh, and the saved weights and split losses are the single-device run's.
    Fails if --data-parallel is ignored (planted: cfg.data_parallel dropped from _place_on_mesh's
    condition: devices 1, no mesh line) or --fsdp is (planted: cfg.fsdp dropped there too)."""
    tmp, (ref_info, ref_params, init), logs = runs
    fsdp = flag == "fsdp"
    report = json.loads((tmp / f"cli_{flag}" / "metrics.json").read_text())
    assert (report["devices"], report["fsdp"], report["steps_run"]) == (CLI_DEVICES[flag], fsdp, check.STEPS)
    line = f"data parallel over {CLI_DEVICES[flag]} devices (1 processes)" + (", parameters sharded (FSDP)" if fsdp else "")
    assert line in logs[f"cli_{flag}"].splitlines()
    weights = load_file(str(tmp / f"cli_{flag}" / "weights.safetensors"))
    _assert_trained_alike(weights, ref_params, init)
    for name, r in ref_info["splits"].items():
        np.testing.assert_allclose(report["splits"][name]["loss"], r["loss"], rtol=0, atol=LOSS_TOL, err_msg=name)


def test_fsdp_spec_and_process_slice_rules():
    import jax

    from jaxcls.train import distributed as dist
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
