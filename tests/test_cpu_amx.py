"""jaxcls.cpu_amx: the hand-written AMX GEMM, its build at first use, the packed kernels inference
reads, and the MKL path wherever it cannot run. Tests taking the `amx` fixture run the kernel and so need
an AMX CPU and a C compiler; the rest run anywhere."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcls import cpu_amx, cpu_gemm
from jaxcls.config import preset
from jaxcls.infer.predictor import predict_step
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.precision import cast_kernels, inference_state



@pytest.fixture
def amx():
    """Skips where the kernel cannot run; asked at run time, so the build lands in the tests'
    private JAXCLS_HOME (conftest), not the user's cache."""
    if cpu_amx.library() is None or cpu_gemm.load_mkl() is None:
        pytest.skip(f"the AMX kernel does not run here: {cpu_amx.unavailable_reason() or 'MKL is absent'}")


def test_pack_puts_each_weight_where_the_tiles_read_it():
    """Element (p, kb, j, r, n, q) of the packed kernel is w[32 kb + 2 r + q, 32 p + 16 j + n]: the
    VNNI pairs of TDPBF16PS's B tile. Fails if the transpose changes (planted: axes (3, 0, 4, 1, 2, 5))."""
    w = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    packed = np.asarray(cpu_amx.pack(jnp.asarray(w)))
    assert packed.shape == (3, 2, 2, 16, 16, 2)
    p, kb, j, r, n, q = np.indices(packed.shape)
    np.testing.assert_array_equal(packed, w[32 * kb + 2 * r + q, 32 * p + 16 * j + n])


def test_columns_are_whole_panels():
    """w[:, a:b] of a packed kernel is its panels a/32..b/32; a slice that cuts a panel is refused."""
    w = jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128)
    packed = cpu_amx.pack(w)
    np.testing.assert_array_equal(np.asarray(cpu_amx.columns(packed, slice(32, 96))),
                                  np.asarray(cpu_amx.pack(w[:, 32:96])))
    np.testing.assert_array_equal(np.asarray(cpu_amx.columns(packed, slice(None))), np.asarray(packed))
    with pytest.raises(ValueError, match="32-column panels"):
        cpu_amx.columns(packed, slice(0, 40))


