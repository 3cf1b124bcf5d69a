"""Run rows of the book's experiment table (chapter 6, additional experiments) with jaxcls and
write a Markdown table of jaxcls's accuracies and wall time next to the book's reported numbers.

    python scripts/reproduce_book.py --rows 1-19 --out book.md            # pretrained weights, GPU
    python scripts/reproduce_book.py --rows 1,2,3 --checkpoint ../shared/fixtures/gpt2-tiny/openai \
        --max-steps 5 --out tiny.md                                        # a smoke run on CPU

The book's numbers are quoted from rasbt/LLMs-from-scratch, ch06/02_bonus_additional-experiments/
README.md (A100, 5 epochs, batch 8, SMS spam). Row 18 (`ignore_index` for padding) changes nothing
for classification, where targets are class ids, never padding: jaxcls runs it as row 1. Rows 11
and 12 use the book's LoRA (appendix E; docs/lora.md), not PEFT's."""

from __future__ import annotations

import argparse
import sys
import time

BOOK = dict(pooling="last", padding="longest")  # the book's literal last token, padded to 120
ROWS = {  # row: (description, ModelSpec/TrainConfig overrides, book train/val/test accuracy %, book minutes)
    1: ("gpt2-small, last_block (the chapter)", {}, (96.63, 99.33, 95.00), 0.28),
    2: ("first token", dict(pooling="first"), (78.46, 80.54, 75.00), 0.28),
    3: ("last layer (head) only", dict(trainable="head"), (78.65, 79.87, 72.00), 0.25),
    4: ("last two blocks", dict(trainable="last_two_blocks"), (98.85, 98.66, 98.33), 0.33),
    5: ("all layers", dict(trainable="all"), (99.62, 96.64, 96.67), 0.69),
    6: ("gpt2-medium", dict(checkpoint="gpt2-medium"), (87.50, 91.28, 84.67), 0.75),
    7: ("gpt2-large", dict(checkpoint="gpt2-large"), (99.52, 98.66, 96.67), 1.50),
    8: ("gpt2-xl", dict(checkpoint="gpt2-xl"), (99.81, 99.81, 98.33), 2.83),
    9: ("gpt2-xl, all layers", dict(checkpoint="gpt2-xl", trainable="all"), (100.00, 98.66, 98.67), 8.12),
    10: ("random weights, all layers", dict(weights="random", trainable="all"), (100.00, 96.64, 93.67), 0.69),
    11: ("LoRA r16 a16 (book style)", dict(trainable="lora", lora_style="book", lora_rank=16, lora_alpha=16.0),
         (100.00, 97.32, 96.67), 0.75),
    12: ("gpt2-xl, LoRA r16 a8 (book style)",
         dict(checkpoint="gpt2-xl", trainable="lora", lora_style="book", lora_rank=16, lora_alpha=8.0),
         (100.00, 98.66, 98.33), 5.79),
    13: ("padded to the context length", dict(padding="context"), (83.08, 87.92, 78.33), 2.46),
    14: ("no padding, batch 1", dict(padding="none", batch_size=1), (100.00, 98.66, 98.00), 1.75),
    15: ("no padding, batch 1 x 8 accumulated", dict(padding="none", batch_size=1, accumulation=8),
         (99.33, 98.66, 98.33), 1.70),
    16: ("last real token (flexible)", dict(pooling="last_real"), (99.42, 98.66, 98.33), 0.30),
    17: ("no causal mask", dict(causal=False), (99.23, 98.66, 95.33), 0.29),
    18: ("ignore_index for padding (= row 1)", {}, (96.63, 99.33, 95.00), 0.28),
    19: ("mean of token embeddings", dict(pooling="mean"), (97.79, 99.33, 96.33), 0.32),
}


def parse_rows(spec: str) -> list[int]:
    rows = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        rows += list(range(int(a), int(b or a) + 1))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the table has 1-{max(ROWS)}")
    return rows


def row_config(row: int, args):
    """(ModelSpec, TrainConfig) of a row: the book's settings, the row's changes, the script's flags."""
    import dataclasses

    from jaxcls.config import ModelSpec, TrainConfig

    overrides = {**BOOK, **ROWS[row][1]}
    if args.checkpoint:  # one checkpoint for every row (e.g. the tiny fixture on CPU)
        overrides["checkpoint"] = args.checkpoint
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    model_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    model = ModelSpec(**{k: v for k, v in overrides.items() if k in model_fields})
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed,
                      **{k: v for k, v in overrides.items() if k not in model_fields})
    return model, cfg


def run_row(row: int, args, splits) -> dict:
    from jaxcls.classifier import Classifier

    model, cfg = row_config(row, args)
    t0 = time.perf_counter()
    clf = Classifier.from_spec(model, splits.label_names, trainable=cfg.trainable, seed=cfg.seed,
                               tokenizer=args.tokenizer)
    report = clf.fit(splits, train_config=cfg, progress=False, log=lambda s: None)
    acc = {k: 100 * v["accuracy"] for k, v in report["splits"].items()}
    return {"row": row, "train": acc.get("train"), "validation": acc.get("validation"),
            "test": acc.get("test"), "minutes": (time.perf_counter() - t0) / 60, "steps": report["steps"]}


def markdown(results: list[dict], note: str) -> str:
    lines = [f"Reproduction of the book's table with jaxcls. {note}", "",
             "| row | setting | jaxcls train / val / test acc | book train / val / test acc | jaxcls min | book min (A100) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        desc, _, book, book_min = ROWS[r["row"]]
        ours = " / ".join(f"{v:.2f}%" for v in (r["train"], r["validation"], r["test"]))
        theirs = " / ".join(f"{v:.2f}%" for v in book)
        lines.append(f"| {r['row']} | {desc} | {ours} | {theirs} | {r['minutes']:.2f} | {book_min:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1-19")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint for every row (default: each row's size)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data", default="sms-spam")
    p.add_argument("--data-path", default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", default="book_table.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from jaxcls.config import DataSpec
    from jaxcls.data import load_spec
    from jaxcls.fileio import atomic_write_text

    splits = load_spec(DataSpec(data=args.data, data_path=args.data_path), seed=args.seed, progress=False)
    results = []
    for row in parse_rows(args.rows):
        results.append(run_row(row, args, splits))
        r = results[-1]
        print(f"row {row:2d}: train {r['train']:.2f}%  val {r['validation']:.2f}%  test {r['test']:.2f}%  "
              f"{r['minutes']:.2f} min", flush=True)
    note = (f"Checkpoint: {args.checkpoint or 'per row'}; epochs {args.epochs}"
            + (f", at most {args.max_steps} steps" if args.max_steps else "") + ".")
    atomic_write_text(args.out, markdown(results, note))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
