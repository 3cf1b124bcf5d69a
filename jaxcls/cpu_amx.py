"""A bfloat16 GEMM written for the CPU's AMX tiles, compiled with the machine's C compiler at first use.

Why by hand: on gpt2-small's shapes MKL's `cblas_gemm_bf16bf16f32` (cpu_gemm) runs at about 1.3
TFLOP/s on a 2-core Xeon with AMX, half of what PyTorch's oneDNN 3.12 reaches there, and no wheel
outside PyTorch ships a faster kernel (docs/benchmarks.md, issue 18). This one reaches 2.0-2.2
there (benchmarks/amx_kernel.py). It is written for GPT-2's shapes and for inference:
- a 2 x 2 micro-kernel of `TDPBF16PS` (32 x 32 outputs from the 8 tiles);
- the weights in the VNNI pair layout the B tiles read (`pack`), packed once by
  precision.inference_state: packed in every call, the transpose cost more than the kernel saved;
- the activations copied to tile order about 1 MiB at a time, zero rows past M, so any M works;
- float32 out, or, for c_fc, bias and GELU applied while the results are in L1 and bfloat16 out,
  each block written out during the next block's products (13% of a batch-64 forward pass).
N and K must be multiples of 32 (every GPT-2 width is); anything else stays on MKL. Packed kernels
have no gradient: training stays on MKL.

Built the way torch.compile builds its CPU code: once, with `$CC` (default gcc), into
`$JAXCLS_HOME/kernels/` under a name that hashes the source and the flags, written to a temporary
name and renamed, so processes may share the folder. Where there is no compiler, no AMX, no Linux,
or JAXCLS_AMX_KERNEL=0, `library()` is None (`unavailable_reason()` says why) and the matmuls stay on MKL."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg;

static __thread uint16_t *block;      /* this thread's activations in tile order */
static __thread size_t block_bytes;

/* GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
   x / (1 + exp(-2u)); exp by 2^n and a degree-6 polynomial on |r| <= ln(2)/2 (relative error ~1e-7). */
static inline __m512 gelu(__m512 x) {
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 y = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.4426950408889634f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), y);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n)));
}


/* Row r of the block waiting in `ps`, out at `pout`: + bias, GELU, bfloat16 with a bias,
   else float32 as it is. Runs inside the next block's K loop, per_k rows a step, so that the vector
   units work while the tiles do (after the loop it took as long as a K = 768 block's products). */
#define FLUSH_ROW(r) do { \
    __m512 x0 = _mm512_load_ps(ps + (r) * 32), x1 = _mm512_load_ps(ps + (r) * 32 + 16); \
    if (bias) { \
        x0 = _mm512_add_ps(x0, pb0); x1 = _mm512_add_ps(x1, pb1); \
        if (act) { x0 = gelu(x0); x1 = gelu(x1); } \
        _mm512_storeu_si512((void *)((uint16_t *)pout + (r) * N), (__m512i)_mm512_cvtne2ps_pbh(x1, x0)); \
    } else { \
        _mm512_storeu_ps((float *)pout + (r) * N, x0); _mm512_storeu_ps((float *)pout + (r) * N + 16, x1); \
    } } while (0)

/* Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
int jaxcls_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

/* C[M, N] (float32) = A[M, K] (bfloat16, row-major) @ B, B given packed as
   P[N/32][K/32][2][16][16][2]: 32-column panels, 32-row K steps, two 16-column tiles of 16 rows of
   (B[2r, n], B[2r + 1, n]) pairs. N and K multiples of 32. Threads split the 32-row blocks (or the
   panels when there are few rows); each walks A in ~1 MiB blocks, every panel over each block.
   With `bias` (N floats), out is bfloat16: gelu(A @ B + bias) when `act` is 1, else A @ B + bias.
   Each block's tiles go to a scratch that the next block's loop writes out (FLUSH_ROW). */
int jaxcls_amx_gemm(const uint16_t *A, const uint16_t *P, void *out, const float *bias, int act,
                    long M, long N, long K) {
    long kb = K / 32, np = N / 32, mb = (M + 31) / 32;
    long per = (1L << 20) / (64L * K);
    int failed = 0;
    if (per < 1) per = 1;
    #pragma omp parallel reduction(|:failed)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        long b0 = 0, b1 = mb, p0 = 0, p1 = np;
        if (mb >= 2 * nt) { b0 = mb * id / nt; b1 = mb * (id + 1) / nt; }
        else { p0 = np * id / nt; p1 = np * (id + 1) / nt; }
        long rows_here = b1 - b0 < per ? b1 - b0 : per;
        size_t need = (size_t)rows_here * 32 * K * 2;
        if (b0 < b1 && p0 < p1 && need > block_bytes) {
            free(block);
            block = aligned_alloc(64, need);
            block_bytes = block ? need : 0;
        }
        if (b0 < b1 && p0 < p1 && !block) failed = 1;
        if (b0 < b1 && p0 < p1 && block) {
            tilecfg cfg;
            float ps[32 * 32] __attribute__((aligned(64)));   /* the block waiting to be written out */
            void *pout = NULL;
            long prows = 0, pdone = 0;
            __m512 pb0 = _mm512_setzero_ps(), pb1 = _mm512_setzero_ps();
            int per_k = (int)((32 + kb - 1) / kb);
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
            _tile_loadconfig(&cfg);
            for (long c0 = b0; c0 < b1; c0 += per) {
                long c1 = c0 + per < b1 ? c0 + per : b1;
                for (long b = c0; b < c1; b++)
                    for (int r = 0; r < 32; r++) {
                        long row = b * 32 + r;
                        uint16_t *dst = block + (b - c0) * 32 * K + r * 32;
                        for (long k = 0; k < kb; k++)
                            _mm512_store_si512((void *)(dst + k * 1024), row < M
                                ? _mm512_loadu_si512((const void *)(A + row * K + k * 32)) : _mm512_setzero_si512());
                    }
                for (long p = p0; p < p1; p++) {
                    const uint16_t *bp = P + p * kb * 1024;
                    __m512 bias0 = bias ? _mm512_loadu_ps(bias + p * 32) : _mm512_setzero_ps();
                    __m512 bias1 = bias ? _mm512_loadu_ps(bias + p * 32 + 16) : _mm512_setzero_ps();
                    for (long b = c0; b < c1; b++) {
                        const uint16_t *a = block + (b - c0) * 32 * K;
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        for (long k = 0; k < kb; k++) {
                            _tile_loadd(4, a + k * 1024, 64);
                            _tile_loadd(6, bp + k * 1024, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(7, bp + k * 1024 + 512, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_loadd(5, a + k * 1024 + 512, 64);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                            for (int t = 0; t < per_k && pdone < prows; t++, pdone++) FLUSH_ROW(pdone);
                        }
                        while (pdone < prows) { FLUSH_ROW(pdone); pdone++; }
                        _tile_stored(0, ps, 128); _tile_stored(1, ps + 16, 128);
                        _tile_stored(2, ps + 512, 128); _tile_stored(3, ps + 528, 128);
                        pdone = 0;
                        prows = M - b * 32 < 32 ? M - b * 32 : 32;
                        pb0 = bias0; pb1 = bias1;
                        pout = bias ? (void *)((uint16_t *)out + b * 32 * N + p * 32) : (void *)((float *)out + b * 32 * N + p * 32);
                    }
                }
            }
            while (pdone < prows) { FLUSH_ROW(pdone); pdone++; }
            _tile_release();
        }
    }
    return failed;
}
"""
CFLAGS = ("-O3", "-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared", "-fPIC")
NEEDED_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16")  # /proc/cpuinfo names
TILE = 32


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (empty where the file is missing, e.g. not Linux)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def host_flags() -> frozenset[str]:
    return cpu_flags()


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "gcc")


