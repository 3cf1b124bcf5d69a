"""Does bfloat16 on MKL (jaxcls.cpu_gemm) cost accuracy? The book's SMS run (benchmarks.e2e.run_e2e:
5 epochs, batch 8, jaxcls's defaults) in float32 and in bfloat16 on MKL's GEMM, per seed:

    python -m benchmarks.amx_accuracy --size mini --trainable all --max-steps 300    # repo root

The issue asks for the test accuracy within a point of float32 over three seeds. Without released
weights on the machine the run starts from random weights (a small preset trains in minutes, and
--trainable all sends every block's forward and backward through the GEMM). The record (each run's
accuracies and times, the differences) is appended to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from benchmarks import system


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mini")
    p.add_argument("--trainable", default="all")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    from benchmarks.e2e import run_e2e
    from jaxcls.cpu_gemm import decide_dtype, fast_path_available

    os.environ["JAXCLS_CPU_GEMM"] = "1"
    if not fast_path_available():
        raise SystemExit(f"bfloat16 would not run on MKL here: {decide_dtype('auto')[1]}")
    info = system.system_info()
    print(f"{info['cpu_kind']}; load average {info['load_average']}\n")
    print("| seed | float32 test acc | bfloat16 (MKL) test acc | difference (points) | f32 loop s | bf16 loop s |")
    print("| --- | --- | --- | --- | --- | --- |")
    runs, diffs = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        pair = {dtype: run_e2e(args.size, dtype=dtype, seed=seed, max_steps=args.max_steps,
                               trainable=args.trainable) for dtype in ("float32", "bfloat16")}
        f32, bf16 = pair["float32"], pair["bfloat16"]
        diffs.append(100 * (bf16["test_accuracy"] - f32["test_accuracy"]))
        runs += [f32, bf16]
        print(f"| {seed} | {100 * f32['test_accuracy']:.2f} | {100 * bf16['test_accuracy']:.2f} | "
              f"{diffs[-1]:+.2f} | {f32['train_loop_s']:.1f} | {bf16['train_loop_s']:.1f} |", flush=True)
    mean_f32 = statistics.mean(r["test_accuracy"] for r in runs if r["dtype"] == "float32")
    mean_bf16 = statistics.mean(r["test_accuracy"] for r in runs if r["dtype"] == "bfloat16")
    print(f"\nmean over seeds: float32 {100 * mean_f32:.2f}, bfloat16 {100 * mean_bf16:.2f} "
          f"({100 * (mean_bf16 - mean_f32):+.2f} points)")
    record = {"kind": "amx_accuracy", "command": "python -m benchmarks.amx_accuracy "
              + " ".join(sys.argv[1:] if argv is None else argv), "system_info": info, "runs": runs,
              "difference_points": diffs, "mean_difference_points": 100 * (mean_bf16 - mean_f32),
              "load_average_after": system.system_info()["load_average"]}
    return system.append_record(args.results, record)


if __name__ == "__main__":
    main()
