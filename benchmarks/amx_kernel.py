"""jaxcls's own AMX GEMM (jaxcls.cpu_amx) against MKL's, on gpt2-small's shapes.

    python -m benchmarks.amx_kernel                      # from the repo root; needs a C compiler, an AMX CPU, .[amx]
    python -m benchmarks.amx_kernel --rows 960,1920 --rounds 3

Issue 18's inference gap was the GEMM kernel: PyTorch's oneDNN 3.12 runs gpt2-small's 48 GEMMs at
about twice MKL's rate at 1,920 rows (docs/benchmarks.md), and no wheel outside PyTorch ships that
kernel, so jaxcls carries its own (built with the machine's C compiler at first use). Readings
are the median over --rounds interleaved rounds:

1. The 48 GEMMs of one gpt2-small forward pass (12 layers x 768->2304, 768->768, 768->3072,
   3072->768, 12 distinct weights per shape, bfloat16 inputs) at each --rows: MKL's
   `cblas_gemm_bf16bf16f32` (float32 out) against jaxcls's kernel on packed weights, float32 out,
   and with c_fc's bias and GELU fused (bfloat16 out), as inference runs them.
2. Each kernel result checked against NumPy in float64 (the script fails on a wrong product).

A JSON record is appended to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks import system

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of c_attn, c_proj, c_fc, mlp c_proj
LAYERS = 12
KINDS = ("mkl", "jaxcls", "jaxcls-gelu-fused")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="960,1920", help="GEMM rows (batch x 120 tokens): 960 is batch 8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per reading (the median is kept)")
    p.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")))
    args = p.parse_args(argv)
    threads = system.usable_cores()
    import ml_dtypes
    import numpy as np

    from jaxcls import cpu_amx
    from jaxcls.cpu_gemm import load_mkl

    mkl = load_mkl()
    if mkl is None:
        raise SystemExit("amx_kernel: MKL's bfloat16 GEMM is not installed (pip install -e .[amx])")
    kernel = cpu_amx.library()
    if kernel is None:
        raise SystemExit(f"amx_kernel: jaxcls's AMX kernel does not run here: {cpu_amx.unavailable_reason()}")
    info = system.system_info(threads)
    rng = np.random.default_rng(0)
    weights = [[rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in SHAPES] for _ in range(LAYERS)]
    packed = [[np.ascontiguousarray(cpu_amx.pack(w)) for w in ws] for ws in weights]
    bias = {n: rng.standard_normal(n).astype(np.float32) for n in (768, 2304, 3072)}
    record = {"benchmark": "amx_kernel", "threads": threads, "rounds": args.rounds, "sequence_gflops": {},
              "kernel": str(cpu_amx.library_path())}
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
            elif kind == "jaxcls" or i != 2:  # float32 out; c_fc alone has its GELU fused
                kernel.jaxcls_amx_gemm(x[k].ctypes.data, packed[layer][i].ctypes.data, out32[n].ctypes.data,
                                       None, 0, m, n, k)
            else:
                kernel.jaxcls_amx_gemm(x[k].ctypes.data, packed[layer][i].ctypes.data, out16[n].ctypes.data,
                                       bias[n].ctypes.data, 1, m, n, k)

        for i, (k, n) in enumerate(SHAPES):  # 2. the products are right
            want = x[k].astype(np.float64) @ weights[0][i].astype(np.float64)
            run("jaxcls", 0, i)
            err = float(np.abs(out32[n] - want).max() / np.abs(want).max())
            if err > 1e-5:
                raise SystemExit(f"amx_kernel: the kernel's {m}x{k}x{n} product is wrong (relative error {err:.2e})")
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
            for kind in KINDS:
                readings.setdefault(f"{m}/{kind}", []).append(sequence(kind))
    print(f"# {info['cpu_model']}, {threads} threads; GFLOP/s, median of {args.rounds} rounds (min-max)")
    for m in rows:
        for kind in KINDS:
            s = system.spread(readings[f"{m}/{kind}"])
            record["sequence_gflops"][f"{m}/{kind}"] = s
            print(f"48 GEMMs, {m} rows, {kind}: {s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})")
    record["system_info"] = info
    return system.append_record(args.results, record, threads=threads)


if __name__ == "__main__":
    main(sys.argv[1:])