def why_not(flags: frozenset[str] | None = None) -> str | None:
    """Why the kernel cannot be used here, or None when it can be built and run."""
    if os.environ.get("JAXCLS_AMX_KERNEL", "1") == "0":
        return "JAXCLS_AMX_KERNEL=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.system()} on {platform.machine()}: the kernel is for Linux on x86-64"
    missing = [f for f in NEEDED_FLAGS if f not in (host_flags() if flags is None else flags)]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if compiler() is None:
        return f"no C compiler ({os.environ.get('CC') or 'gcc'}) to build it"
    return None


def library_path(folder: Path | None = None) -> Path:
    """Where the built kernel lives: named by the source, the flags and the compiler's path."""
    if folder is None:
        from jaxcls.download import cache_home

        folder = cache_home() / "kernels"
    digest = hashlib.sha256("\0".join((SOURCE, *CFLAGS, compiler() or "")).encode()).hexdigest()[:16]
    return folder / f"amx-gemm-{digest}.so"


def build(path: Path) -> Path:
    """Compile SOURCE into `path` unless it is there; the file appears whole or not at all."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from jaxcls.fileio import owner_tag

    tmp = path.with_name(f".{path.name}.{owner_tag()}.tmp")
    src = tmp.with_suffix(".c")
    try:
        src.write_text(SOURCE)
        done = subprocess.run([compiler() or "gcc", *CFLAGS, str(src), "-o", str(tmp)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise OSError(f"building the AMX kernel failed: {last}")
        os.replace(tmp, path)
    finally:
        for f in (src, tmp):
            f.unlink(missing_ok=True)
    return path


@functools.cache
def _load():
    """(the built kernel as a ctypes library with the tile state granted, None) or (None, why not)."""
    reason = why_not()
    if reason is not None:
        return None, reason
    try:
        lib = ctypes.CDLL(str(build(library_path())))
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    if lib.jaxcls_amx_init() != 0:
        return None, "Linux refused the AMX tile state (arch_prctl)"
    c_long, c_void_p = ctypes.c_long, ctypes.c_void_p
    lib.jaxcls_amx_gemm.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, ctypes.c_int, c_long, c_long, c_long]
    lib.jaxcls_amx_gemm.restype = ctypes.c_int
    return lib, None


def library():
    """The built kernel as a ctypes library, or None (unavailable_reason says why)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why library() is None (None when it loaded)."""
    return _load()[1]


def fits(k: int, n: int) -> bool:
    """Whether a [K, N] weight can go through the kernel: whole tiles, the CPU backend, the kernel here."""
    import jax

    return k % TILE == 0 and n % TILE == 0 and jax.default_backend() == "cpu" and library() is not None


def pack(w):
    """w [K, N] (bfloat16) in the kernel's B layout, [N/32, K/32, 2, 16, 16, 2]; a NumPy array works
    too. Done once per state (precision.inference_state), never per call."""
    k, n = w.shape
    return w.reshape(k // TILE, 16, 2, n // TILE, 2, 16).transpose(3, 0, 4, 1, 5, 2)


def is_packed(w) -> bool:
    return getattr(w, "ndim", 0) == 6


def columns(packed, cols: slice):
    """The packed kernel of w[:, cols]: whole 32-column panels (GPT-2's slices, the thirds of
    c_attn, fall on them)."""
    n = packed.shape[0] * TILE
    start, stop, step = cols.indices(n)
    if step != 1 or start % TILE or stop % TILE:
        raise ValueError(f"columns {start}:{stop}:{step} of a packed kernel are not whole 32-column panels")
    return packed[start // TILE:stop // TILE]
