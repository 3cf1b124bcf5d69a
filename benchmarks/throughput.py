"""Throughput, compile time, memory and MFU of jaxcls's train step and predictor, optionally
beside PyTorch peers (benchmarks/torch_peers.py) measured in the same process and run.

    python -m benchmarks.throughput --size gpt2-small --peers
    python -m benchmarks.throughput --size tiny --steps 2 --infer-batches 1,4 --probe-n 256

Run from the repository root. Weights are random: speed does not depend on their values. The
pieces live by concern in flops.py (the FLOP model), system.py (machine, records, memory, peak),
measure.py (jaxcls's step and predictor), e2e.py (the book's run), peers.py and report.py; this
module parses the flags and puts one record together. Nothing assumes a CPU: the device is
`jax.devices()[0]`, device memory comes from `memory_stats()` where the backend has it, and the
peak is measured on that device (plus the datasheet number for known accelerators).

See docs/benchmarks.md for what each number means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import report, system

if __name__ == "__main__":  # before anything imports jax, which sizes the CPU thread pool
    system.pin_threads_from_argv(sys.argv[1:])

SIZE_CHOICES = ("tiny", "mini", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZE_CHOICES, default="gpt2-small")
    p.add_argument("--trainable", default="last_block",
                   help="head | last_block | last_two_blocks | last_k_blocks:K | all | lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=120)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="steady-state steps timed")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    p.add_argument("--infer-batches", default="1,8,32", help="comma-separated; empty for none")
    p.add_argument("--infer-steps", type=int, default=3, help="timed calls per inference batch size")
    p.add_argument("--no-cached", action="store_true", help="skip the cached-prefix train step")
    p.add_argument("--e2e", action="store_true", help="also run the book's fine-tuning end to end with fit")
    p.add_argument("--e2e-uncached", action="store_true",
                   help="with --e2e: also the same run without prefix cache and buckets (same seed, pooling)")
    p.add_argument("--e2e-book", action="store_true",
                   help="with --e2e: also the book's literal run: uncached, padded to longest, pooling last")
    p.add_argument("--e2e-max-steps", type=int, default=None, help="cut the e2e runs short (tests)")
    p.add_argument("--peers", action="store_true", help="also measure the PyTorch peers (needs torch)")
    p.add_argument("--no-peer-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--no-peer-bf16", action="store_true",
                   help="skip the bfloat16 peers (autocast, and the inference-only bfloat16-weights ones)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 steps, 1 warm-up, inference batches 1 and 8 once, a 128^3 probe")
    p.add_argument("--threads", type=int, default=None, help="cores for JAX and torch (default: all usable)")
    p.add_argument("--probe-n", type=int, default=4096, help="matmul size of the peak probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(system.RESULTS), help="append one JSON record here")
    p.add_argument("--markdown", default=None, help="write a Markdown report here")
    p.add_argument("--plot", default=None, help="write a bar-chart PNG here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.infer_steps, args.probe_n = 2, 1, 1, 128
        args.infer_batches = "1,8"
    return args


def run(args, log=print) -> dict:
    """One benchmark run -> its record (also appended to args.results when set)."""
    from benchmarks import e2e, measure, peers
    from jaxcls.train.freeze import first_trainable_block

    threads = args.threads or system.usable_cores()
    cfg = measure.model_config(args.size, args.dtype)
    if args.seq_len > cfg.n_ctx:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds {args.size}'s n_ctx {cfg.n_ctx}")
    record = {"schema": 1, "command": "python -m benchmarks.throughput " + " ".join(sys.argv[1:])
              if __name__ == "__main__" else f"run({vars(args)})",
              "args": dict(vars(args)), "system_info": system.system_info(threads, torch=args.peers),
              "config": {**cfg.hparams(), "dtype": cfg.dtype}}
    log(f"peak probe ({args.probe_n}^3 {args.dtype} matmul)")
    probe = system.matmul_peak(args.dtype, args.probe_n)
    sheet = system.datasheet_peak(record["system_info"]["device_kind"], args.dtype)
    record["peak"] = {"measured_flops_per_s": probe["flops_per_s"], "probe": probe["probe"],
                      "datasheet_flops_per_s": sheet}
    peak = probe["flops_per_s"]
    log(f"train step: {args.size} {args.trainable} {args.batch}x{args.seq_len}")
    tr = measure.measure_train(cfg, trainable=args.trainable, batch=args.batch, seq_len=args.seq_len,
                       steps=args.steps, warmup=args.warmup, seed=args.seed, peak_flops=peak)
    if sheet:
        tr["mfu_datasheet"] = tr["achieved_flops_per_s"] / sheet
    record["train"] = tr
    start = first_trainable_block(args.trainable, cfg.n_layer)
    if not args.no_cached and start:
        log("train step with the frozen prefix cached")
        record["train_cached"] = measure.measure_train(
            cfg, trainable=args.trainable, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
            warmup=args.warmup, seed=args.seed, cached_prefix=True, peak_flops=peak)
    batches = [int(b) for b in str(args.infer_batches).split(",") if b.strip()]
    record["infer"] = []
    for b in batches:
        log(f"inference batch {b}")
        record["infer"].append(measure.measure_infer(cfg, batch=b, seq_len=args.seq_len, steps=args.infer_steps,
                                             seed=args.seed, peak_flops=peak))
    if args.peers:
        record["peers"] = peers.run_peers(cfg, trainable=args.trainable, batch=args.batch, seq_len=args.seq_len,
                                    steps=args.steps, warmup=args.warmup, infer_batches=batches,
                                    infer_steps=args.infer_steps, threads=threads,
                                    compile=not args.no_peer_compile, bf16=not args.no_peer_bf16, log=log)
    if args.e2e:
        record["e2e"] = []
        log("end to end: jaxcls defaults")
        record["e2e"].append(e2e.run_e2e(args.size, dtype=args.dtype, max_steps=args.e2e_max_steps,
                                     trainable=args.trainable))
        if args.e2e_uncached:
            log("end to end: uncached, padded to longest")
            record["e2e"].append(e2e.run_e2e(args.size, dtype=args.dtype, uncached=True,
                                         max_steps=args.e2e_max_steps, trainable=args.trainable))
            a, b = (r["test_accuracy"] for r in record["e2e"][:2])
            record["e2e_accuracy_difference"] = a - b
        if args.e2e_book:
            log("end to end: the book's literal shape (uncached, padded to longest, pooling last)")
            record["e2e"].append(e2e.run_e2e(args.size, dtype=args.dtype, uncached=True, book_pooling=True,
                                         max_steps=args.e2e_max_steps, trainable=args.trainable))
        record["e2e"] += e2e.peer_estimates(record.get("peers") or {})
    # Probe again at the end and keep the better: on a shared machine one probe can land in a
    # busy moment and make MFU exceed 100%.
    log("peak probe again")
    again = system.matmul_peak(args.dtype, args.probe_n)["flops_per_s"]
    record["peak"]["measured_flops_per_s_runs"] = [peak, again]
    if again > peak:
        record["peak"]["measured_flops_per_s"] = peak = again
        rows = [record["train"], record.get("train_cached")] + record["infer"]
        for r in rows + (record.get("peers") or {}).get("train", []):
            if r and r.get("achieved_flops_per_s"):
                r["mfu"] = r["achieved_flops_per_s"] / peak
    system.append_record(args.results, record)
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(record))
    if args.plot:
        why = report.plot(record, args.plot)
        if why:
            log(why)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    record = run(args, log)
    print(report.markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
