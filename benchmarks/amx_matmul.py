"""Does jaxcls reach the CPU's AMX units, and what does it buy? Three readings, one record:

    python -m benchmarks.amx_matmul                      # from the repo root; needs `pip install -e .[amx]`
    python -m benchmarks.amx_matmul --no-steps           # only the matmuls

1. GFLOP/s of one product, median of --repeats after a warm-up, at 2048^3 and at gpt2-small's
   shapes for a batch of 8 x 120 (M = 960 rows): XLA float32, XLA bfloat16, MKL's bfloat16 GEMM as
   an XLA FFI custom call (jaxcls.cpu_gemm, the path the model takes), the same GEMM through
   jax.pure_callback on numpy views, and forward + backward (the custom_vjp against XLA's bfloat16).
2. Whether XLA:CPU rewrites a bfloat16 dot into oneDNN under any of its flags (a fresh process per
   flag; the compiled HLO is searched for `__onednn`).
3. The train step (batch 8 x 120; last_block and all) and inference (batch 8 and 64) of the same
   model in float32, in bfloat16 on XLA (JAXCLS_CPU_GEMM=0) and in bfloat16 on MKL, interleaved
   round by round (benchmarks.measure builds them as fit and the predictor do).

A JSON record (CPU, load before and after, every reading) is appended to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks import system

SHAPES = [(2048, 2048, 2048), (960, 768, 2304), (960, 768, 768), (960, 768, 3072), (960, 3072, 768)]
ONEDNN_FLAGS = ["--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
                "--xla_cpu_experimental_onednn_fusion_type=dot", "--xla_cpu_use_onednn=true "
                "--xla_cpu_use_thunk_runtime=false"]
ONEDNN_PROBE = ("import jax, jax.numpy as jnp; a = jnp.ones((512, 512), jnp.bfloat16); "
                "print('__onednn' in jax.jit(lambda a, b: a @ b).lower(a, a).compile().as_text())")


def median_s(fn, args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _callback_matmul(a, b):
    """Option (b): MKL on numpy views of the operands through jax.pure_callback."""
    import ctypes

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcls.cpu_gemm import load_mkl

    m, k, n = a.shape[0], a.shape[1], b.shape[1]

    def host(x, y):
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        out = np.empty((m, n), np.float32)
        load_mkl()(101, 111, 111, m, n, k, 1.0, x.ctypes.data_as(ctypes.c_void_p), k,
                   y.ctypes.data_as(ctypes.c_void_p), n, 0.0, out.ctypes.data_as(ctypes.c_void_p), n)
        return out

    return jax.pure_callback(host, jax.ShapeDtypeStruct((m, n), jnp.float32), a, b)


def gemm_rows(repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxcls.cpu_gemm import _mkl_matmul

    def loss(mm):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32)), argnums=(0, 1)))

    paths = {"xla_float32": jax.jit(lambda a, b: a @ b), "xla_bfloat16": jax.jit(lambda a, b: a @ b),
             "mkl_ffi": jax.jit(_mkl_matmul), "mkl_pure_callback": jax.jit(_callback_matmul),
             "xla_bfloat16_fwd_bwd": loss(lambda a, b: a @ b), "mkl_ffi_fwd_bwd": loss(_mkl_matmul)}
    rows = []
    for m, k, n in SHAPES:
        key = jax.random.PRNGKey(0)
        row = {"m": m, "k": k, "n": n}
        for name, fn in paths.items():
            dtype = jnp.float32 if name == "xla_float32" else jnp.bfloat16
            a = jax.random.normal(key, (m, k), dtype)
            b = jax.random.normal(jax.random.fold_in(key, 1), (k, n), dtype)
            flops = 2 * m * k * n * (3 if name.endswith("fwd_bwd") else 1)
            row[name] = flops / median_s(fn, (a, b), repeats) / 1e9
        rows.append(row)
        print(f"| {m}x{k}x{n} | " + " | ".join(f"{row[p]:.0f}" for p in paths) + " |", flush=True)
    return rows


def onednn_rows() -> list[dict]:
    rows = []
    for flags in ONEDNN_FLAGS:
        r = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
        out = r.stdout.strip().splitlines()
        rows.append({"xla_flags": flags, "onednn_in_hlo": out[-1] == "True" if out and not r.returncode
                     else (r.stderr.strip().splitlines() or ["failed"])[-1][:120]})
        print(f"XLA_FLAGS={flags}: __onednn in the compiled HLO: {rows[-1]['onednn_in_hlo']}", flush=True)
    return rows


VARIANTS = (("float32", "float32", "1"), ("xla_bfloat16", "bfloat16", "0"), ("mkl_bfloat16", "bfloat16", "1"))


def step_rows(size: str, rounds: int, steps: int) -> list[dict]:
    """Each round measures every (case, variant) once; the order of the variants rotates."""
    from benchmarks import measure

    cases = [("train", dict(trainable="last_block", batch=8)), ("train", dict(trainable="all", batch=8)),
             ("infer", dict(batch=8)), ("infer", dict(batch=64))]
    readings: dict = {}
    for r in range(rounds):
        for mode, kw in cases:
            for i in range(len(VARIANTS)):
                name, dtype, gemm = VARIANTS[(i + r) % len(VARIANTS)]
                os.environ["JAXCLS_CPU_GEMM"] = gemm
                cfg = measure.model_config(size, dtype)
                fn = measure.measure_train if mode == "train" else measure.measure_infer
                out = fn(cfg, seq_len=120, steps=steps, warmup=1, **kw)
                key = (mode, kw.get("trainable", ""), kw["batch"], name)
                readings.setdefault(key, []).append(out["step_time_s_median"])
    os.environ.pop("JAXCLS_CPU_GEMM", None)
    rows = [{"mode": m, "trainable": t, "batch": b, "variant": v, "step_time_s_median": statistics.median(ts),
             "round_medians_s": ts} for (m, t, b, v), ts in readings.items()]
    for row in rows:
        print(f"| {row['mode']} {row['trainable']} batch {row['batch']} | {row['variant']} | "
              f"{row['step_time_s_median']:.3f} s |", flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-steps", action="store_true", help="skip the train-step and inference A/B")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    from jaxcls.cpu_gemm import decide_dtype, fast_path_available

    if not fast_path_available():
        raise SystemExit("the MKL path is not available here (no AMX/AVX512-BF16, or `pip install -e .[amx]` "
                         f"missing): {decide_dtype('auto')[1]}")
    info = system.system_info()
    print(f"{info['cpu_kind']}; load average {info['load_average']}\n")
    print("| m x k x n | XLA f32 | XLA bf16 | MKL FFI | MKL pure_callback | XLA bf16 fwd+bwd | MKL fwd+bwd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    record = {"kind": "amx_matmul", "command": "python -m benchmarks.amx_matmul "
              + " ".join(sys.argv[1:] if argv is None else argv), "unit": "GFLOP/s (gemm), s (steps)",
              "system_info": info, "gemm": gemm_rows(args.repeats), "onednn": onednn_rows()}
    if not args.no_steps:
        record["steps"] = step_rows(args.size, args.rounds, args.steps)
    record["load_average_after"] = system.system_info()["load_average"]
    return system.append_record(args.results, record)


if __name__ == "__main__":
    main()
