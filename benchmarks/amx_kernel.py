"""Could jaxcls own its AMX GEMM? A hand-written AMX kernel against MKL's, on gpt2-small's shapes.

    python -m benchmarks.amx_kernel                      # from the repo root; needs gcc, an AMX CPU, .[amx]
    python -m benchmarks.amx_kernel --rows 960,1920 --rounds 3

Issue 18's inference gap is the GEMM kernel: PyTorch's oneDNN 3.12 runs gpt2-small's 48 GEMMs at
about twice MKL's rate at 1,920 rows (docs/benchmarks.md), and no wheel outside PyTorch ships that
kernel. This script measures the remaining way, a kernel of our own, before anyone builds it into
the package. It compiles a small C file with gcc (-mamx-tile -mamx-bf16) into a temporary folder
and reads three things, each the median over --rounds interleaved rounds:

1. The tile unit's ceilings on one core pair: `TDPBF16PS` alone on resident tiles; the 2 x 2
   pattern every AMX GEMM streams over K (2 A tiles, 2 B tiles, 4 accumulators, so 4 tile loads
   per 4 products, all from L1); and the same with only the A tiles reloaded.
2. The 48 GEMMs of one gpt2-small forward pass (12 layers x 768->2304, 768->768, 768->3072,
   3072->768, 12 distinct weights per shape, bfloat16 inputs) at each --rows: MKL's
   `cblas_gemm_bf16bf16f32` (jaxcls today) against the hand kernel, weights prepacked in the
   VNNI pair layout the tiles read, with float32 out and with bfloat16 out through an L1 scratch.
3. Each hand-kernel result checked against NumPy in float32 (the script fails on a wrong product).

A JSON record is appended to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import system

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of c_attn, c_proj, c_fc, mlp c_proj
LAYERS = 12
CEILINGS = {0: "products only (resident tiles)", 2: "2 x 2 GEMM pattern, 4 loads per 4 products",
            3: "only the 2 A tiles reloaded"}

C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>

typedef struct { uint8_t palette, start_row, res[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg;

/* Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
int amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

static void config(void) {
    tilecfg c; memset(&c, 0, sizeof c); c.palette = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

void ceiling(uint16_t *buf, long iters, int mode) {
    #pragma omp parallel
    {
        config();
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        _tile_loadd(4, buf, 64); _tile_loadd(5, buf + 512, 64);
        _tile_loadd(6, buf + 1024, 64); _tile_loadd(7, buf + 1536, 64);
        for (long i = 0; i < iters; i++) {
            if (mode == 2) {
                _tile_loadd(4, buf, 64); _tile_loadd(6, buf + 1024, 64); _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, buf + 1536, 64); _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(5, buf + 512, 64); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            } else if (mode == 3) {
                _tile_loadd(4, buf, 64); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(5, buf + 512, 64); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            } else {
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, buf + 2048 + 1024 * omp_get_thread_num(), 64);
        _tile_release();
    }
}

/* out = A @ B (+ bias): A M x K bf16 row-major; P = B packed [N/32][K/32][2][16][16][2] (VNNI
   pairs); M, N, K multiples of 32. Threads split N; A is walked in blocks of mc rows (L2-sized).
   bf16 != 0: bfloat16 out through a 4 KiB scratch, else float32 straight from the tiles. */
void gemm(const uint16_t *A, const uint16_t *P, void *out, const float *bias,
          long M, long N, long K, long mc, int bf16) {
    long kb = K / 32, np = N / 32;
    #pragma omp parallel
    {
        config();
        float s[32 * 32] __attribute__((aligned(64)));
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        long p0 = np * id / nt, p1 = np * (id + 1) / nt;
        for (long m0 = 0; m0 < M; m0 += mc) {
            long m1 = m0 + mc < M ? m0 + mc : M;
            for (long p = p0; p < p1; p++) {
                const uint16_t *bp = P + p * kb * 1024;
                __m512 b0 = bias ? _mm512_loadu_ps(bias + p * 32) : _mm512_setzero_ps();
                __m512 b1 = bias ? _mm512_loadu_ps(bias + p * 32 + 16) : _mm512_setzero_ps();
                for (long m = m0; m < m1; m += 32) {
                    const uint16_t *a = A + m * K;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (long k = 0; k < kb; k++) {
                        _tile_loadd(4, a + k * 32, K * 2);
                        _tile_loadd(6, bp + k * 1024, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_loadd(7, bp + k * 1024 + 512, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_loadd(5, a + 16 * K + k * 32, K * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    if (!bf16) {
                        float *c = (float *)out + m * N + p * 32;
                        _tile_stored(0, c, N * 4); _tile_stored(1, c + 16, N * 4);
                        _tile_stored(2, c + 16 * N, N * 4); _tile_stored(3, c + 16 * N + 16, N * 4);
                        continue;
                    }
                    _tile_stored(0, s, 128); _tile_stored(1, s + 16, 128);
                    _tile_stored(2, s + 512, 128); _tile_stored(3, s + 528, 128);
                    uint16_t *o = (uint16_t *)out + m * N + p * 32;
                    for (int r = 0; r < 32; r++) {
                        __m512 x0 = _mm512_add_ps(_mm512_load_ps(s + r * 32), b0);
                        __m512 x1 = _mm512_add_ps(_mm512_load_ps(s + r * 32 + 16), b1);
                        _mm512_storeu_si512((void *)(o + r * N), (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
                    }
                }
            }
        }
        _tile_release();
    }
}
"""


