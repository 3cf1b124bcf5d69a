"""Interleaved A/B of the fixed-shape train step (gpt2-small, last_block, batch 8 x 120, float32):
jaxcls, the book's eager PyTorch model and transformers' GPT2ForSequenceClassification take turns,
round after round, so that a shared machine's drifting load hits all three alike.

    .venv-bench/bin/python benchmarks/ab_train_step.py --rounds 3 --steps 5
"""

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import throughput as tp
    import torch_peers as peers

    cfg = tp.model_config(args.size)
    pc = tp.peer_config(cfg)
    times = {"jaxcls": [], "book": [], "hf": []}
    for rnd in range(args.rounds):
        times["jaxcls"].append(tp.measure_train(cfg, trainable="last_block", batch=8, seq_len=120,
                                                steps=args.steps, warmup=1)["step_time_s_median"])
        for impl in ("book", "hf"):
            times[impl].append(peers.measure_train(impl, pc, trainable="last_block", batch=8, seq_len=120,
                                                   steps=args.steps, warmup=1, threads=args.threads)["step_time_s_median"])
        print(f"round {rnd}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median step: jaxcls {med['jaxcls']:.3f}s, book eager {med['book']:.3f}s, HF {med['hf']:.3f}s; "
          f"jaxcls is {med['book'] / med['jaxcls']:.2f}x the book and {med['hf'] / med['jaxcls']:.2f}x HF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
