"""Does XLA:CPU get faster matmuls in bfloat16 with any of its oneDNN/XNNPACK/YNNPACK options, and
how does PyTorch's matmul compare on the same CPU?

    python -m benchmarks.bf16_probe            # from the repo root; a table: XLA_FLAGS x dtype -> GFLOP/s, then torch

Each setting runs in a fresh process (XLA reads XLA_FLAGS once). A flag this jaxlib does not know
makes that process fail; the row then says so. Each cell is the median of 7 timed n^3 matmuls after
one warm-up. A JSON record (CPU model and features, load, every reading) is appended to
benchmarks/results.jsonl. bfloat16 speed depends on the CPU's matrix units (AVX512-BF16, AMX), so
read a result together with the record's cpu_kind."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import system

CANDIDATES = ["", "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
              "--xla_cpu_experimental_onednn_fusion_type=dot", "--xla_cpu_use_xnnpack=true",
              "--xla_cpu_experimental_ynn_fusion_type=dot"]

PROBE = r"""
import json, time, jax, jax.numpy as jnp
n, out = %d, {}
for name in ("float32", "bfloat16"):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), name)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), name)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(7):
        t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
    out[name] = 2 * n ** 3 / sorted(ts)[3] / 1e9
print(json.dumps(out))
"""

TORCH_PROBE = r"""
import json, time, torch
torch.set_num_threads(%d)
n, out = %d, {}
for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    a @ b
    ts = []
    for _ in range(7):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    out[name] = 2 * n ** 3 / sorted(ts)[3] / 1e9
print(json.dumps(out))
"""


def _run(code: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe(flags: str, n: int = 2048) -> dict:
    return _run(PROBE % n, {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})


def torch_probe(threads: int, n: int = 2048) -> dict:
    return _run(TORCH_PROBE % (threads, n), dict(os.environ))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="matmul size")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    info = system.system_info(torch=True)
    print(f"{args.n}^3 matmul, GFLOP/s, median of 7; {info['cpu_kind']}; load average {info['load_average']}\n")
    print("| XLA_FLAGS | float32 GFLOP/s | bfloat16 GFLOP/s |\n| --- | --- | --- |")
    rows = []
    for flags in CANDIDATES:
        r = {"system": "jax", "xla_flags": flags, **probe(flags, args.n)}
        rows.append(r)
        if "error" in r:
            print(f"| `{flags or '(none)'}` | {r['error']} | |")
        else:
            print(f"| `{flags or '(none)'}` | {r['float32']:.0f} | {r['bfloat16']:.0f} |")
    r = {"system": "torch", **torch_probe(info["threads"], args.n)}
    rows.append(r)
    if "error" in r:
        print(f"| torch | {r['error']} | |")
    else:
        print(f"| torch {info['torch'].get('torch_version')} | {r['float32']:.0f} | {r['bfloat16']:.0f} |")
    record = {"kind": "bf16_probe", "command": "python -m benchmarks.bf16_probe "
              + " ".join(sys.argv[1:] if argv is None else argv), "n": args.n, "unit": "GFLOP/s",
              "system_info": info, "rows": rows}
    return system.append_record(args.results, record)


if __name__ == "__main__":
    main()
