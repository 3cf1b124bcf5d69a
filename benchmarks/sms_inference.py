"""Classifying the SMS spam test set (300 texts), as each system would be used to do it:

- jaxcls: `Predictor` (identical texts once, the rest sorted by length, consecutive batches each
  padded to the bucket of its longest text, one jitted program per shape, input order restored),
  at the peers' batch size and at its own default (32); compile time reported apart;
- Hugging Face GPT2ForSequenceClassification, three ways: on the book's test loader (every text
  padded to the longest training text, 120 tokens, batch 8: chapter 6's `SpamDataset`); batches in
  file order padded to their own longest text (a DataLoader with dynamic padding); and, its best
  case, texts sorted by length first (what `group_by_length` aims at);
- the book's own GPTModel on the book's test loader (padded to 120).

    .venv-bench/bin/python benchmarks/sms_inference.py --size gpt2-small

Every row also counts the tokens it runs (padding included) and its matmul FLOPs, and the report
ends with a bound: the least work any exact implementation must do (each distinct text at its own
length, the last block at the pooled token only) at the matmul rate the probe measures. No exact
implementation can beat a peer by more than the bound allows.

Random weights (speed does not depend on them); same threads for all. Prints a Markdown table and
appends a JSON record to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOK_PAD = 120  # the longest training text of the book's balanced SMS split, in GPT-2 tokens


def texts_and_encoder():
    from jaxcls.data import load_sms_spam
    from jaxcls.tokenizer import encode, encoding_from_files
    from throughput import DEFAULT_SMS, DEFAULT_TOKENIZER

    splits = load_sms_spam(DEFAULT_SMS, progress=False)
    enc = encoding_from_files(DEFAULT_TOKENIZER / "vocab.bpe", DEFAULT_TOKENIZER / "encoder.json")
    return list(splits.test.texts), lambda t: encode(enc, t)


def _median(times):
    return sorted(times)[len(times) // 2]


def time_jaxcls(cfg, texts, encode, batch: int, repeats: int) -> dict:
    from flax import nnx

    from jaxcls.model import GPT2Classifier
    from jaxcls.infer.predictor import Predictor
    from throughput import forward_flops

    pred = Predictor(GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)), encode, batch_size=batch)
    shapes = []
    run = pred._run
    pred._run = lambda ids, lens: (shapes.append(ids.shape), run(ids, lens))[1]
    t0 = time.perf_counter()
    pred.logits(texts)  # compiles the shapes these texts use
    first = time.perf_counter() - t0
    flops = sum(forward_flops(cfg, b, t) for b, t in shapes)
    pred._run = run
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.logits(texts)
        times.append(time.perf_counter() - t0)
    return {"system": f"jaxcls Predictor, batch {batch}", "seconds": _median(times), "first_call_s": first,
            "compiles": pred.num_compiles, "tokens_run": sum(b * t for b, t in shapes),
            "flops": flops}


def time_torch(impl: str, cfg, texts, encode, batch: int, repeats: int, threads: int, *,
               fixed: int | None = None, sort: bool = False) -> dict:
    import torch
    import torch_peers as tp

    from throughput import forward_flops, peer_config

    torch.set_num_threads(threads)
    model = tp.build_model(impl, peer_config(cfg), seed=0).eval()
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

    def run_once():
        with torch.inference_mode():
            for ids, mask in batches:
                if impl == "hf":
                    model(input_ids=ids, attention_mask=mask).logits
                else:
                    model(ids)[:, -1, :]

    run_once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    how = (f"the book's test loader (padded to {fixed})" if fixed else
           "sorted by length, each batch padded to its longest" if sort else
           "file order, each batch padded to its longest")
    name = ("HF GPT2ForSequenceClassification" if impl == "hf" else "book GPTModel") + f", {how}, batch {batch}"
    return {"system": name, "seconds": _median(times), "tokens_run": sum(ids.numel() for ids, _ in batches),
            "flops": sum(forward_flops(cfg, ids.shape[0], ids.shape[1], single_token=False) for ids, _ in batches)}


def least_work(cfg, texts, encode, max_length: int) -> tuple[int, int]:
    """(real tokens, matmul FLOPs) of every distinct text at its own length, no padding."""
    from throughput import forward_flops

    seqs = {tuple(encode(t)[:max_length]) or (50256,) for t in texts}
    return sum(map(len, seqs)), sum(forward_flops(cfg, 1, len(s)) for s in seqs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--batch", type=int, default=8, help="the peers' batch size (jaxcls runs it and 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--probe-n", type=int, default=4096, help="matmul size of the peak probe")
    p.add_argument("--no-book", action="store_true", help="skip the two padded-to-120 rows (the slowest)")
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import jax

    from jaxcls.config import preset
    from throughput import matmul_peak, usable_cores

    threads = args.threads or usable_cores()
    cfg = preset(args.size)
    texts, encode = texts_and_encoder()
    peak = matmul_peak("float32", args.probe_n)["flops_per_s"]
    rows = [time_jaxcls(cfg, texts, encode, args.batch, args.repeats)]
    if args.batch != 32:
        rows.append(time_jaxcls(cfg, texts, encode, 32, args.repeats))
    try:
        kw = dict(texts=texts, encode=encode, batch=args.batch, repeats=args.repeats, threads=threads)
        rows.append(time_torch("hf", cfg, **kw))
        rows.append(time_torch("hf", cfg, sort=True, **kw))
        if not args.no_book:
            rows.append(time_torch("hf", cfg, fixed=BOOK_PAD, **kw))
            rows.append(time_torch("book", cfg, fixed=BOOK_PAD, **kw))
    except ImportError as e:
        print(f"peers skipped: {e}", file=sys.stderr)
    peak = max(peak, matmul_peak("float32", args.probe_n)["flops_per_s"])  # the better of two probes
    tokens, flops = least_work(cfg, texts, encode, cfg.n_ctx)
    bound_s = flops / peak
    base = rows[0]["seconds"]
    print(f"SMS test set, {len(texts)} texts ({tokens} tokens in distinct texts), {args.size}, float32, "
          f"{threads} threads, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"matmul probe {peak / 1e9:.0f} GFLOP/s\n")
    print("| system | seconds | texts/s | tokens run | GFLOP | GFLOP/s | time / jaxcls (batch "
          f"{args.batch}) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["texts_per_s"] = len(texts) / r["seconds"]
        print(f"| {r['system']} | {r['seconds']:.2f} | {r['texts_per_s']:.1f} | {r['tokens_run']} | "
              f"{r['flops'] / 1e9:.0f} | {r['flops'] / r['seconds'] / 1e9:.0f} | {r['seconds'] / base:.2f}x |")
    print(f"\njaxcls compiled {rows[0]['compiles']} shapes; its first call took {rows[0]['first_call_s']:.1f}s.")
    print(f"Bound: the least exact work is {flops / 1e9:.0f} GFLOP ({tokens} tokens); at the probe's "
          f"{peak / 1e9:.0f} GFLOP/s that is {bound_s:.2f}s, so no exact float32 implementation on this "
          "machine can be faster than " + ", ".join(f"{r['seconds'] / bound_s:.1f}x {r['system']}"
                                                    for r in rows if not r["system"].startswith("jaxcls")) + ".")
    record = {"kind": "sms_inference", "size": args.size, "batch": args.batch, "threads": threads,
              "date": time.strftime("%Y-%m-%d"), "peak_flops_per_s": peak,
              "least_work": {"tokens": tokens, "flops": flops, "seconds_at_peak": bound_s}, "rows": rows}
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
