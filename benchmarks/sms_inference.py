"""Classifying the SMS spam test set (300 texts), as each system would be used to do it:

- jaxcls: `Predictor` (identical texts once, the rest sorted by length, consecutive batches each
  padded to the bucket of its longest text, one jitted program per shape, input order restored),
  at the peers' batch size and at its own default (32); compile time reported apart;
- Hugging Face GPT2ForSequenceClassification, three ways: on the book's test loader (every text
  padded to the longest training text, 120 tokens, batch 8: chapter 6's `SpamDataset`); batches in
  file order padded to their own longest text (a DataLoader with dynamic padding); and, its best
  case, texts sorted by length first (what `group_by_length` aims at); the last two also under
  `torch.autocast("cpu", dtype=torch.bfloat16)`, several times faster on CPUs with AMX, and the
  sorted one also with its weights cast to bfloat16 (`model.to(torch.bfloat16)`, no autocast:
  pure bfloat16 inference, faster still there);
- the book's own GPTModel on the book's test loader (padded to 120), in float32, under bfloat16
  autocast and with bfloat16 weights.

torch.compile is left out here: the batches have many shapes, each a recompile.

    .venv-bench/bin/python -m benchmarks.sms_inference --size gpt2-small    # from the repo root

Every row also counts the tokens it runs (padding included) and its matmul FLOPs, and the report
ends with a bound: the least work any exact implementation must do (each distinct text at its own
length, the last block at the pooled token only) at the matmul rate the probe measures. No exact
implementation can beat a peer by more than the bound allows.

The systems take turns, round after round (`--repeats` rounds, the order rotating), so that a
shared machine's drifting load hits all alike; each row's time is the median over rounds with its
min and max, and each peer's speed-up is jaxcls's (batch 8) per round, median and range.
Random weights (speed does not depend on them); same threads for all. Prints a Markdown table and
appends a JSON record (system info included) to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import system
from benchmarks.flops import forward_flops

BOOK_PAD = 120  # the longest training text of the book's balanced SMS split, in GPT-2 tokens


def texts_and_encoder():
    from jaxcls.data import load_sms_spam
    from jaxcls.tokenizer import encode, encoding_from_files

    splits = load_sms_spam(system.DEFAULT_SMS, progress=False)
    tok = system.DEFAULT_TOKENIZER
    enc = encoding_from_files(tok / "vocab.bpe", tok / "encoder.json")
    return list(splits.test.texts), lambda t: encode(enc, t)


def prepare_jaxcls(cfg, texts, encode, batch: int) -> tuple[dict, callable]:
    """(row, run): the Predictor after its first call, which compiles the shapes these texts use."""
    from flax import nnx

    from jaxcls.model import GPT2Classifier
    from jaxcls.infer.predictor import Predictor

    pred = Predictor(GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)), encode, batch_size=batch)
    shapes = []
    run = pred._run
    pred._run = lambda ids, lens: (shapes.append(ids.shape), run(ids, lens))[1]
    t0 = time.perf_counter()
    pred.logits(texts)
    first = time.perf_counter() - t0
    pred._run = run
    row = {"system": f"jaxcls Predictor, batch {batch}" + ("" if cfg.dtype == "float32" else f", {cfg.dtype}"), "first_call_s": first, "compiles": pred.num_compiles,
           "tokens_run": sum(b * t for b, t in shapes), "flops": sum(forward_flops(cfg, b, t) for b, t in shapes)}
    return row, lambda: pred.logits(texts)


def prepare_torch(impl: str, cfg, texts, encode, batch: int, threads: int, *, fixed: int | None = None,
                  sort: bool = False, dtype: str = "float32") -> tuple[dict, callable]:
    """(row, run) for a PyTorch peer fed as described by `fixed` (pad every text to it) or `sort`,
    computing in `dtype` (bfloat16: CPU autocast; bfloat16-weights: the model cast to bfloat16)."""
    import torch

    from benchmarks import torch_peers as tp
    from benchmarks.peers import peer_config

    torch.set_num_threads(threads)
    model = tp.cast_weights(tp.build_model(impl, peer_config(cfg), seed=0), dtype).eval()
    seqs = [encode(t)[: fixed or cfg.n_ctx] for t in texts]
    if sort:
        seqs.sort(key=len)
    batches = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = fixed or max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tp.PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        batches.append((ids, mask))

    def run(some=None):
        with torch.inference_mode(), tp.autocast(dtype):
            for ids, mask in batches[:some]:
                if impl == "hf":
                    model(input_ids=ids, attention_mask=mask).logits
                else:
                    model(ids)[:, -1, :]

    run(4)  # warm-up: eager PyTorch compiles nothing per shape
    how = (f"the book's test loader (padded to {fixed})" if fixed else
           "sorted by length, each batch padded to its longest" if sort else
           "file order, each batch padded to its longest")
    name = ("HF GPT2ForSequenceClassification" if impl == "hf" else "book GPTModel") + f", {how}, batch {batch}"
    name += {"float32": "", "bfloat16": ", bf16 autocast", tp.BF16_WEIGHTS: ", bf16 weights"}[dtype]
    row = {"system": name, "dtype": dtype, "param_dtype": tp.param_dtype(model),
           "tokens_run": sum(ids.numel() for ids, _ in batches),
           "flops": sum(forward_flops(cfg, ids.shape[0], ids.shape[1], single_token=False) for ids, _ in batches)}
    return row, run


def run_rounds(systems: list[tuple[dict, callable]], rounds: int, log=print) -> None:
    """Time each system's full pass once per round, the order rotating, so that drifting load on a
    shared machine hits all alike; fills each row's `times_s` and `seconds` (their median)."""
    import statistics

    for row, _ in systems:
        row["times_s"] = []
    for rnd in range(rounds):
        k = rnd % len(systems)
        for row, run in systems[k:] + systems[:k]:
            t0 = time.perf_counter()
            run()
            row["times_s"].append(time.perf_counter() - t0)
        log(f"round {rnd}: " + ", ".join(f"{r['times_s'][-1]:.1f}s" for r, _ in systems))
    for row, _ in systems:
        row["seconds"] = statistics.median(row["times_s"])
        row["seconds_min"], row["seconds_max"] = min(row["times_s"]), max(row["times_s"])


