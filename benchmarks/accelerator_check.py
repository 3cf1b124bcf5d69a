"""One command that proves jaxcls on a GPU or TPU: run it once on the machine, read the report.

    python -m benchmarks.accelerator_check                 # the full check (meant for < 8 min on one H100/H200; not yet run on a device)
    python -m benchmarks.accelerator_check --smoke         # the same code at tiny sizes, any machine

It writes accelerator_check.json (every figure) and accelerator_check.md (the report) into --out:
the device-relevant tests run on the device; float32 and bfloat16 train-step throughput and MFU
against the datasheet peak (gpt2-small and gpt2-medium, last_block and all); the book's SMS run
end to end; the IMDB-shaped synthetic run (frozen-prefix cache spilled to disk); gpt2-xl with every
layer trained under --fsdp, and its device memory; compile times without and with the persistent
compilation cache; and `serve` throughput. A section that fails is recorded with its error and
the rest still run. Weights are random throughout: speed does not depend on their values."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import system

if __name__ == "__main__":  # before anything imports jax, which sizes the CPU thread pool
    system.pin_threads_from_argv(sys.argv[1:])

REPO = Path(__file__).resolve().parents[1]
# The tests whose code paths differ on an accelerator: dtypes and numerics, the cache on the
# device, the spilled cache, sharding, compile caching, and the predictor.
DEVICE_TESTS = ["tests/test_model.py", "tests/test_train.py", "tests/test_spill.py", "tests/test_distributed.py",
                "tests/test_compile_cache.py", "tests/test_predict.py"]
FULL = {"combos": [(size, dtype, trainable) for size in ("gpt2-small", "gpt2-medium")
                   for dtype in ("float32", "bfloat16") for trainable in ("last_block", "all")], "steps": 10,
        "seq_len": 256, "batch": 8, "sms_size": "gpt2-small", "sms_max_steps": None,
        "imdb": {"size": "gpt2-small", "n": 25_000, "fraction": 0.2, "uncached_steps": 20},
        "fsdp_size": "gpt2-xl", "compile_size": "gpt2-small", "serve": ["--size", "gpt2-small"],
        "tests": DEVICE_TESTS, "test_k": None}
SMOKE = {"combos": [("tiny", "float32", "last_block"), ("tiny", "bfloat16", "all")], "steps": 1, "seq_len": 16,
         "batch": 2,
         "sms_size": "tiny", "sms_max_steps": 1,
         "imdb": {"size": "tiny", "n": 32, "fraction": 1.0, "uncached_steps": 1},
         "fsdp_size": "tiny", "compile_size": "tiny",
         "serve": ["--size", "tiny", "--clients", "1", "--requests-per-client", "2", "--texts", "4",
                   "--repeats", "1", "--batch-size", "1", "--max-batch-size", "1"],
         "tests": ["tests/test_spill.py"], "test_k": "prefetch"}


def device_tests(plan) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan["tests"]]
    cmd += ["-k", plan["test_k"]] if plan["test_k"] else []
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    tail = out.stdout.strip().splitlines()[-1:] or [out.stderr[-300:]]
    return {"command": " ".join(cmd[1:]), "returncode": out.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - t0}


def throughput(plan, kind: str) -> list[dict]:
    from benchmarks.measure import measure_train, model_config

    rows = []
    for size, dtype, trainable in plan["combos"]:
        r = measure_train(model_config(size, dtype), trainable=trainable, batch=plan["batch"],
                          seq_len=plan["seq_len"], steps=plan["steps"], warmup=1,
                          cached_prefix=False, peak_flops=system.datasheet_peak(kind, "bfloat16"))
        rows.append({"size": size, **{k: r.get(k) for k in (
            "dtype", "trainable", "batch", "seq_len", "compile_s", "step_time_s_median",
            "examples_per_s", "tokens_per_s", "achieved_flops_per_s", "mfu", "device_memory")}})
    return rows


def sms_run(plan) -> dict:
    from benchmarks.e2e import run_e2e

    return run_e2e(plan["sms_size"], max_steps=plan["sms_max_steps"])


def imdb_run(plan) -> dict:
    from benchmarks import spill_cache

    im = plan["imdb"]
    args = spill_cache.parse_args(["--size", im["size"], "--n", str(im["n"]), "--fraction", str(im["fraction"]),
                                   "--uncached-steps", str(im["uncached_steps"])]
                                  + (["--seq-len", str(plan["seq_len"])] if im["n"] < 100 else []))
    return spill_cache.run(args, log=lambda s: None)


def fsdp_run(plan) -> dict:
    """Every layer of the largest size trained for two steps with --fsdp over every device."""
    import jax

    from benchmarks.spill_cache import _epoch, _program
    from benchmarks.system import device_memory

    n = plan["batch"] * 3 * max(1, len(jax.devices()))
    prog, state, split, build_s = _program(plan["fsdp_size"], "bfloat16", n, plan["seq_len"],
                                           plan["batch"] * len(jax.devices()), trainable="all", fsdp=True)
    seconds, steps = _epoch(prog, state, split, steps=2, warmup=1)
    return {"size": plan["fsdp_size"], "devices": len(jax.devices()), "dtype": "bfloat16", "build_s": build_s,
            "step_s": seconds / steps, "memory_per_device": device_memory(),
            "trainable_params": prog.n_trainable}


def compile_times(plan) -> dict:
    """The train step compiled cold, then with the persistent cache empty (it writes), then again
    after clearing the in-process caches (it reads)."""
    import jax

    from benchmarks.measure import compile_train_step, model_config
    from jaxcls.compile_cache import enable_compilation_cache

    cfg = model_config(plan["compile_size"], "float32")
    seconds = lambda: compile_train_step(cfg, "last_block", plan["batch"], plan["seq_len"])[3]  # noqa: E731
    out = {"size": plan["compile_size"], "without_cache_s": seconds()}
    with tempfile.TemporaryDirectory() as folder:
        enable_compilation_cache(folder)
        jax.clear_caches()
        out["cache_cold_s"] = seconds()
        jax.clear_caches()
        out["cache_warm_s"] = seconds()
        out["cache_files"] = len(os.listdir(folder))
        jax.config.update("jax_compilation_cache_dir", None)
    return out


def serve(plan, folder: Path) -> dict:
    from benchmarks import serve_load

    rec = serve_load.main([*plan["serve"], "--results", str(folder / "serve_load.jsonl")])
    return {k: rec[k] for k in ("size", "compile_s", "offline_texts_per_s", "rows")}


def markdown(record: dict) -> str:
    s = record["sections"]
    lines = [f"# jaxcls accelerator check{' (smoke)' if record['smoke'] else ''}", "",
             f"{record['date']}, {record['device_kind']} x {record['device_count']} ({record['backend']}), "
             f"jax {record['jax']}; {record['seconds']:.0f} s in all.", ""]
    for name, sec in s.items():
        if "error" in sec:
            lines += [f"## {name}: FAILED", "", "```", sec["error"].strip()[-1500:], "```", ""]
    if "tests" in s and "result" in s["tests"]:
        t = s["tests"]["result"]
        lines += ["## Device tests", "", f"`{t['command']}`: {t['summary']} (exit {t['returncode']})", ""]
    if "throughput" in s and "result" in s["throughput"]:
        lines += ["## Train-step throughput", "", "| size | dtype | trainable | step ms | tokens/s | MFU |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        for r in s["throughput"]["result"]:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
            lines.append(f"| {r['size']} | {r['dtype']} | {r['trainable']} | {r['step_time_s_median'] * 1e3:.1f} "
                         f"| {r['tokens_per_s']:.0f} | {mfu} |")
        lines += ["", "MFU is against the device's dense bfloat16 datasheet peak (benchmarks/system.py).", ""]
    for name in ("sms", "imdb", "fsdp", "compile", "serve"):
        if name in s and "result" in s[name]:
            lines += [f"## {name}", "", "```json", json.dumps(s[name]["result"], indent=1, default=str)[:3000],
                      "```", ""]
    return "\n".join(lines)


def run(smoke: bool, out: Path, only: list[str] | None = None) -> dict:
    import jax

    plan = SMOKE if smoke else FULL
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    sections = {"tests": lambda: device_tests(plan), "throughput": lambda: throughput(plan, dev.device_kind),
                "sms": lambda: sms_run(plan), "imdb": lambda: imdb_run(plan), "fsdp": lambda: fsdp_run(plan),
                "serve": lambda: serve(plan, out), "compile": lambda: compile_times(plan)}  # compile last: it
    record = {"kind": "accelerator_check", "smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M"),  # turns the
              "device_kind": dev.device_kind, "device_count": len(jax.devices()),  # cache on and off
              "backend": jax.default_backend(), "jax": jax.__version__, "sections": {}}
    t0 = time.perf_counter()
    for name, section in sections.items():
        if only and name not in only:
            continue
        s0 = time.perf_counter()
        try:
            record["sections"][name] = {"result": section()}
        except Exception:  # noqa: BLE001  -- recorded; the other sections still run
            record["sections"][name] = {"error": traceback.format_exc()}
        record["sections"][name]["seconds"] = time.perf_counter() - s0
        print(f"{name}: {'FAILED' if 'error' in record['sections'][name] else 'ok'} "
              f"({record['sections'][name]['seconds']:.1f}s)", file=sys.stderr, flush=True)
    record["seconds"] = time.perf_counter() - t0
    system.append_record(None, record)
    (out / "accelerator_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "accelerator_check.md").write_text(markdown(record))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code on any machine in seconds")
    p.add_argument("--out", default="accelerator_check", help="folder for the JSON record and the report")
    p.add_argument("--only", default=None, help="comma-separated sections: " + "tests,throughput,sms,imdb,fsdp,serve,compile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for XLA")
    args = p.parse_args(argv)
    record = run(args.smoke, Path(args.out), args.only.split(",") if args.only else None)
    failed = [n for n, s in record["sections"].items() if "error" in s]
    print(f"wrote {Path(args.out) / 'accelerator_check.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
