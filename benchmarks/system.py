"""What a speed figure depends on and how it is recorded: threads, CPU and device, versions, the
JSON-lines record every benchmark appends, peak RSS, device memory and the measured matmul peak.
jax is imported inside the functions that need it, so torch_peers can use the RSS helpers
without it, and so a script can pin its threads before jax sizes its CPU thread pool."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.jsonl"
SHARED = REPO.parent / "shared"
DEFAULT_SMS = SHARED / "data" / "sms_spam" / "SMSSpamCollection"
DEFAULT_TOKENIZER = SHARED / "data" / "gpt2_tokenizer"
THREADS_METHOD = "all usable cores (set by the importer)"


def threads_from_argv(argv) -> int | None:
    """--threads N from a script's argv, read before argparse runs (and before jax imports)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


def limit_threads(n: int) -> str:
    """Pin this process (and so XLA's CPU thread pool, sized from the affinity mask, and torch)
    to the first `n` usable cores. Must run before jax is imported to size XLA's pool."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and n < len(cores):
        os.sched_setaffinity(0, cores[:n])
        return f"sched_setaffinity to {n} of {len(cores)} cores"
    return "all usable cores"


def pin_threads_from_argv(argv) -> None:
    """A script's first act: honour its --threads before anything imports jax."""
    global THREADS_METHOD
    n = threads_from_argv(argv)
    THREADS_METHOD = limit_threads(n) if n else "all usable cores"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DATASHEET_BF16 = (  # (device_kind substring, dense bf16 FLOP/s), first match wins
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """Vendor dense peak for known accelerators in bfloat16; None otherwise (float32 peaks depend on
    TF32/precision settings, and a CPU has no single datasheet number)."""
    if dtype != "bfloat16":
        return None
    for key, peak in DATASHEET_BF16:
        if key.lower() in device_kind.lower():
            return peak
    return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str | None:
    return _cpuinfo().get("model name") or platform.processor() or None


# /proc/cpuinfo flag -> the name docs use; these decide which matmul kernels oneDNN and XLA can pick
MATRIX_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI",
                "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16", "amx_tile": "AMX",
                "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def cpu_features() -> dict[str, bool]:
    """Which of MATRIX_FLAGS this CPU reports (all False where /proc/cpuinfo is missing)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {flag: flag in flags for flag in MATRIX_FLAGS}


def cpu_kind(info: dict) -> str:
    """One line naming the CPU of a record's system_info: vendor, model and matrix features."""
    feats = [MATRIX_FLAGS[f] for f in ("avx512f", "avx512_bf16", "amx_bf16") if (info.get("cpu_features") or {}).get(f)]
    return (f"{info.get('cpu_vendor') or '?'} {info.get('cpu_model') or '?'}"
            + f" ({', '.join(feats) if feats else 'no AVX-512, AVX512-BF16 or AMX-BF16'})")


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _torch_versions() -> dict:
    """torch's and transformers' versions and torch's CPU settings, where torch imports."""
    from benchmarks.peers import import_peers

    peers, why = import_peers()
    return peers.torch_info() if peers else {"unavailable": why}


def system_info(threads: int | None = None, *, torch: bool = False) -> dict:
    """What a speed figure depends on: device, CPU model and matrix features, threads, versions,
    date and machine load (1/5/15-minute averages; other processes share the cores)."""
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    dev = jax.devices()[0]
    cpu = _cpuinfo()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "os": platform.platform(), "cpu_vendor": cpu.get("vendor_id"), "cpu_model": cpu_model(),
        "cpu_family_model": f"{cpu.get('cpu family')}/{cpu.get('model')}" if cpu else None,
        "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else usable_cores(),
        "threads_method": THREADS_METHOD,
        "load_average": _load(),
        "load_average_1m": (_load() or [None])[0],
    }
    info["cpu_kind"] = cpu_kind(info)
    if torch:
        info["torch"] = _torch_versions()
    return info


def append_record(path, record: dict, *, threads: int | None = None, torch: bool = False) -> dict:
    """Append `record` as one JSON line to `path`, with system_info (taken now unless the record
    already has it, e.g. from its start) and the load average at the end. Every benchmark script
    writes its records through here."""
    record.setdefault("system_info", system_info(threads, torch=torch))
    record["system_info"]["load_average_end"] = _load()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def spread(values: list[float]) -> dict:
    """Median with min and max: how every figure in the docs is quoted."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def matmul_peak(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> dict:
    """Achievable matmul FLOP/s on jax.devices()[0]: an n x n x n jitted matmul, median of
    `repeats` after one warm-up call."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), jnp.float32).astype(dtype), dev)
    b = jax.device_put(jax.random.normal(k2, (n, n), jnp.float32).astype(dtype), dev)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"flops_per_s": 2 * n**3 / med, "probe": f"{n}x{n}x{n} {dtype} matmul, jitted, median of {repeats}",
            "times_s": times}


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (Linux: write 5 to clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size: since the last reset where Linux allows one (VmHWM), else the
    process lifetime peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def device_memory() -> dict | None:
    """Device allocator statistics where the backend keeps them (GPU, TPU); None on CPU."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API
        return None
    if not stats:
        return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats}

