"""bfloat16 matmuls on the CPU's matrix units (AMX, AVX512-BF16) through MKL, the XLA FFI plumbing
they share with cpu_attention, and the `--dtype auto` decision that depends on them.

XLA:CPU (jaxlib 0.10) computes a bfloat16 dot no faster than a float32 one, and its bfloat16
elementwise work slower than float32's (GELU 2.3x on an Intel Xeon with AMX: benchmarks/cpu_kernels.py), while MKL's
`cblas_gemm_bf16bf16f32` (the optional `mkl` wheel: `pip install jaxcls[amx]`) runs the dot on the
AMX tiles several times faster. So on this path bfloat16 is the matmuls' operand dtype only:
`matmul(x, w, "bfloat16")` rounds x and w to bfloat16 and MKL returns x @ w accumulated and kept in
float32; everything else stays in float32 (`activation_dtype`), as PyTorch's CPU autocast keeps its
norms and softmax. Each product is an XLA custom call whose target is a ctypes callback reading XLA's
call frame (no compiler at install time: that, and jaxlib exposing no oneDNN path, is why this is
written by hand), with a `custom_vjp` whose backward products use the same calls. Everywhere else
(float32 compute, another backend, no MKL, a CPU without bfloat16 units, JAXCLS_CPU_GEMM=0) it is
XLA's own dot in the requested dtype."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxcls import cpu_amx
from jaxcls.cpu_amx import host_flags

TARGET = "jaxcls_mkl_gemm_bf16"
FAST_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Narrower models lose: each MKL call is a Python callback, and at the `mini` preset's width (128)
# bfloat16 on MKL trained 1.5-2.3x slower than float32 on XLA (docs/benchmarks.md); gpt2-small won.
MIN_MKL_WIDTH = 768  # /proc/cpuinfo names of the units MKL's bf16 GEMM uses
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _mkl_paths() -> list[str]:
    """libmkl_rt from the `mkl` wheel (it lands in the environment's lib/), else the system's."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("mkl")
        found = [str(dist.locate_file(f)) for f in dist.files or () if Path(str(f)).name.startswith("libmkl_rt.so")]
    except (ImportError, PackageNotFoundError):
        found = []
    return found + ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"]


def mkl_library():
    """libmkl_rt as a ctypes library, or None.

    MKL's OpenMP threads spin for 200 ms after each call by default, taking the cores from XLA's
    threads between GEMMs; KMP_BLOCKTIME=0 (unless the user set it) puts them to sleep at once:
    gpt2-small's train step went from 0.60 s to 0.42 s (docs/benchmarks.md)."""
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # read when MKL's OpenMP runtime starts
    for path in _mkl_paths():
        try:
            lib = ctypes.CDLL(path)
            lib.cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        lib.MKL_Set_Interface_Layer(0)  # LP64: 32-bit ints, whatever MKL_INTERFACE_LAYER says
        return lib
    return None


@functools.cache
def load_mkl():
    """MKL's bf16 GEMM as a ctypes function, or None where no libmkl_rt exports it."""
    lib = mkl_library()
    if lib is None:
        return None
    c_int, c_float, c_void_p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    gemm = lib.cblas_gemm_bf16bf16f32
    gemm.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, c_void_p, c_int,
                     c_void_p, c_int, c_float, c_void_p, c_int]
    gemm.restype = None
    return gemm


class _Ext(ctypes.Structure):  # XLA_FFI_Extension_Base (xla/ffi/api/c_api.h, shipped in jaxlib/include)
    pass


_Ext._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.POINTER(_Ext))]
_P = ctypes.c_void_p


class _Version(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _P), ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _Version), ("traits", ctypes.c_uint32),
                ("state_type_id", ctypes.c_int64)]


class _MetadataExt(ctypes.Structure):
    _fields_ = [("base", _Ext), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _P), ("dtype", ctypes.c_int), ("data", _P),
                ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _P), ("size", ctypes.c_int64), ("types", _P),
                ("items", ctypes.POINTER(ctypes.POINTER(_Buffer)))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", ctypes.POINTER(_Ext)), ("api", _P), ("ctx", _P),
                ("stage", ctypes.c_int), ("args", _List), ("rets", _List)]  # attrs and future unused


class _Api(ctypes.Structure):  # the head of XLA_FFI_Api, up to XLA_FFI_Error_Create
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _P), ("api_version", _Version), ("internal", _P),
                ("error_create", _P)]


class _ErrorArgs(ctypes.Structure):  # XLA_FFI_Error_Create_Args
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _P), ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_HANDLER = ctypes.CFUNCTYPE(_P, ctypes.POINTER(_CallFrame))
_ERROR_CREATE = ctypes.CFUNCTYPE(_P, ctypes.POINTER(_ErrorArgs))
_ERRC_INTERNAL = 13
_EXECUTE, _METADATA, _API_VERSION = 3, 1, (0, 3)


