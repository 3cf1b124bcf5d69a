"""Run the experiments behind docs/seven-questions.md through the real `jaxcls train` command and
write a Markdown table of jaxcls's accuracies next to the book's.

    python scripts/seven_questions.py --out seven.md                       # every experiment, mini preset
    python scripts/seven_questions.py --only baseline,first --seeds 123,124 --out two.md
    python scripts/seven_questions.py --only baseline --preset tiny --max-steps 2 --out smoke.md
    python scripts/seven_questions.py --print-commands                     # the commands, nothing run

Every run starts from random weights (a preset: no download), so the numbers answer how each choice
behaves on the SMS data without pretraining; the book's numbers are gpt2-small's and larger
checkpoints' pretrained weights. The book's rows come from scripts/reproduce_book.py, which quotes
rasbt/LLMs-from-scratch ch06/02_bonus_additional-experiments/README.md."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_book import ROWS as BOOK_ROWS  # noqa: E402  (the book's numbers, quoted once)

# What every experiment shares: the book's random-weights row (10) on a random-init preset, the book's
# literal last token over padding to the longest training text, and mini's learning rate.
BASE = {"--data": "sms-spam", "--checkpoint": "mini", "--weights": "random", "--trainable": "all",
        "--pooling": "last", "--padding": "longest", "--lr": "5e-4"}


class Experiment(NamedTuple):
    name: str
    question: int
    setting: str
    changes: dict  # flag -> value (None: a switch such as --no-causal), applied over BASE
    book_row: int


EXPERIMENTS = (
    Experiment("baseline", 1, "all layers, last token, padded to the longest (book row 10's recipe)", {}, 10),
    Experiment("head", 1, "head only", {"--trainable": "head"}, 3),
    Experiment("last-block", 1, "last block + head", {"--trainable": "last_block"}, 1),
    Experiment("last-two", 1, "last two blocks + head", {"--trainable": "last_two_blocks"}, 4),
    Experiment("first", 2, "first token", {"--pooling": "first"}, 2),
    Experiment("mean", 2, "mean over real tokens", {"--pooling": "mean"}, 19),
    Experiment("no-causal", 4, "no causal mask", {"--no-causal": None}, 17),
    Experiment("tiny", 5, "smaller model: tiny (2 layers, 16 wide, 64-token context)",
               {"--checkpoint": "tiny"}, 10),
    Experiment("lora", 6, "book-style LoRA r16 a16 on the frozen random base",
               {"--trainable": "lora", "--lora-style": "book", "--lora-rank": "16", "--lora-alpha": "16"}, 11),
    Experiment("context", 7, "padded to the context length (mini: 256)", {"--padding": "context"}, 13),
    Experiment("last-real", 7, "padded to the longest, last real token", {"--pooling": "last_real"}, 16),
    Experiment("no-padding", 7, "no padding, batch 1, 8 accumulated",
               {"--padding": "none", "--batch-size": "1", "--accumulation": "8"}, 15),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}


def flags(exp: Experiment, *, epochs: int, seed: int, preset: str | None = None,
          max_steps: int | None = None) -> list[str]:
    """The `jaxcls train` words of one run: BASE with the experiment's changes, then the run's length
    and seed; `preset` replaces the checkpoint of every experiment (the smoke test's tiny)."""
    merged = {**BASE, **exp.changes, "--epochs": str(epochs), "--seed": str(seed)}
    if preset:
        merged["--checkpoint"] = preset
    if max_steps:
        merged["--max-steps"] = str(max_steps)
    words = ["train"]
    for flag, value in merged.items():
        words += [flag] if value is None else [flag, value]
    return words


def run(words: list[str], out: Path) -> dict:
    """One `jaxcls train` in this process; its metrics.json, or SystemExit naming the command."""
    from jaxcls.cli import main as jaxcls_main

    rc = jaxcls_main([*words, "--out", str(out), "--quiet", "--overwrite"])
    if rc != 0:
        raise SystemExit(f"seven_questions: `jaxcls {' '.join(words)}` exited with {rc}")
    return json.loads((out / "metrics.json").read_text())


def summary(name: str, reports: list[dict], seeds: list[int], minutes: float) -> dict:
    acc = {split: [100 * r["splits"][split]["accuracy"] for r in reports]
           for split in ("train", "validation", "test")}
    return {"name": name, "seeds": seeds, "minutes": minutes, "steps": reports[0]["steps"],
            "trainable": reports[0]["trainable_params"], "total": reports[0]["total_params"],
            **{split: values for split, values in acc.items()}}


def cell(values: list[float]) -> str:
    mean = f"{statistics.fmean(values):.2f}%"
    return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.2f}' for v in values)})"


def markdown(results: list[dict], note: str) -> str:
    lines = [note, "",
             "| Q | experiment | changes to the baseline | jaxcls train / val / test acc | trainable params | "
             "min | book row: test acc (pretrained, A100) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        exp = BY_NAME[r["name"]]
        changes = " ".join(k if v is None else f"{k} {v}" for k, v in exp.changes.items()) or "(none)"
        book_desc, _, book_acc, _ = BOOK_ROWS[exp.book_row]
        accs = " / ".join(cell(r[s]) for s in ("train", "validation", "test"))
        lines.append(f"| {exp.question} | {exp.setting} | `{changes}` | {accs} | {r['trainable']:,} of "
                     f"{r['total']:,} | {r['minutes']:.1f} | {exp.book_row} ({book_desc}): {book_acc[2]:.2f}% |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BY_NAME), help=f"experiments to run, of {', '.join(BY_NAME)}")
    p.add_argument("--seeds", default="123", help="comma-separated seeds; each experiment runs once per seed")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--preset", choices=("tiny", "mini"), default=None,
                   help="run every experiment on this preset (default: each experiment's own)")
    p.add_argument("--runs-dir", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--out", default="seven_questions.md")
    p.add_argument("--print-commands", action="store_true", help="print each jaxcls command and exit")
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in BY_NAME]
    if unknown:
        p.error(f"--only: unknown experiments {unknown}; known: {', '.join(BY_NAME)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    return args


def main(argv=None) -> int:
    from jaxcls.fileio import atomic_write_text

    args = parse_args(argv)
    length = dict(epochs=args.epochs, preset=args.preset, max_steps=args.max_steps)
    if args.print_commands:
        for name in args.only:
            print("jaxcls " + " ".join(flags(BY_NAME[name], seed=args.seeds[0], **length)))
        return 0
    note = (f"Random-init presets on SMS spam (the book's split), {args.epochs} epochs"
            + (f", at most {args.max_steps} steps" if args.max_steps else "")
            + f", seeds {', '.join(map(str, args.seeds))}. Baseline: `jaxcls "
            + " ".join(flags(BY_NAME["baseline"], seed=args.seeds[0], **length)) + "`.")
    results = []
    with tempfile.TemporaryDirectory(prefix="seven-") as tmp:
        runs = Path(args.runs_dir or tmp)
        for name in args.only:
            t0, reports = time.perf_counter(), []
            for seed in args.seeds:
                reports.append(run(flags(BY_NAME[name], seed=seed, **length), runs / f"{name}-{seed}"))
            results.append(summary(name, reports, args.seeds, (time.perf_counter() - t0) / 60))
            r = results[-1]
            print(f"{name}: test {cell(r['test'])}, {r['minutes']:.1f} min", flush=True)
            atomic_write_text(args.out, markdown(results, note))  # a partial table survives an interrupt
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