def least_work(cfg, texts, encode, max_length: int) -> tuple[int, int]:
    """(real tokens, matmul FLOPs) of every distinct text at its own length, no padding."""
    seqs = {tuple(encode(t)[:max_length]) or (50256,) for t in texts}
    return sum(map(len, seqs)), sum(forward_flops(cfg, 1, len(s)) for s in seqs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--batch", type=int, default=8, help="the peers' batch size (jaxcls runs it and 32)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds: each system once per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--probe-n", type=int, default=4096, help="matmul size of the peak probe")
    p.add_argument("--no-book", action="store_true", help="skip the two padded-to-120 rows (the slowest)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the bfloat16 peer rows (bf16 autocast and bf16 weights)")
    p.add_argument("--quick", action="store_true", help="a smoke run: one round, no padded-to-120 rows, "
                                                        "a 128^3 probe")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="jaxcls's compute dtype (auto: as `jaxcls train --dtype auto` decides on this machine)")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.no_book, args.probe_n = 1, True, 128

    import jax

    from jaxcls.config import preset
    from benchmarks.system import append_record, matmul_peak, spread, system_info, usable_cores

    threads = args.threads or usable_cores()
    info = system_info(threads, torch=True)  # the load before the run
    from jaxcls.cpu_gemm import decide_dtype

    cfg = preset(args.size)
    cfg = cfg.replace(dtype=decide_dtype(args.dtype, width=cfg.n_embd)[0])  # as `jaxcls train` decides
    texts, encode = texts_and_encoder()
    peak = matmul_peak("float32", args.probe_n)["flops_per_s"]
    systems = [prepare_jaxcls(cfg, texts, encode, args.batch)]
    if args.batch != 32:
        systems.append(prepare_jaxcls(cfg, texts, encode, 32))
    try:
        for dtype in ("float32",) + (() if args.no_bf16 else ("bfloat16",)):
            kw = dict(texts=texts, encode=encode, batch=args.batch, threads=threads, dtype=dtype)
            systems.append(prepare_torch("hf", cfg, **kw))
            systems.append(prepare_torch("hf", cfg, sort=True, **kw))
            if not args.no_book:
                systems.append(prepare_torch("hf", cfg, fixed=BOOK_PAD, **kw))
                systems.append(prepare_torch("book", cfg, fixed=BOOK_PAD, **kw))
        if not args.no_bf16:  # inference only: the weights cast to bfloat16, each peer's best case
            kw = dict(texts=texts, encode=encode, batch=args.batch, threads=threads, dtype="bfloat16-weights")
            systems.append(prepare_torch("hf", cfg, sort=True, **kw))
            if not args.no_book:
                systems.append(prepare_torch("book", cfg, fixed=BOOK_PAD, **kw))
    except ImportError as e:
        print(f"peers skipped: {e}", file=sys.stderr)
    run_rounds(systems, args.repeats, log=lambda m: print(m, file=sys.stderr, flush=True))
    rows = [row for row, _ in systems]
    peak = max(peak, matmul_peak("float32", args.probe_n)["flops_per_s"])  # the better of two probes
    tokens, flops = least_work(cfg, texts, encode, cfg.n_ctx)
    bound_s = flops / peak
    base = rows[0]
    peers = [r for r in rows if not r["system"].startswith("jaxcls")]
    for r in peers:  # per round: the peer's time over jaxcls's (batch `args.batch`) in that round
        r["jaxcls_speedup"] = spread([t / b for t, b in zip(r["times_s"], base["times_s"])])
    fastest = min(peers, key=lambda r: r["seconds"]) if peers else None
    print(f"SMS test set, {len(texts)} texts ({tokens} tokens in distinct texts), {args.size}, jaxcls in {cfg.dtype}, "
          f"{threads} threads, {info['cpu_kind']}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"load average {info['load_average']}; matmul probe {peak / 1e9:.0f} GFLOP/s; "
          f"{args.repeats} interleaved rounds\n")
    print("| system | seconds, median (min-max) | texts/s | tokens run | GFLOP | GFLOP/s | jaxcls "
          f"(batch {args.batch}) speed-up, median (min-max) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["texts_per_s"] = len(texts) / r["seconds"]
        sp = r.get("jaxcls_speedup")
        print(f"| {r['system']} | {r['seconds']:.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f}) | "
              f"{r['texts_per_s']:.1f} | {r['tokens_run']} | {r['flops'] / 1e9:.0f} | "
              f"{r['flops'] / r['seconds'] / 1e9:.0f} | "
              + (f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f}) |" if sp else "|"))
    print(f"\njaxcls compiled {base['compiles']} shapes; its first call took {base['first_call_s']:.1f}s.")
    if fastest:
        sp = fastest["jaxcls_speedup"]
        print(f"Fastest peer configuration: {fastest['system']}, {fastest['seconds']:.2f}s; jaxcls (batch "
              f"{args.batch}) runs {sp['median']:.2f}x its speed ({sp['min']:.2f}-{sp['max']:.2f}).")
    print(f"Bound: the least exact work is {flops / 1e9:.0f} GFLOP ({tokens} tokens); at the probe's "
          f"{peak / 1e9:.0f} GFLOP/s that is {bound_s:.2f}s, so no exact float32 implementation on this "
          "machine can be faster than " + ", ".join(f"{r['seconds'] / bound_s:.1f}x {r['system']}"
                                                    for r in peers if r.get("dtype") == "float32") + " (bfloat16 peers do other arithmetic: no bound).")
    record = {"kind": "sms_inference", "command": "python -m benchmarks.sms_inference "
              + " ".join(sys.argv[1:] if argv is None else argv), "size": args.size, "batch": args.batch, "jaxcls_dtype": cfg.dtype,
              "threads": threads, "rounds": args.repeats, "date": time.strftime("%Y-%m-%d"),
              "system_info": info, "peak_flops_per_s": peak,
              "least_work": {"tokens": tokens, "flops": flops, "seconds_at_peak": bound_s}, "rows": rows,
              "fastest_peer": fastest["system"] if fastest else None,
              "jaxcls_speedup_vs_fastest_peer": fastest["jaxcls_speedup"] if fastest else None}
    append_record(args.results, record)
    return record


if __name__ == "__main__":
    main()
