"""jaxcls.cpu_gemm: MKL's bfloat16 GEMM behind an XLA FFI call with a custom_vjp, and the plain XLA
dot whenever that path is unavailable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcls import cpu_attention, cpu_gemm
from jaxcls.config import preset
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.precision import cast_kernels

needs_mkl = pytest.mark.skipif(cpu_gemm.load_mkl() is None, reason="MKL (pip install 'jaxcls[amx]') is absent")


def _operands(m=7, k=24, n=40, lead=(3,)):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (*lead, m, k), jnp.bfloat16)
    return x, jax.random.normal(kw, (k, n), jnp.bfloat16)


def _ffi_calls(fn, *args) -> int:
    """How many MKL custom calls the lowered program holds."""
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text().count(f'@{cpu_gemm.TARGET}_')


def test_fallback_is_xla_when_mkl_is_absent(monkeypatch):
    """Fails if the MKL call is emitted without MKL (planted: fast_path_available ignores load_mkl)."""
    monkeypatch.setattr(cpu_gemm, "load_mkl", lambda: None)
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    x, w = _operands()
    assert not cpu_gemm.fast_path_available()
    assert _ffi_calls(cpu_gemm.matmul, x, w) == 0
    np.testing.assert_array_equal(np.asarray(cpu_gemm.matmul(x, w), np.float32), np.asarray(x @ w, np.float32))


def test_missing_library_loads_as_none(monkeypatch):
    """Fails if an unloadable libmkl_rt is not caught (planted: `except OSError` removed in load_mkl)."""
    monkeypatch.setattr(cpu_gemm, "_mkl_paths", lambda: ["/nonexistent/libmkl_rt.so.3"])
    assert cpu_gemm.load_mkl.__wrapped__() is None


def test_mkl_threads_sleep_between_calls_unless_the_user_says(monkeypatch):
    """MKL's OpenMP threads must not spin between GEMMs on the cores XLA needs: KMP_BLOCKTIME is 0
    before MKL loads, and a value the user set is kept. Fails without the setdefault (planted)."""
    monkeypatch.setattr(cpu_gemm, "_mkl_paths", lambda: ["/nonexistent/libmkl_rt.so.3"])
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    cpu_gemm.load_mkl.__wrapped__()
    assert cpu_gemm.os.environ["KMP_BLOCKTIME"] == "0"
    monkeypatch.setenv("KMP_BLOCKTIME", "50")
    cpu_gemm.load_mkl.__wrapped__()
    assert cpu_gemm.os.environ["KMP_BLOCKTIME"] == "50"


def test_float32_and_switched_off_take_xla(monkeypatch):
    """Fails if a float32 product or JAXCLS_CPU_GEMM=0 still reaches MKL (planted: the dtype test in
    matmul dropped, or the environment variable ignored)."""
    monkeypatch.setattr(cpu_gemm, "load_mkl", lambda: object())
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    x, w = _operands()
    assert _ffi_calls(cpu_gemm.matmul, x.astype(jnp.float32), w.astype(jnp.float32)) == 0
    assert _ffi_calls(cpu_gemm.matmul, x, w) == 1
    monkeypatch.setenv("JAXCLS_CPU_GEMM", "0")
    assert _ffi_calls(cpu_gemm.matmul, x, w) == 0


def test_a_failure_inside_the_callback_fails_the_computation(monkeypatch):
    """A GEMM that raises must surface as an XLA error naming it, never as a result read from an
    unwritten buffer. Needs no MKL: the GEMM is a stand-in. Fails if the handler lets ctypes swallow
    the exception (planted: the `except` returning None)."""
    def broken(*args):
        raise RuntimeError("stand-in GEMM failed")

    monkeypatch.setattr(cpu_gemm, "load_mkl", lambda: broken)
    x, w = _operands(lead=())
    with pytest.raises(Exception, match="jaxcls MKL GEMM .*stand-in GEMM failed"):
        jax.block_until_ready(jax.jit(lambda a, b: cpu_gemm._gemm(a, b, False, False))(x, w))


def test_a_failure_inside_the_attention_callback_fails_the_computation(monkeypatch):
    """As above for attention's batch GEMM (planted: its `except` returning None)."""
    def broken():
        raise RuntimeError("stand-in batch GEMM failed")

    monkeypatch.setattr(cpu_attention, "_sgemm_batch", broken)
    q = jnp.ones((1, 3, 1, 2, 4), jnp.float32)
    with pytest.raises(Exception, match="jaxcls MKL attention scores.*stand-in batch GEMM failed"):
        jax.block_until_ready(jax.jit(cpu_attention.head_scores)(q, q))


