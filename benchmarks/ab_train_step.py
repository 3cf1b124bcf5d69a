"""Interleaved A/B of the fixed-shape train step (gpt2-small, last_block, batch 8 x 120), or with
`--infer` of fixed-shape inference (the predictor's step; peers in eval mode, bfloat16-weights
configurations included): jaxcls
(float32, and in bfloat16 where `--dtype auto` picks it: MKL's GEMM on a CPU with AMX or AVX512-BF16)
and every PyTorch peer configuration (the book's model and transformers'
GPT2ForSequenceClassification, eager and under torch.compile, in float32 and under bfloat16 CPU
autocast) take turns, round after round (the order rotating), so that a shared machine's drifting
load hits all of them alike.

    .venv-bench/bin/python -m benchmarks.ab_train_step --rounds 5 --steps 5    # from the repo root
    .venv-bench/bin/python -m benchmarks.ab_train_step --size tiny --seq-len 16 --quick   # smoke
    .venv-bench/bin/python -m benchmarks.ab_train_step --infer --batch 64 --peers hf-transformers-compile-bf16-weights

Each round times `--steps` steps of each system after a warm-up and keeps their median. The record
(appended to benchmarks/results.jsonl) has every step time, each system's median over rounds with
min and max, and each jaxcls configuration's speed-up over each peer and over the fastest peer: per
round (peer's round median / jaxcls's) and the median and range of those."""

import argparse
import sys

from benchmarks import system

COMMAND = "python -m benchmarks.ab_train_step"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=120)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16-autocast peers")
    p.add_argument("--no-jaxcls-auto", action="store_true",
                   help="jaxcls in float32 only (by default also in the dtype --dtype auto picks, when not float32)")
    p.add_argument("--quick", action="store_true", help="a smoke run: one round of one step each")
    p.add_argument("--infer", action="store_true", help="time inference instead of the train step")
    p.add_argument("--peers", default=None, metavar="NAMES",
                   help="comma-separated peer systems to keep (e.g. hf-transformers-compile-bf16-weights)")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    from benchmarks import measure
    from benchmarks import torch_peers as peers
    from benchmarks.peers import peer_config

    threads = args.threads or system.usable_cores()
    info = system.system_info(threads, torch=True)  # the load before the run
    cfg = measure.model_config(args.size)
    pc = peer_config(cfg)
    shape = dict(batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=1)
    if args.infer:
        ours_fn, peer_fn, mode = measure.measure_infer, peers.measure_infer, "infer"
    else:
        shape["trainable"] = "last_block"
        ours_fn, peer_fn, mode = measure.measure_train, peers.measure_train, "train"
    systems = {"jaxcls": lambda: ours_fn(cfg, **shape)}
    from jaxcls.cpu_gemm import decide_dtype

    auto, why = decide_dtype("auto", width=cfg.n_embd)  # as `jaxcls train` decides for this model
    if auto != "float32" and not args.no_jaxcls_auto:
        systems[f"jaxcls-{auto}"] = lambda: ours_fn(cfg.replace(dtype=auto), **shape)
    ours = list(systems)
    keep = None if args.peers is None else set(args.peers.split(","))
    configs = peers.peer_configs(compile=not args.no_compile, bf16=not args.no_bf16, infer=args.infer)
    if keep is not None and keep - {c.system for c in configs}:  # jaxcls's own names are not peers
        raise SystemExit(f"ab_train_step: unknown peer systems {sorted(keep - {c.system for c in configs})}")
    for c in configs:
        if keep is None or c.system in keep:
            systems[c.system] = (lambda c=c: peer_fn(c.impl, pc, threads=threads, compile=c.compile,
                                                     dtype=c.dtype, **shape))
    names = list(systems)
    runs = {k: [] for k in names}
    failed = {}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            if name in failed:
                continue
            r = systems[name]()
            if "error" in r:  # a compile or bfloat16 configuration this machine cannot run
                failed[name] = r["error"]
                print(f"{name} failed, left out: {r['error']}", file=sys.stderr, flush=True)
                continue
            runs[name].append({"round": rnd, "step_time_s_median": r["step_time_s_median"],
                               "step_times_s": r["step_times_s"]})
        print(f"round {rnd}: " + ", ".join(f"{k} {v[-1]['step_time_s_median']:.3f}s" for k, v in runs.items() if v),
              flush=True)
    runs = {k: v for k, v in runs.items() if k not in failed}
    names = [k for k in names if k not in failed]
    med = {k: [r["step_time_s_median"] for r in v] for k, v in runs.items()}
    summary = {k: system.spread(v) for k, v in med.items()}
    peer_names = [k for k in names if k not in ours]
    fastest = min(peer_names, key=lambda k: summary[k]["median"])
    speedups = {o: {k: system.spread([p / j for p, j in zip(med[k], med[o])]) for k in peer_names}
                for o in ours if o in med}
    speedup = speedups["jaxcls"]
    record = {"kind": "ab_train_step", "mode": mode, "command": f"{COMMAND} {' '.join(sys.argv[1:] if argv is None else argv)}",
              "size": args.size, "dtype": "float32", "dtypes": {o: o.partition("-")[2] or "float32" for o in ours}, **shape, "failed": failed, "rounds": args.rounds, "threads": threads,
              "system_info": info, "runs": runs, "step_time_s": summary,
              "jaxcls_speedup": speedup, "fastest_peer": fastest,
              "jaxcls_speedup_vs_fastest_peer": speedup[fastest], "dtype_auto": {"used": auto, "why": why},
              "speedup_vs_fastest_peer": {o: sp[fastest] for o, sp in speedups.items()}}
    system.append_record(args.results, record)
    print(f"CPU: {info['cpu_kind']}")
    print(f"median step over {args.rounds} rounds (min-max): " + "; ".join(
        f"{k} {s['median']:.3f}s ({s['min']:.3f}-{s['max']:.3f})" for k, s in summary.items()))
    for o, sp in speedups.items():
        print(f"{o} speed-up per round, median (min-max): " + "; ".join(
            f"vs {k} {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" for k, s in sp.items())
              + f"; fastest peer: {fastest}")
    return record


if __name__ == "__main__":
    main()
