"""The transformers peer of `jaxcls classify`, as a whole command: what a transformers user writes to
label a file of texts with a GPT2ForSequenceClassification folder, run as its own process so that
benchmarks/first_run.py can time it (imports, loading, tokenizing, the model, writing the output)
beside the whole `jaxcls classify` command on the same texts.

    python -m benchmarks.hf_classify --model HF_FOLDER --input TEXTS.txt --output OUT.csv \\
        --dtype float32|autocast|bfloat16 [--batch-size 8] [--threads N]

HF_FOLDER is what `jaxcls export --model RUN_FOLDER HF_FOLDER` writes. The input is read as
`jaxcls classify` reads a .txt file (a text per line, blank lines skipped). The texts are tokenized,
cut to the model's n_positions (or the tokenizer's model_max_length if less, as jaxcls cuts them),
sorted by length and run in batches padded to each batch's longest text with an attention mask
(the peer's fastest way to feed them), under `torch.inference_mode`: in float32, under bfloat16
autocast, or with the weights cast to bfloat16 (`bfloat16`). The CSV (columns text, label; label
names from the config's id2label) keeps the input order and is written to a temporary name, then
renamed into place. torch keeps its own default thread count unless --threads is given."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("float32", "autocast", "bfloat16")


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def write_csv(path: str, texts: list[str], labels: list[str]) -> None:
    folder = Path(path).resolve().parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hf_classify-", suffix=".csv")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(zip(texts, labels))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a GPT2ForSequenceClassification folder (`jaxcls export`)")
    p.add_argument("--input", required=True, help="a text per line")
    p.add_argument("--output", required=True, help="the CSV to write (text, label)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="autocast: bfloat16 autocast over float32 weights; bfloat16: the weights cast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    import torch
    from transformers import GPT2ForSequenceClassification, GPT2TokenizerFast

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = GPT2TokenizerFast.from_pretrained(args.model)
    model = GPT2ForSequenceClassification.from_pretrained(args.model).eval()
    if args.dtype == "bfloat16":
        model.to(torch.bfloat16)
    config = model.config
    texts = read_texts(args.input)
    ids = tok(texts, truncation=True, max_length=min(tok.model_max_length, config.n_positions))["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predicted = [0] * len(ids)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "autocast"):
        for start in range(0, len(order), args.batch_size):
            rows = order[start:start + args.batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            for i, label in zip(rows, model(input_ids=x, attention_mask=mask).logits.argmax(-1).tolist()):
                predicted[i] = label
    write_csv(args.output, texts, [config.id2label[i] for i in predicted])
    print(f"hf_classify: {len(texts)} texts, {args.dtype}, {torch.get_num_threads()} torch threads, "
          f"{time.perf_counter() - t0:.1f}s from the imports to the CSV", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
