"""Attention's two batched products on MKL, for models on cpu_gemm's path (bfloat16 matmul operands,
float32 activations): every (row, head) product of a layer in one call of MKL's float32
`cblas_sgemm_batch`, reading q, k and v in place inside c_attn's output. At gpt2-small's shapes XLA:CPU
ran these products at 42-47 GFLOP/s, MKL's batch GEMM at 182-185 (benchmarks/cpu_kernels.py, Intel
Xeon with AMX-BF16; inside the model XLA also copied the heads around each product).
Written by hand for the reason cpu_gemm is: jaxlib exposes no such kernel, and a ctypes FFI handler
needs no compiler at install time."""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls.cpu_gemm import NO_TRANS, ROW_MAJOR, TARGET, TRANS, fast_path_available, ffi_call, ffi_target, mkl_library


@functools.cache
def _sgemm_batch():
    """MKL's grouped float32 batch GEMM (one group: every (row, head) product of attention)."""
    fn = mkl_library().cblas_sgemm_batch
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int, ctypes.c_void_p]
    fn.restype = None
    return fn


class _HeadPlan:
    """One grouped batch GEMM over every (row, head) pair of attention, read in place: byte offsets
    of each pair's A, B and C, and the group's parameters as the C arrays cblas_sgemm_batch takes.
    Heads come as part `part` of (B, T, S, H, D), e.g. q, k and v inside c_attn's output (S = 3);
    results are dense. Products, with H heads of D:
      scores    q (B,Tq,Sq,H,D), k (B,Tk,Sk,H,D) -> q_h k_h^T (B,H,Tq,Tk)
      context   p (B,H,Tq,Tk),   v (B,Tk,Sv,H,D) -> p_h v_h   (B,Tq,H,D)
      context_t p (B,H,Tq,Tk),   g (B,Tq,Sg,H,D) -> p_h^T g_h (B,Tk,H,D)"""

    def __init__(self, kind: str, x_dims: tuple, y_dims: tuple, parts: tuple):
        _, rows_y, S_y, H, D = y_dims
        if kind == "scores":
            B, Tq, S_x = x_dims[:3]
            Tk = rows_y
        else:
            B, _, Tq, Tk = x_dims
        b, h = np.divmod(np.arange(B * H, dtype=np.int64), H)
        pair = (b * H + h) * Tq * Tk  # (B, H, Tq, Tk)

        def heads(rows, S, part):  # head h of row b in (B, rows, S, H, D)
            return ((b * rows * S + part) * H + h) * D

        y_off, ldb = heads(rows_y, S_y, parts[1]), S_y * H * D
        if kind == "scores":
            m, n, k, ta, tb, lda, ldc = Tq, Tk, D, NO_TRANS, TRANS, S_x * H * D, Tk
            offsets = (heads(Tq, S_x, parts[0]), y_off, pair)
        elif kind == "context":
            m, n, k, ta, tb, lda, ldc = Tq, D, Tk, NO_TRANS, NO_TRANS, Tk, H * D
            offsets = (pair, y_off, heads(Tq, 1, 0))
        else:
            m, n, k, ta, tb, lda, ldc = Tk, D, Tq, TRANS, NO_TRANS, Tk, H * D
            offsets = (pair, y_off, heads(Tk, 1, 0))
        self.offsets = [o * 4 for o in offsets]  # float32
        ints = lambda *v: (ctypes.c_int * len(v))(*v)  # noqa: E731
        self.params = [ints(ta), ints(tb), ints(m), ints(n), ints(k), (ctypes.c_float * 1)(1.0), ints(lda),
                       ints(ldb), (ctypes.c_float * 1)(0.0), ints(ldc)]
        self.size = ints(B * H)


@functools.lru_cache(maxsize=256)
def _head_plan(kind: str, x_dims: tuple, y_dims: tuple, parts: tuple) -> _HeadPlan:
    return _HeadPlan(kind, x_dims, y_dims, parts)


def _head_target(kind: str) -> None:
    @ffi_target(f"{TARGET}_{kind}", f"jaxcls MKL attention {kind}")
    def product(args, rets):
        x, y, c = args[0].contents, args[1].contents, rets[0].contents
        parts = tuple((ctypes.c_int32 * 2).from_address(args[2].contents.data))
        plan = _head_plan(kind, tuple(x.dims[:x.rank]), tuple(y.dims[:y.rank]), parts)
        ptrs = [off + base for off, base in zip(plan.offsets, (x.data, y.data, c.data))]
        p = [ctypes.addressof(v) for v in plan.params]
        _sgemm_batch()(ROW_MAJOR, *p[:6], ptrs[0].ctypes.data, p[6], ptrs[1].ctypes.data, p[7], p[8],
                       ptrs[2].ctypes.data, p[9], 1, ctypes.addressof(plan.size))


for _kind in ("scores", "context", "context_t"):
    _head_target(_kind)


def _heads(kind: str, x, y, parts: tuple, shape):
    return ffi_call(f"{TARGET}_{kind}", shape, x, y, jnp.asarray(parts, jnp.int32))


def _place(d, shape, part: int):
    """A dense (B, T, H, D) cotangent as part `part` of (B, T, S, H, D), zeros elsewhere."""
    return d[:, :, None] if shape[2] == 1 else jnp.zeros(shape, d.dtype).at[:, :, part].set(d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def head_scores(q, k, q_part: int = 0, k_part: int = 0):
    """Part `q_part` of q (B, Tq, Sq, H, D) times part `k_part` of k (B, Tk, Sk, H, D), transposed,
    per row and head: float32 (B, H, Tq, Tk), on MKL."""
    return _heads("scores", q, k, (q_part, k_part), (q.shape[0], q.shape[3], q.shape[1], k.shape[1]))


def _scores_bwd(q_part, k_part, res, g):
    q, k = res
    B, Tq, _, H, D = q.shape
    dq = _heads("context", g, k, (0, k_part), (B, Tq, H, D))
    dk = _heads("context_t", g, q, (0, q_part), (B, k.shape[1], H, D))
    return _place(dq, q.shape, q_part), _place(dk, k.shape, k_part)


head_scores.defvjp(lambda q, k, qp, kp: (head_scores(q, k, qp, kp), (q, k)), _scores_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_context(p, v, v_part: int = 0):
    """p (B, H, Tq, Tk) times part `v_part` of v (B, Tk, Sv, H, D) per row and head: float32
    (B, Tq, H, D), on MKL."""
    B, H, Tq, _ = p.shape
    return _heads("context", p, v, (0, v_part), (B, Tq, H, v.shape[4]))


def _context_bwd(v_part, res, g):
    p, v = res
    B, Tk, _, H, D = v.shape
    dp = _heads("scores", g[:, :, None], v, (0, v_part), p.shape)
    return dp, _place(_heads("context_t", p, g[:, :, None], (0, 0), (B, Tk, H, D)), v.shape, v_part)


head_context.defvjp(lambda p, v, vp: (head_context(p, v, vp), (p, v)), _context_bwd)


def attention_on_mkl(dtype) -> bool:
    """Attention's two batched products go to MKL's float32 batch GEMM when a model computing in
    `dtype` runs on MKL's path (bfloat16 operands, float32 activations), about 4x XLA:CPU's speed
    there (benchmarks/cpu_kernels.py). A float32 model keeps XLA's own attention."""
    return jnp.dtype(dtype) == jnp.bfloat16 and fast_path_available()