def _answer_metadata(frame) -> bool:
    """XLA asks a handler for its FFI version through a metadata extension before using it."""
    ext = frame.ext
    while ext:
        if ext.contents.type == _METADATA:
            md = ctypes.cast(ext, ctypes.POINTER(_MetadataExt)).contents.metadata.contents
            md.api_version.major, md.api_version.minor = _API_VERSION
            md.traits = 0
            return True
        ext = ext.contents.next
    return False


def _error(frame, message: str):
    """An XLA_FFI_Error made by XLA's own API, so a failure in the callback fails the computation
    (a ctypes callback that raises would otherwise return success over an unwritten buffer)."""
    create = _ERROR_CREATE(ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents.error_create)
    args = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, message.encode("utf-8", "replace"), _ERRC_INTERNAL)
    return create(ctypes.byref(args))


def _target(trans_a: bool, trans_b: bool) -> str:
    return f"{TARGET}_{'t' if trans_a else 'n'}{'t' if trans_b else 'n'}"


_HANDLERS: dict[str, object] = {}  # target name -> ctypes handler, kept alive for XLA


def ffi_target(name: str, what: str):
    """Decorator: `body(args, rets)` (the call frame's operand and result buffers) becomes the XLA FFI
    handler `name`, which answers XLA's metadata query and returns any exception to XLA as an error
    naming `what`, never as success over an unwritten buffer."""
    def wrap(body):
        def handle(frame_ptr):
            frame = frame_ptr.contents
            try:
                if _answer_metadata(frame) or frame.stage != _EXECUTE:
                    return None
                body(frame.args.items, frame.rets.items)
                return None
            except Exception as e:  # noqa: BLE001 - any failure must reach XLA as an error
                return _error(frame, f"{what}: {type(e).__name__}: {e}")

        _HANDLERS[name] = _HANDLER(handle)
        return body

    return wrap


@functools.cache
def _register(name: str) -> None:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cast(_HANDLERS[name], _P).value), platform="cpu")


def register_all() -> None:
    """Register every handler defined so far (these GEMMs; cpu_attention's products once it is
    imported): a program loaded from disk without tracing (compile_cache.ProgramStore) calls them
    by name."""
    for name in _HANDLERS:
        _register(name)


def ffi_call(name: str, shape, *operands, dtype=jnp.float32):
    """The registered target `name` on `operands`, one result of `shape` (float32 unless `dtype`)."""
    _register(name)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")
    return call(*operands)


def _gemm_target(trans_a: bool, trans_b: bool) -> str:
    """C = op(A) @ op(B) (A, B bfloat16 2-D; C float32) on MKL."""
    name = _target(trans_a, trans_b)

    @ffi_target(name, f"jaxcls MKL GEMM {name}")
    def gemm(args, rets):
        a, b, c = args[0].contents, args[1].contents, rets[0].contents
        m, n = c.dims[0], c.dims[1]
        k = a.dims[0] if trans_a else a.dims[1]
        load_mkl()(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k,
                   1.0, a.data, a.dims[1], b.data, b.dims[1], 0.0, c.data, n)


for _ta, _tb in ((False, False), (False, True), (True, False)):
    _gemm_target(_ta, _tb)

AMX_TARGET = "jaxcls_amx_gemm_bf16"
AMX_GELU_TARGET = "jaxcls_amx_gemm_bias_gelu_bf16"


def _amx_target(name: str, gelu: bool) -> None:
    @ffi_target(name, f"jaxcls AMX GEMM {name}")
    def gemm(args, rets):
        """A @ B, B in cpu_amx's packed layout [N/32, K/32, 2, 16, 16, 2]; with `gelu`, the third
        operand is the bias and the result gelu(A @ B + bias) in bfloat16."""
        a, p, c = args[0].contents, args[1].contents, rets[0].contents
        bias = args[2].contents.data if gelu else None
        if cpu_amx.library().jaxcls_amx_gemm(a.data, p.data, c.data, bias, int(gelu), a.dims[0],
                                             p.dims[0] * cpu_amx.TILE, p.dims[1] * cpu_amx.TILE):
            raise MemoryError("no memory for the activations' tile-order copy")


_amx_target(AMX_TARGET, False)
_amx_target(AMX_GELU_TARGET, True)


def fast_path_available(flags: frozenset[str] | None = None) -> bool:
    """MKL is importable, the CPU has bfloat16 units, the backend is the CPU, and nobody said no."""
    if os.environ.get("JAXCLS_CPU_GEMM", "1") == "0" or jax.default_backend() != "cpu":
        return False
    flags = host_flags() if flags is None else flags
    return bool(set(FAST_CPU_FLAGS) & flags) and load_mkl() is not None


