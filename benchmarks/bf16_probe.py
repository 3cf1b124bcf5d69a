"""Does XLA:CPU get faster matmuls in bfloat16 with any of its oneDNN/XNNPACK/YNNPACK options?

    python benchmarks/bf16_probe.py            # a table: XLA_FLAGS x dtype -> GFLOP/s

Each setting runs in a fresh process (XLA reads XLA_FLAGS once). A flag this jaxlib does not know
makes that process fail; the row then says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def probe(flags: str, n: int = 2048) -> dict:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", PROBE % n], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    print("| XLA_FLAGS | float32 GFLOP/s | bfloat16 GFLOP/s |\n| --- | --- | --- |")
    for flags in CANDIDATES:
        r = probe(flags)
        if "error" in r:
            print(f"| `{flags or '(none)'}` | {r['error']} | |")
        else:
            print(f"| `{flags or '(none)'}` | {r['float32']:.0f} | {r['bfloat16']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