def test_why_not_names_what_is_missing(monkeypatch):
    """Each reason the kernel cannot run is named: switched off, a CPU without AMX, no compiler."""
    amx = frozenset(cpu_amx.NEEDED_FLAGS)
    monkeypatch.setattr(cpu_amx.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_amx.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("JAXCLS_AMX_KERNEL", "0")
    assert cpu_amx.why_not(amx) == "JAXCLS_AMX_KERNEL=0"
    monkeypatch.delenv("JAXCLS_AMX_KERNEL")
    assert "amx_tile, amx_bf16" in cpu_amx.why_not(frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert "no C compiler (no-such-compiler-here)" in cpu_amx.why_not(amx)
    monkeypatch.setattr(cpu_amx.platform, "machine", lambda: "aarch64")
    assert "x86-64" in cpu_amx.why_not(amx)


def test_dtype_auto_says_whether_inference_runs_on_the_kernel(monkeypatch):
    """`--dtype auto`'s why names the kernel where it would run, and the reason where it would not
    (docs/predict.md). Fails if the reason is dropped (planted: `where` always the first text)."""
    monkeypatch.setattr(cpu_amx.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_amx.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_amx, "compiler", lambda: "/usr/bin/cc")
    monkeypatch.delenv("JAXCLS_AMX_KERNEL", raising=False)
    used, why = cpu_gemm.decide_dtype("auto", "cpu", frozenset(cpu_amx.NEEDED_FLAGS), mkl=True)
    assert used == "bfloat16" and "inference's on jaxcls's AMX kernel" in why
    used, why = cpu_gemm.decide_dtype("auto", "cpu", frozenset({"avx512f", "avx512_bf16"}), mkl=True)
    assert used == "bfloat16" and "AMX kernel unused: the CPU lacks amx_tile, amx_bf16" in why


def _fake_compiler(tmp_path, body: str) -> str:
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\n" + body)
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    return str(cc)


def test_build_writes_whole_and_is_reused(tmp_path, monkeypatch):
    """The kernel is compiled once per source, flags and compiler into a name that hashes them,
    appears only whole (a failed build leaves nothing, and says the compiler's last line), and a
    second build reuses the file. Fails if a failed build leaves its output (planted: compiling
    straight into `path`) or if an existing file is rebuilt (planted: no `path.exists()` check)."""
    calls = tmp_path / "calls"
    # the fake compiler writes its output (the argument after -o), counting its runs
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, f'echo run >> {calls}\nwhile [ "$1" != -o ]; do shift; done\n'
                                                      'echo built > "$2"\n'))
    path = cpu_amx.library_path(tmp_path / "kernels")
    assert path.parent == tmp_path / "kernels" and path.name.startswith("amx-gemm-")
    assert cpu_amx.build(path) == path and path.read_text() == "built\n"
    cpu_amx.build(path)
    assert calls.read_text().count("run") == 1
    assert os.listdir(path.parent) == [path.name]  # no source or temporary file left

    monkeypatch.setenv("CC", _fake_compiler(tmp_path, 'while [ "$1" != -o ]; do shift; done\necho partial > "$2"\n'
                                                      'echo "error: no AMX here" >&2\nexit 1\n'))
    other = cpu_amx.library_path(tmp_path / "other")
    assert other != path  # another compiler, another file
    with pytest.raises(OSError, match="building the AMX kernel failed: error: no AMX here"):
        cpu_amx.build(other)
    assert list(other.parent.iterdir()) == []


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("m", [1, 5, 37, 96])
def test_kernel_matches_a_float64_product(amx, m):
    """x @ w (float32 out) and gelu(x @ w + b) (bfloat16 out) against float64 on the same bfloat16
    operands, for row counts that are and are not multiples of 32, K over the ~1 MiB block size.
    Fails if the last rows are lost (planted: `row < M - 1` in the copy to tile order; the final
    `while (pdone < prows)` flush removed) or the GELU is off (planted: 0.044715 -> 0.04)."""
    rng = np.random.default_rng(m)
    k, n = 96 if m < 96 else 9216, 64
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    want = _reference(x, w)
    got = np.asarray(jax.jit(cpu_gemm.matmul)(x, cpu_amx.pack(w)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    z = want + np.asarray(b, np.float64)
    gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    fused = jax.jit(cpu_gemm.matmul_gelu)(x, cpu_amx.pack(w), b)
    assert fused.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(fused, np.float64), gelu, rtol=2 ** -8, atol=1e-6)


def _packed(state) -> list[str]:
    return [path_str(p) for p, v in nnx.to_flat_state(state) if cpu_amx.is_packed(v.get_value())]


def test_inference_reads_packed_kernels_and_matches_mkl(amx):
    """The predictor's state holds every block kernel packed (the head and the float32 model's
    weights are left alone), its lowered program calls the AMX kernel, and its logits match the
    MKL path's on the same model. Fails if inference stops packing (planted: `pack=False` in
    inference_state) or the fused MLP drops its bias (planted: `0 * self.bias[cols]` in Linear's fused
    call; the biases are set non-zero, as a fresh model's zeros would hide that)."""
    cfg = preset("mini").replace(dtype="bfloat16")
    model = GPT2Classifier(cfg, 3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "bias":
            var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape) * 0.5, jnp.float32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (3, 40)), jnp.int32)
    lengths = jnp.asarray([40, 33, 7], jnp.int32)
    graphdef, state = inference_state(model)
    assert len(_packed(state)) == 4 * cfg.n_layer and not any(p.startswith("head") for p in _packed(state))
    program = predict_step.lower(graphdef, state, ids, lengths).as_text()
    assert program.count(cpu_gemm.AMX_TARGET) + program.count(cpu_gemm.AMX_GELU_TARGET) >= 4 * cfg.n_layer
    amx = np.asarray(predict_step(graphdef, state, ids, lengths))
    _, full = nnx.split(model)
    mkl = np.asarray(predict_step(graphdef, cast_kernels(full, cfg), ids, lengths))
    assert not _packed(cast_kernels(full, cfg))  # training's operands stay [K, N]
    assert np.linalg.norm(amx - mkl) <= 2e-2 * np.linalg.norm(mkl)
    assert not _packed(inference_state(GPT2Classifier(cfg.replace(dtype="float32"), 3, rngs=nnx.Rngs(0)))[1])


def test_without_the_kernel_inference_keeps_the_mkl_path(monkeypatch):
    """Where the kernel cannot run (no AMX, no compiler, switched off), inference's state holds
    the same [K, N] kernels as before it existed, so the programs are MKL's or XLA's own. Fails if
    packing ignores the kernel's absence (planted: `fits` without `library() is not None`)."""
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(cpu_amx, "library", lambda: None)
    cfg = preset("mini").replace(dtype="bfloat16")
    _, state = inference_state(GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)))
    assert not _packed(state)
    kernel = state["h"][0]["mlp"]["c_fc"]["kernel"].get_value()
    assert kernel.shape == (cfg.n_embd, 4 * cfg.n_embd)


def test_amx_kernel_benchmark_records_both_gemms(amx, tmp_path):
    """`python -m benchmarks.amx_kernel`, one small round: it checks the kernel's products against
    NumPy, then records MKL's and the kernel's GFLOP/s over the 48 GEMMs with the CPU named. Never
    asserts a speed. Fails if a kind goes unmeasured (planted: KINDS without "jaxcls-gelu-fused")."""
    import json

    from benchmarks import amx_kernel

    results = tmp_path / "r.jsonl"
    amx_kernel.main(["--rows", "32", "--rounds", "1", "--repeats", "1", "--results", str(results)])
    record = json.loads(results.read_text())
    assert set(record["sequence_gflops"]) == {"32/mkl", "32/jaxcls", "32/jaxcls-gelu-fused"}
    assert all(s["median"] > 0 for s in record["sequence_gflops"].values())
    assert record["system_info"]["cpu_features"]["amx_bf16"]