def vnni_pack(b):
    """B (K x N, bfloat16) in the order the kernel's B tiles read it: 32-column panels, then 32-row
    K steps, then the panel's two 16-column tiles, each 16 rows of 16 (B[2r, n], B[2r + 1, n]) pairs."""
    import numpy as np

    k, n = b.shape
    return np.ascontiguousarray(b.reshape(k // 32, 16, 2, n // 32, 2, 16).transpose(3, 0, 4, 1, 5, 2))


def build(folder: Path):
    """The compiled kernel as a ctypes library with AMX enabled for this process; SystemExit with
    one line where gcc, the CPU's AMX or the kernel's permission is missing."""
    if not shutil.which("gcc"):
        raise SystemExit("amx_kernel: gcc not found (the hand kernel is compiled here, at run time)")
    if not system.cpu_features().get("amx_bf16"):
        raise SystemExit("amx_kernel: this CPU has no AMX-BF16 tiles (lscpu: no amx_bf16)")
    src, lib = folder / "amx_kernel.c", folder / "libamx_kernel.so"
    src.write_text(C_SOURCE)
    cmd = ["gcc", "-O3", "-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared",
           "-fPIC", str(src), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"amx_kernel: gcc failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    so = ctypes.CDLL(str(lib))
    if so.amx_init() != 0:
        raise SystemExit("amx_kernel: the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
    vp, cl = ctypes.c_void_p, ctypes.c_long
    so.ceiling.argtypes = [vp, cl, ctypes.c_int]
    so.gemm.argtypes = [vp, vp, vp, vp, cl, cl, cl, cl, ctypes.c_int]
    return so


def block_rows(k: int) -> int:
    """Rows of A per L2 block: about 1 MiB of bfloat16, a multiple of 32."""
    return max(32, (1 << 20) // (2 * k) // 32 * 32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="960,1920", help="GEMM rows (batch x 120 tokens): 960 is batch 8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per reading (the median is kept)")
    p.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")))
    args = p.parse_args(argv)
    threads = system.usable_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    import ml_dtypes
    import numpy as np

    from jaxcls.cpu_gemm import load_mkl

    mkl = load_mkl()
    if mkl is None:
        raise SystemExit("amx_kernel: MKL's bfloat16 GEMM is not installed (pip install -e .[amx])")
    info = system.system_info(threads)
    folder = Path(tempfile.mkdtemp(prefix="jaxcls-amx-"))
    try:
        so = build(folder)
        rng = np.random.default_rng(0)
        buf = np.zeros(2048 + 1024 * threads, np.uint16)

        def ceiling(mode: int) -> float:
            iters = 400_000
            so.ceiling(buf.ctypes.data, 1000, mode)
            t = time.perf_counter()
            so.ceiling(buf.ctypes.data, iters, mode)
            return threads * iters * 4 * 2 * 16 * 16 * 32 / (time.perf_counter() - t) / 1e9

        weights = [[rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in SHAPES] for _ in range(LAYERS)]
        packed = [[vnni_pack(w) for w in ws] for ws in weights]
        record = {"benchmark": "amx_kernel", "threads": threads, "rounds": args.rounds,
                  "ceilings_gflops": {}, "sequence_gflops": {}}
        readings: dict[str, list[float]] = {}
        rows = [int(r) for r in args.rows.split(",")]
        for m in rows:
            x = {k: rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16) for k in (768, 3072)}
            out32 = {n: np.empty((m, n), np.float32) for n in (768, 2304, 3072)}
            out16 = {n: np.empty((m, n), ml_dtypes.bfloat16) for n in (768, 2304, 3072)}

            def run(kind: str, layer: int, i: int):
                k, n = SHAPES[i]
                if kind == "mkl":
                    mkl(101, 111, 111, m, n, k, 1.0, x[k].ctypes.data, k, weights[layer][i].ctypes.data, n,
                        0.0, out32[n].ctypes.data, n)
                else:
                    out = out16[n] if kind == "hand_bf16" else out32[n]
                    so.gemm(x[k].ctypes.data, packed[layer][i].ctypes.data, out.ctypes.data, None, m, n, k,
                            block_rows(k), int(kind == "hand_bf16"))

            for i, (k, n) in enumerate(SHAPES):  # 3. the products are right
                want = x[k].astype(np.float32) @ weights[0][i].astype(np.float32)
                for kind, out, tol in (("hand_f32", out32, 1e-5), ("hand_bf16", out16, 2 ** -8)):
                    run(kind, 0, i)
                    err = float(np.abs(out[n].astype(np.float32) - want).max() / np.abs(want).max())
                    if err > tol:
                        raise SystemExit(f"amx_kernel: {kind} {m}x{k}x{n} is wrong (relative error {err:.2e})")
            flop = sum(2 * m * k * n for k, n in SHAPES) * LAYERS

            def sequence(kind: str) -> float:
                ts = []
                for _ in range(args.repeats + 1):
                    t = time.perf_counter()
                    for layer in range(LAYERS):
                        for i in range(len(SHAPES)):
                            run(kind, layer, i)
                    ts.append(time.perf_counter() - t)
                return flop / statistics.median(ts[1:]) / 1e9

            for _ in range(args.rounds):
                for kind in ("mkl", "hand_f32", "hand_bf16"):
                    readings.setdefault(f"{m}/{kind}", []).append(sequence(kind))
                if m == rows[0]:
                    for mode in CEILINGS:
                        readings.setdefault(f"ceiling/{mode}", []).append(ceiling(mode))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"# {info['cpu_model']}, {threads} threads; GFLOP/s, median of {args.rounds} rounds (min-max)")
    for mode, what in CEILINGS.items():
        s = system.spread(readings[f"ceiling/{mode}"])
        record["ceilings_gflops"][what] = s
        print(f"tile unit, {what}: {s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})")
    for m in rows:
        for kind in ("mkl", "hand_f32", "hand_bf16"):
            s = system.spread(readings[f"{m}/{kind}"])
            record["sequence_gflops"][f"{m}/{kind}"] = s
            print(f"48 GEMMs, {m} rows, {kind}: {s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})")
    record["system_info"] = info
    return system.append_record(args.results, record, threads=threads)


if __name__ == "__main__":
    main(sys.argv[1:])