def _close(got, want, rel=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.linalg.norm(got - want) <= rel * np.linalg.norm(want)


def _rounded(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@needs_mkl
def test_mkl_product_and_gradients_match_xla_on_rounded_operands():
    """float32 in, the operands rounded once to bfloat16, float32 accumulation and result, gradients
    in each input's dtype. Fails if the GEMM or a backward product is wrong (planted: the handler
    passes lda=a.dims[0]; and, separately, _bwd's dW as `_gemm(a2, g2, True, False) * 0`), or if
    the product is rounded to bfloat16 again (planted: `.astype(jnp.bfloat16)` on the result)."""
    x, w = (a.astype(jnp.float32) * 1.37 for a in _operands())
    mm = lambda a, b: cpu_gemm.matmul(a, b, "bfloat16")  # noqa: E731

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    assert _ffi_calls(jax.grad(loss(mm), argnums=(0, 1)), x, w) == 3
    got = jax.jit(mm)(x, w)
    assert got.dtype == jnp.float32
    want = jnp.matmul(_rounded(x), _rounded(w), precision="highest")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(mm), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(lambda a, b: jnp.matmul(_rounded(a), _rounded(b), precision="highest")),
                    argnums=(0, 1))(x, w)
    for g, v in zip(grads, want):
        assert g.dtype == jnp.float32
        _close(g, v)
    w16 = w.astype(jnp.bfloat16)  # a kernel cast once (precision.cast_kernels) keeps its own dtype
    assert jax.grad(loss(mm), argnums=1)(x, w16).dtype == jnp.bfloat16


@needs_mkl
@pytest.mark.parametrize("stacked", [False, True])
def test_attention_products_and_gradients_match_einsum(stacked):
    """The batched head products read q, k and v in place, as parts of one (B, T, S, H, D) array
    (c_attn's output, S = 3) or alone (S = 1). Fails if an offset or leading dimension is wrong
    (planted: `heads(Tq, S_x, parts[0])` as `heads(Tq, S_x, 0)`; separately, context_t's `_TRANS`
    as `_NO_TRANS`), or a cotangent lands in the wrong part (planted: `_place(dk, k.shape, q_part)`)."""
    rng = np.random.default_rng(0)
    B, T, H, D = 3, 7, 4, 8
    qkv = jnp.asarray(rng.standard_normal((B, T, 3, H, D)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((B, H, T, T)), jnp.float32)
    ein = lambda spec: lambda a, b: jnp.einsum(spec, a, b, precision="highest")  # noqa: E731
    if stacked:
        scores = lambda x: cpu_attention.head_scores(x, x, 0, 1)  # noqa: E731
        scores_ref = lambda x: ein("bqhd,bkhd->bhqk")(x[:, :, 0], x[:, :, 1])  # noqa: E731
        context = lambda p, x: cpu_attention.head_context(p, x, 2)  # noqa: E731
        context_ref = lambda p, x: ein("bhqk,bkhd->bqhd")(p, x[:, :, 2])  # noqa: E731
        cases = [(scores, scores_ref, (qkv,)), (context, context_ref, (p, qkv))]
    else:
        q, k = qkv[:, :, :1], qkv[:, :, 1:2]
        cases = [(cpu_attention.head_scores, lambda a, b: ein("bqhd,bkhd->bhqk")(a[:, :, 0], b[:, :, 0]), (q, k)),
                 (cpu_attention.head_context, lambda a, b: ein("bhqk,bkhd->bqhd")(a, b[:, :, 0]), (p, k))]
    for fn, ref, args in cases:
        out, vjp = jax.vjp(jax.jit(fn), *args)
        want, vjp_ref = jax.vjp(ref, *args)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
        g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
        for got, exp in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_model_on_mkl_matches_xla(monkeypatch):
    """Fails if model.Linear's product does not reach MKL or differs from XLA's (planted: Linear's
    call site back to `x @ self.kernel[:, cols]...`)."""
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    model = GPT2Classifier(preset("tiny").replace(dtype="bfloat16"), 2, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 9)), jnp.int32)
    lengths = jnp.asarray([9, 5], jnp.int32)

    def loss(m):
        return jnp.sum(m(ids, lengths).astype(jnp.float32) ** 2)

    def run():
        logits = jax.jit(lambda m: m(ids, lengths))(model)
        return logits, nnx.jit(nnx.grad(loss))(model)["h"][0]["mlp"]["c_fc"]["kernel"].get_value()

    (mkl_logits, mkl_grad), calls = run(), _ffi_calls(lambda: model(ids, lengths))
    monkeypatch.setenv("JAXCLS_CPU_GEMM", "0")
    xla_logits, xla_grad = run()
    assert calls > 0 and _ffi_calls(lambda: model(ids, lengths)) == 0
    _close(mkl_logits, xla_logits, rel=5e-2)
    _close(mkl_grad, xla_grad, rel=5e-2)