def _gemm(a, b, trans_a: bool, trans_b: bool):
    """op(a) @ op(b) in float32 from bfloat16 2-D operands, on MKL."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return ffi_call(_target(trans_a, trans_b), (m, n), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mkl_matmul(x, w, x_dtype: str, w_dtype: str):
    """x @ w in float32 from their bfloat16 roundings; the gradients come back in the inputs' own
    dtypes (`x_dtype`, `w_dtype`: names, as residuals must be arrays), unrounded."""
    lead = x.shape[:-1]
    a, b = x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _gemm(a, b, False, False).reshape(*lead, w.shape[1])


def _fwd(x, w, x_dtype, w_dtype):
    return _mkl_matmul(x, w, x_dtype, w_dtype), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _bwd(x_dtype, w_dtype, res, g):
    a, b = res
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]).astype(jnp.bfloat16)
    dx = _gemm(g2, b, False, True).astype(x_dtype).reshape(a.shape)  # dY W^T
    dw = _gemm(a2, g2, True, False).astype(w_dtype)  # X^T dY
    return dx, dw


_mkl_matmul.defvjp(_fwd, _bwd)


def activation_dtype(dtype):
    """The dtype a model computing in `dtype` keeps its activations in. On MKL's path bfloat16 is
    the matmuls' operand dtype only: MKL returns float32, and XLA:CPU's bfloat16 elementwise work
    (GELU, layer norm, softmax) is the slower one (benchmarks/cpu_kernels.py), so the rest stays in float32, as
    PyTorch's CPU autocast keeps its norms and softmax."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype == jnp.bfloat16 and fast_path_available() else dtype


def matmul(x, w, dtype=None, cols: slice = slice(None)):
    """x [..., K] @ w[:, cols] (w [K, N]) with operands in `dtype` (default: x's): on MKL's bfloat16
    GEMM, float32 out, when that is bfloat16 and the fast path is available, else XLA's dot in
    `dtype`. A kernel packed for the AMX kernel (cpu_amx.pack; precision.inference_state makes
    them) runs there, float32 out; it has no gradient, as nothing trains on packed kernels."""
    if cpu_amx.is_packed(w):
        return _amx_matmul(x, cpu_amx.columns(w, cols))
    w = w[:, cols]
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if dtype == jnp.bfloat16 and w.ndim == 2 and fast_path_available():
        return _mkl_matmul(x, w, x.dtype.name, w.dtype.name)
    return x.astype(dtype) @ w.astype(dtype)


def _amx_matmul(x, packed, bias=None):
    """x [..., K] @ the packed kernel, float32; or, given the bias, gelu(x @ w + bias) in bfloat16."""
    lead, n = x.shape[:-1], packed.shape[0] * cpu_amx.TILE
    a = x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16)
    if bias is None:
        return ffi_call(AMX_TARGET, (a.shape[0], n), a, packed).reshape(*lead, n)
    out = ffi_call(AMX_GELU_TARGET, (a.shape[0], n), a, packed, bias.astype(jnp.float32), dtype=jnp.bfloat16)
    return out.reshape(*lead, n)


def matmul_gelu(x, packed, bias):
    """gelu(x @ w + bias) (GPT-2's tanh form) in bfloat16 on the AMX kernel, bias and GELU fused, for
    a packed kernel whose output only feeds a bfloat16 matmul (the MLP's c_fc): bfloat16 is the
    rounding that matmul applies anyway."""
    return _amx_matmul(x, packed, bias)


def decide_dtype(requested: str, platform: str | None = None, flags: frozenset[str] | None = None,
                 mkl: bool | None = None, width: int | None = None) -> tuple[str, str]:
    """(the compute dtype to use, why): `requested` itself unless it is 'auto'; then bfloat16 where
    the device computes it faster than float32 (GPU, TPU, a CPU with bfloat16 units when MKL's GEMM
    is installed and the model, `width` = n_embd where known, is as wide as gpt2-small), float32
    elsewhere."""
    if requested != "auto":
        return requested, "requested"
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return "bfloat16", f"{platform}: bfloat16 runs on its matrix units"
    if platform != "cpu":
        return "float32", f"{platform}: no measurement says bfloat16 is faster there"
    units = sorted(set(FAST_CPU_FLAGS) & (host_flags() if flags is None else flags))
    if not units:
        return "float32", "cpu without amx_bf16/avx512_bf16: XLA's bfloat16 matmul is no faster than float32"
    if os.environ.get("JAXCLS_CPU_GEMM", "1") == "0":
        return "float32", f"cpu with {'+'.join(units)}, but JAXCLS_CPU_GEMM=0 turns MKL's GEMM off"
    if not (load_mkl() is not None if mkl is None else mkl):
        return "float32", (f"cpu with {'+'.join(units)}, but MKL is not installed (pip install 'jaxcls[amx]'); "
                           "XLA's own bfloat16 matmul is slower than float32")
    if width is not None and width < MIN_MKL_WIDTH:
        return "float32", (f"cpu with {'+'.join(units)} and MKL, but at width {width} (under {MIN_MKL_WIDTH}) "
                           "MKL's per-call overhead outweighs its speed")
    kernel = cpu_amx.why_not(host_flags() if flags is None else flags)
    where = ("MKL's GEMM, inference's on jaxcls's AMX kernel" if kernel is None
             else f"MKL's GEMM (jaxcls's AMX kernel unused: {kernel})")
    return "bfloat16", f"cpu with {'+'.join(units)}: bfloat16 matmuls on {where}"
