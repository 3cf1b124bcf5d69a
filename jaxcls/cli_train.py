"""`jaxcls train`: one flag per TrainConfig field, generated from the dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from pathlib import Path

from jaxcls.config import TrainConfig

HELP = {
    "checkpoint": "checkpoint folder, released size (gpt2-small/124M, ...), or tiny/mini (random init)",
    "weights": "pretrained | random",
    "data": "sms-spam, or a CSV/TSV/JSONL training file",
    "data_path": "a local SMSSpamCollection (or its zip) for --data sms-spam",
    "pooling": "last_real | last (the book) | first | mean",
    "trainable": "head (book: last_layer) | last_block | last_two_blocks | last_k_blocks:K | all | lora | a regex",
    "padding": "auto | longest (the book) | context | buckets | none | N",
    "batching": "with length buckets: auto (global when the frozen prefix is cached, else buckets) | "
                "buckets (each batch from one length bucket: least padding) | global (the book's shuffle, "
                "each batch padded to the bucket of its longest text)",
    "accumulation": "micro-batches of --batch-size per optimizer update",
    "class_weights": "none | balanced | w0,w1,...",
    "cache": "reuse frozen-prefix activations across epochs (exact; off for lora/all/dropout)",
    "cache_dtype": "cached states stored as auto (the compute dtype) | float32 (exact) | bfloat16 (half the memory)",
    "cache_budget_mb": "host memory the frozen-prefix cache may take; over it, training runs uncached",
    "cache_memory": "host | device: keep cached states in device memory (one device), so batches are built there",
    "out": "run folder: metrics, resumable state, the saved classifier (default runs/<data>)",
}


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune GPT-2 as a classifier",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP.get(f.name))
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        p.add_argument(flag, type=base if base in (int, float) else str, default=f.default,
                       help=HELP.get(f.name, ""))
    p.add_argument("--resume", action="store_true", help="continue from the last save in --out")
    p.add_argument("--tokenizer", default=None, help="folder with encoder.json + vocab.bpe (default: the checkpoint's)")
    p.add_argument("--quiet", action="store_true")
    multi = p.add_argument_group("multi-host (see docs/scaling.md)")
    multi.add_argument("--distributed", action="store_true",
                       help="join the job JAX detects itself (Cloud TPU pod slice, SLURM, Open MPI)")
    multi.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, default=None)
    multi.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jaxcls.classifier import Classifier
    from jaxcls.data import load_data

    if args.distributed or args.coordinator or args.num_processes:
        from jaxcls.train import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = Path(cfg.out or f"runs/{Path(cfg.data).stem}")
    cfg = cfg.replace(out=str(out))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    kw = dict(path=cfg.data_path) if cfg.data in ("sms-spam", "sms_spam") else dict(
        validation=cfg.validation, test=cfg.test, text_column=cfg.text_column,
        label_column=cfg.label_column, seed=cfg.seed)
    splits = load_data(cfg.data, progress=not args.quiet, **kw)
    log(f"data: train {len(splits.train)}, validation {len(splits.validation or ())}, "
        f"test {len(splits.test or ())}; labels {list(splits.label_names)}")
    clf = Classifier.from_pretrained(
        cfg.checkpoint, label_names=splits.label_names, trainable=cfg.trainable, pooling=cfg.pooling,
        weights=cfg.weights, seed=cfg.seed, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        dtype=cfg.dtype, causal=cfg.causal, dropout=cfg.dropout, tokenizer=args.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    report = clf.fit(splits, train_config=cfg, out=out, resume=args.resume, progress=not args.quiet, log=log)
    from jaxcls.train.distributed import is_main_process

    if not is_main_process():
        return 0  # process 0 writes the classifier and the metrics
    report["wall_time_total_s"] = time.perf_counter() - t0
    report["config"] = dataclasses.asdict(cfg)
    clf.save(out, full=cfg.save_full)
    from jaxcls.fileio import atomic_write_json

    atomic_write_json(out / "metrics.json", report)
    plot_curves(out)
    if not args.quiet:
        print_summary(report)
        print(f"saved to {out}")
    return 0


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accuracy")
    for col in ("split", "n", "accuracy", "loss", "macro F1"):
        table.add_column(col)
    for name, r in report["splits"].items():
        table.add_row(name, str(r["n"]), f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}", f"{r['macro_f1']:.3f}")
    Console().print(table)
    print(f"{report['steps']} steps in {report['wall_time_s']:.1f}s "
          f"(padding {report['padding']}, batching {report['batching']}, "
          f"prefix cache {'on' if report['cached_prefix'] else 'off'})")


def plot_curves(out: Path) -> Path | None:
    """loss.png and accuracy.png from metrics.jsonl, when matplotlib is installed (an extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "train_loss" in r]
    epochs = [r for r in rows if "train_acc" in r]
    from jaxcls.fileio import atomic_open

    for name, series, x in (("loss", (("train_loss", steps), ("val_loss", steps)), "examples_seen"),
                            ("accuracy", (("train_acc", epochs), ("val_acc", epochs)), "epoch")):
        fig, ax = plt.subplots(figsize=(5, 3))
        for key, rs in series:
            pts = [(r[x], r[key]) for r in rs if r.get(key) is not None and x in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(name)
        ax.legend()
        fig.tight_layout()
        with atomic_open(out / f"{name}.png", "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
    return out / "loss.png"