def _kernel_dtypes(state) -> dict:
    return {path_str(p): v.get_value().dtype for p, v in nnx.to_flat_state(state) if p[-1] == "kernel"}


@needs_mkl
def test_kernels_are_cast_once_for_the_steps_and_the_model_keeps_float32(monkeypatch):
    """On MKL's path the train program's steps and the predictor read the blocks' kernels already in
    bfloat16, with logits bit-identical to casting them in every call, while the fitted model keeps
    its float32 weights, the frozen ones bit-identical. Fails if the cast copy replaces the model's
    weights (planted: `build_program` passing `operands` as Program's `frozen`), or if the kernels
    are cast per call again (planted: `cast_kernels` returning `state` unchanged)."""
    from benchmarks import measure

    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    cfg = preset("tiny").replace(dtype="bfloat16")
    prog, state, split = measure.train_program(cfg, "last_block", 4, 12)
    kinds = _kernel_dtypes(prog.operands)
    assert kinds["h/0/attn/c_attn/kernel"] == jnp.bfloat16 and kinds["h/0/mlp/c_proj/kernel"] == jnp.bfloat16
    assert set(_kernel_dtypes(prog.frozen).values()) == {jnp.dtype(jnp.float32)}
    before = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(prog.frozen)}
    group, idx = prog.plan(split, 0)[0]
    prog.step(state, split, group, idx, jax.random.PRNGKey(0))
    for p, v in nnx.to_flat_state(prog.frozen):
        np.testing.assert_array_equal(np.asarray(v.get_value()), before[path_str(p)])

    model = GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0))
    graphdef, full = nnx.split(model)
    cast = cast_kernels(full, cfg)
    assert _kernel_dtypes(cast)["h/1/mlp/c_fc/kernel"] == jnp.bfloat16
    assert _kernel_dtypes(cast)["head/kernel"] == jnp.float32  # only the blocks' GEMM operands
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 9)), jnp.int32)
    run = jax.jit(lambda st: nnx.merge(graphdef, st)(ids))
    np.testing.assert_array_equal(np.asarray(run(cast)), np.asarray(run(full)))
    assert cast_kernels(full, cfg.replace(dtype="float32")) is full

