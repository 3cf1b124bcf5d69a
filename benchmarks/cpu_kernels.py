"""What the bfloat16 path on MKL (jaxcls.cpu_gemm, cpu_attention) is built on, measured: the work
outside the big matmuls that decided its design. One record, four readings, median of --repeats:

    python -m benchmarks.cpu_kernels            # from the repo root; needs `pip install -e .[amx]`
    python -m benchmarks.cpu_kernels --quick    # smoke: small shapes, one repeat

1. attention's two batched products at gpt2-small's shapes (B x 120 tokens, 12 heads of 64),
   float32: XLA's einsums (with the transposes around them) against MKL's batch GEMM reading the
   heads in place (`head_scores`, `head_context`), ms and GFLOP/s;
2. GPT-2's GELU (tanh form) over the MLP activation of a batch of 8 (960 x 3072) in float32 and
   in bfloat16: XLA:CPU's bfloat16 elementwise work is the slower one;
3. a float32 ReLU over the batch-64 MLP activation (7680 x 3072) written as bfloat16: bytes moved
   per second, the memory bound of the elementwise passes at batch 64;
4. MKL's bfloat16 GEMM (float32 out) through `cpu_gemm.matmul` at batch 8 and 64's row counts.

The record names the CPU's matrix features (system_info) and is appended to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import sys

from benchmarks import system
from benchmarks.amx_matmul import median_s


def readings(B: int, T: int, rows: tuple[int, int], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcls.cpu_attention import head_context, head_scores
    from jaxcls.cpu_gemm import matmul

    rng = np.random.default_rng(0)
    H, D, C = 12, 64, 768
    qkv = jnp.asarray(rng.standard_normal((B, T, 3, H, D)), jnp.float32)
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((B, H, T, T)), jnp.float32), axis=-1)
    product_flops = 2 * B * H * T * T * D
    xla = {"scores": jax.jit(lambda x: jnp.einsum("bqhd,bkhd->bhqk", x[:, :, 0], x[:, :, 1])),
           "context": jax.jit(lambda p, x: jnp.einsum("bhqk,bkhd->bqhd", p, x[:, :, 2]))}
    mkl = {"scores": jax.jit(lambda x: head_scores(x, x, 0, 1)), "context": jax.jit(lambda p, x: head_context(p, x, 2))}
    attention = {}
    for name, args in (("scores", (qkv,)), ("context", (p, qkv))):
        for system_name, fns in (("xla", xla), ("mkl", mkl)):
            s = median_s(fns[name], args, repeats)
            attention[f"{name}_{system_name}"] = {"ms": s * 1e3, "gflops": product_flops / s / 1e9}
    act = jnp.asarray(rng.standard_normal((rows[0], 4 * C)), jnp.float32)
    gelu = jax.jit(lambda a: jax.nn.gelu(a, approximate=True))
    gelu_ms = {dt: median_s(gelu, (act.astype(dt),), repeats) * 1e3 for dt in ("float32", "bfloat16")}
    big = jnp.asarray(rng.standard_normal((rows[1], 4 * C)), jnp.float32)
    relu_s = median_s(jax.jit(lambda a: jnp.maximum(a, 0).astype(jnp.bfloat16)), (big,), repeats)
    gemm = {}
    mm = jax.jit(lambda x, w: matmul(x, w, "bfloat16"))
    for m in rows:
        for k, n in ((C, 4 * C), (4 * C, C)):
            x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((m, k), (k, n)))
            gemm[f"{m}x{k}x{n}"] = 2 * m * k * n / median_s(mm, (x, w), repeats) / 1e9
    return {"attention": attention, "gelu_ms": gelu_ms, "gelu_bf16_over_f32": gelu_ms["bfloat16"] / gelu_ms["float32"],
            "relu_gb_per_s": big.size * 6 / relu_s / 1e9, "mkl_bf16_gemm_gflops": gemm}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a smoke run: small shapes, one repeat")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    from jaxcls.cpu_gemm import fast_path_available

    if not fast_path_available():
        raise SystemExit("cpu_kernels: MKL's bfloat16 path is unavailable here (no MKL, or no AMX/AVX512-BF16)")
    info = system.system_info()
    B, T, rows, repeats = (2, 16, (32, 64), 1) if args.quick else (8, 120, (960, 7680), args.repeats)
    r = readings(B, T, rows, repeats)
    print(f"{info['cpu_kind']}; load average {info['load_average']}; batch {B} x {T}, median of {repeats}")
    for name, v in r["attention"].items():
        print(f"attention {name}: {v['ms']:.2f} ms, {v['gflops']:.0f} GFLOP/s")
    print(f"GELU over {rows[0]} x 3072: float32 {r['gelu_ms']['float32']:.2f} ms, bfloat16 "
          f"{r['gelu_ms']['bfloat16']:.2f} ms ({r['gelu_bf16_over_f32']:.1f}x)")
    print(f"ReLU float32 -> bfloat16 over {rows[1]} x 3072: {r['relu_gb_per_s']:.1f} GB/s")
    for shape, g in r["mkl_bf16_gemm_gflops"].items():
        print(f"MKL bf16 GEMM {shape}: {g:.0f} GFLOP/s")
    record = {"kind": "cpu_kernels", "command": "python -m benchmarks.cpu_kernels "
              + " ".join(sys.argv[1:] if argv is None else argv), "system_info": info, "batch": B, "seq_len": T,
              "repeats": repeats, **r}
    system.append_record(args.results, record)
    return record


if __name__ == "__main__":
    main()
