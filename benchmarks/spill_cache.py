"""The frozen-prefix cache spilled to disk, on a synthetic set shaped like IMDB: `--n` training
texts of `--seq-len` tokens (25,000 x 256 by default), gpt2-small shapes, random weights, the
book's last-block fine-tuning at batch 8. Reports the cache's size, its build time, one epoch's
time read back from the spilled file, and one uncached epoch's time (timed over `--uncached-steps`
steps and scaled to the epoch's step count). Both epochs' times leave out the first step, which compiles.

    python -m benchmarks.spill_cache                      # the full set (hours on a small CPU)
    python -m benchmarks.spill_cache --fraction 0.004     # 100 texts; sizes and times scale linearly

After the build the file's pages are dropped from the page cache (posix_fadvise DONTNEED), so the
epoch really reads from the disk. See docs/scaling.md for measured figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import system

if __name__ == "__main__":  # before anything imports jax, which sizes the CPU thread pool
    system.pin_threads_from_argv(sys.argv[1:])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2-small", help="a preset: tiny, mini, gpt2-small, ...")
    p.add_argument("--n", type=int, default=25_000, help="training texts of the full set")
    p.add_argument("--fraction", type=float, default=1.0, help="run this fraction of --n texts")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--uncached-steps", type=int, default=5, help="uncached steps timed (after one warm-up)")
    p.add_argument("--cache-dir", default=None, help="where the cache spills (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for XLA")
    p.add_argument("--json", default=None, help="append the record to this JSONL file")
    return p.parse_args(argv)


def _program(size, dtype, n, seq_len, batch, trainable="last_block", **train):
    from flax import nnx

    from benchmarks.measure import model_config, synthetic_splits
    from jaxcls.config import TrainConfig
    from jaxcls.model import GPT2Classifier
    from jaxcls.train import build_program, prepare_data, task_for

    cfg = model_config(size, dtype)
    model = GPT2Classifier(cfg, 2, pooling="last_real", rngs=nnx.Rngs(0))
    splits, encode = synthetic_splits(n, seq_len, cfg.n_vocab)
    tc = TrainConfig(trainable=trainable, padding=str(seq_len), batch_size=batch, epochs=1, **train)
    quiet = lambda s: None  # noqa: E731
    data = prepare_data(model, encode, splits, tc, quiet)
    t0 = time.perf_counter()
    prog, state = build_program(model, data, task_for(splits, tc), tc, quiet)
    return prog, state, data.splits["train"], time.perf_counter() - t0


def _epoch(prog, state, split, steps=None, warmup=0) -> tuple[float, int]:
    """Seconds for the epoch's first `steps` planned steps (all by default) after `warmup`."""
    import jax

    plan = prog.plan(split, 0)
    key = jax.random.PRNGKey(0)
    for g, idx in plan[:warmup]:
        jax.block_until_ready(prog.step(state, split, g, idx, key))
    timed = plan[warmup:warmup + steps] if steps else plan[warmup:]
    t0 = time.perf_counter()
    for g, idx in timed:
        metrics = prog.step(state, split, g, idx, key)
    jax.block_until_ready((state.trainable, metrics))
    return time.perf_counter() - t0, len(timed)


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(args, log=print) -> dict:
    n = max(args.batch, round(args.n * args.fraction))
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as folder:
        prog, state, split, build_s = _program(args.size, args.dtype, n, args.seq_len, args.batch,
                                               cache_budget_mb=0, cache_dir=folder, cache_dtype=args.cache_dtype)
        if prog.cache is None or prog.cache.spill is None:
            raise SystemExit("the cache did not spill")
        file_mib = prog.cache.spill.path.stat().st_size / 2**20
        _drop_page_cache(prog.cache.spill.path)
        timed_s, steps = _epoch(prog, state, split, warmup=1)  # the warm-up step compiles
        spilled_s = timed_s / steps * prog.steps_per_epoch
        prog.close()
    log(f"{n} texts: cache {file_mib:.0f} MiB ({args.cache_dtype}), built in {build_s:.1f}s; "
        f"epoch of {prog.steps_per_epoch} steps from the spilled cache {spilled_s:.1f}s")
    prog_u, state_u, split_u, _ = _program(args.size, args.dtype, n, args.seq_len, args.batch, cache=False)
    timed_s, timed = _epoch(prog_u, state_u, split_u, args.uncached_steps, warmup=1)
    uncached_s = timed_s / timed * prog_u.steps_per_epoch
    log(f"uncached: {timed_s / timed:.2f}s a step -> {uncached_s:.1f}s an epoch of {prog_u.steps_per_epoch} steps")
    scale = args.n / n
    record = {"benchmark": "spill_cache", "size": args.size, "dtype": args.dtype, "cache_dtype": args.cache_dtype,
              "seq_len": args.seq_len, "batch": args.batch, "texts": n, "full_texts": args.n,
              "cache_mib": file_mib, "build_s": build_s, "spilled_epoch_s": spilled_s, "epoch_steps": prog.steps_per_epoch,
              "uncached_step_s": timed_s / timed, "uncached_epoch_s": uncached_s,
              "full_set_estimate": {"cache_mib": file_mib * scale, "build_s": build_s * scale,
                                    "spilled_epoch_s": spilled_s * scale, "uncached_epoch_s": uncached_s * scale}}
    if scale != 1:
        est = record["full_set_estimate"]
        log(f"scaled linearly to {args.n} texts: cache {est['cache_mib'] / 1024:.1f} GiB, build "
            f"{est['build_s'] / 3600:.2f} h, spilled epoch {est['spilled_epoch_s'] / 60:.1f} min, "
            f"uncached epoch {est['uncached_epoch_s'] / 3600:.2f} h")
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    record = run(args)
    if args.json:
        system.append_record(args.json, record, threads=args.threads)
    else:
        print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
