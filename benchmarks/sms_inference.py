"""Classifying the SMS spam test set (300 texts), as each system would be used to do it:

- jaxcls: `Predictor` (texts sorted into length buckets, one jitted step per bucket, input order
  restored); compile time reported apart;
- Hugging Face GPT2ForSequenceClassification: batches in file order, each padded to its own
  longest text, with an attention mask (what a DataLoader with dynamic padding gives);
- the book's loop: every text padded to the longest training text (120 tokens), batch 8.

    .venv-bench/bin/python benchmarks/sms_inference.py --size gpt2-small --batch 8

Random weights (speed does not depend on them); same threads for all. Prints a Markdown table and
appends a JSON record to benchmarks/results.jsonl."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def texts_and_encoder():
    from jaxcls.data import load_sms_spam
    from jaxcls.tokenizer import encode, encoding_from_files

    splits = load_sms_spam(SHARED / "data/sms_spam/SMSSpamCollection", progress=False)
    enc = encoding_from_files(SHARED / "data/gpt2_tokenizer/vocab.bpe", SHARED / "data/gpt2_tokenizer/encoder.json")
    return list(splits.test.texts), lambda t: encode(enc, t)


def time_jaxcls(cfg, texts, encode, batch: int, repeats: int) -> dict:
    from flax import nnx

    from jaxcls.model import GPT2Classifier
    from jaxcls.predict import Predictor

    pred = Predictor(GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)), encode, batch_size=batch)
    t0 = time.perf_counter()
    pred.logits(texts)  # compiles the buckets these texts use
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.logits(texts)
        times.append(time.perf_counter() - t0)
    best = sorted(times)[len(times) // 2]
    return {"system": "jaxcls (buckets)", "seconds": best, "first_call_s": first, "texts_per_s": len(texts) / best,
            "compiles": pred.num_compiles}


def time_torch(impl: str, cfg, texts, encode, batch: int, repeats: int, threads: int, fixed: int | None) -> dict:
    sys.path.insert(0, str(HERE))
    import torch
    import torch_peers as tp

    torch.set_num_threads(threads)
    pc = {"n_vocab": cfg.n_vocab, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
          "n_layer": cfg.n_layer, "drop_rate": 0.0, "qkv_bias": True}
    model = tp.build_model(impl, pc, seed=0).eval()
    seqs = [encode(t)[: fixed or cfg.n_ctx] for t in texts]

    def run_once():
        with torch.inference_mode():
            for i in range(0, len(seqs), batch):
                chunk = seqs[i:i + batch]
                width = fixed or max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), 50256, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, s in enumerate(chunk):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
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
    best = sorted(times)[len(times) // 2]
    name = "HF GPT2ForSequenceClassification (dynamic padding)" if impl == "hf" else f"book GPTModel (padded to {fixed})"
    return {"system": name, "seconds": best, "texts_per_s": len(texts) / best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)

    import os

    import jax

    from jaxcls.config import preset

    threads = args.threads or len(os.sched_getaffinity(0))
    cfg = preset(args.size)
    texts, encode = texts_and_encoder()
    rows = [time_jaxcls(cfg, texts, encode, args.batch, args.repeats)]
    try:
        rows.append(time_torch("hf", cfg, texts, encode, args.batch, args.repeats, threads, None))
        rows.append(time_torch("book", cfg, texts, encode, args.batch, args.repeats, threads, 120))
    except ImportError as e:
        print(f"peers skipped: {e}", file=sys.stderr)
    base = rows[0]["seconds"]
    print(f"SMS test set, {len(texts)} texts, {args.size}, batch {args.batch}, {threads} threads, "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| system | seconds | texts/s | jaxcls speed-up |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['system']} | {r['seconds']:.2f} | {r['texts_per_s']:.1f} | {r['seconds'] / base:.2f}x |")
    print(f"\njaxcls compiled {rows[0]['compiles']} bucket shapes; its first call took {rows[0]['first_call_s']:.1f}s")
    with open(args.results, "a") as f:
        f.write(json.dumps({"kind": "sms_inference", "size": args.size, "batch": args.batch, "threads": threads,
                            "date": time.strftime("%Y-%m-%d"), "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
