"""`jaxcls train`: one flag per field of DataSpec, ModelSpec and TrainConfig, generated from the
dataclasses and grouped in --help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from pathlib import Path

from jaxcls.cli import offline
from jaxcls.config import DataSpec, ModelSpec, TrainConfig
from jaxcls.errors import ConfigError

SPECS = (DataSpec, ModelSpec, TrainConfig)

# Every field of SPECS, by --help group; a field left out here fails test_every_option_has_help_text_and_its_default.
GROUPS: dict[str, dict[str, str]] = {
    "data": {
        "data": "sms-spam (the book's data set, downloaded on first use), imdb (the book's bonus IMDB "
                "reviews, 35,000/5,000/10,000), or a CSV/TSV/JSONL file of "
                "texts and labels, split 70/10/20 (--split) by --seed, stratified by label, unless "
                "--validation/--test are given",
        "data_path": "--data sms-spam or imdb only: a local SMSSpamCollection, its zip or folder; or "
                     "aclImdb_v1.tar.gz or its folder (default: downloaded into the cache)",
        "validation": "a validation file; with --validation or --test, --data is used whole for "
                      "training (default: the seeded split of --data)",
        "test": "a test file, scored once at the end (default: the seeded split of --data)",
        "text_column": 'the column or JSON key holding the text (default: the one named "text", any case)',
        "label_column": 'the column or JSON key holding the label (default: the one named "label", any case)',
        "task": "single | multilabel | regression | pair | pair-multilabel | pair-regression | similarity | "
                "similarity-multilabel | similarity-regression | choice (docs/tasks.md)",
        "pair_column": 'pair and similarity tasks: the second text\'s column (default: "text_pair")',
        "context_column": 'choice: the context\'s column (default: "context")',
        "question_column": 'choice: an optional question column, appended to the context (default: "question")',
        "choices_column": 'choice: the column holding a JSON list of options (default: "choices")',
        "choice_columns": "choice: option columns instead of a list, e.g. ending0,ending1,ending2,ending3",
        "label_separator": "multilabel CSV/TSV: the separator between label names in one field (or write a "
                           "JSON list)",
        "split": "train,validation,test fractions of a --data file without --validation/--test: three "
                 "non-negative numbers summing to 1, e.g. 0.8,0.2,0 (no test split); each label keeps its "
                 "share in every split (multilabel: each row's rarest label; regression and choice: random)",
        "delimiter": "what joins the two parts of a pair, similarity or choice row (default: GPT-2's "
                     "<|endoftext|> token)",
    },
    "model": {
        "checkpoint": "the pretrained GPT-2 to start from: a checkpoint folder (OpenAI or Hugging Face), "
                      "a released size (gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M; "
                      "downloaded on first use), or tiny/mini (random-init presets)",
        "weights": "pretrained | random (the checkpoint's shape, freshly initialized)",
        "pooling": "token(s) the head reads: last_real (the last non-padding token) | last (the book: "
                   "the last padded position) | first | mean (over real tokens)",
        "trainable": "head (book: last_layer) | last_block | last_two_blocks | last_k_blocks:K | all | "
                     "lora | adapters (bottleneck adapters and the head) | a regex over parameter paths",
        "lora_rank": "LoRA rank, with --trainable lora",
        "lora_alpha": "LoRA alpha, with --trainable lora (book: the update is scaled by alpha; peft: by "
                      "alpha / rank)",
        "lora_style": "with --trainable lora: book (appendix E: separate query/key/value adapters, adapters "
                      "on every linear and the frozen head) | peft (Hugging Face PEFT's GPT-2 default: one "
                      "adapter on c_attn, the head trained fully); docs/lora.md",
        "adapter_size": "bottleneck width of each adapter, with --trainable adapters (two per block: after "
                        "the attention and after the MLP; docs/lora.md)",
        "head": "the classification head: linear (the book) | mlp:HIDDEN (Linear, ReLU, dropout, Linear; "
                "e.g. mlp:256, usually with --trainable head)",
        "head_dropout": "dropout between an MLP head's two layers while training",
        "causal": "causal attention mask; --no-causal attends over all real tokens",
        "dropout": "dropout rate while training (disables the frozen-prefix cache)",
        "dtype": "compute dtype: auto (bfloat16 where the device runs it faster: GPU, TPU, a CPU with AMX "
                 "and jaxcls[amx]; else float32) | float32 | bfloat16 | float16 (parameters, optimizer "
                 "state and loss stay float32)",
    },
    "training loop": {
        "epochs": "passes over the training split",
        "batch_size": "training examples per step (the book's 8; this changes the result, while "
                      "classify/eval/serve's --batch-size only changes speed)",
        "accumulation": "micro-batches of --batch-size per optimizer update",
        "lr": "AdamW learning rate",
        "weight_decay": "AdamW weight decay",
        "schedule": "learning-rate schedule: constant | cosine",
        "warmup_steps": "linear warm-up steps before the schedule",
        "clip_norm": "clip gradients to this global norm (default: no clipping)",
        "class_weights": "loss weight per class: none | balanced | w0,w1,...",
        "label_smoothing": "cross-entropy label smoothing, in [0, 1)",
        "pos_weight": "multilabel: loss weight of each label's positives: none | auto (negatives/positives) | w1,w2,...",
        "thresholds": "multilabel: decision threshold of every label (0.5), or 'tune': per label, the best F1 "
                      "on the validation split, saved with the model",
        "standardize": "regression: train on standardised targets (mean 0, std 1 on the training split; "
                       "predictions are in the targets' units)",
        "seed": "seed of the head's initialization, the shuffles, and the split of a single --data file",
        "eval_freq": "steps between validation estimates in the log",
        "eval_iter": "batches per validation estimate",
        "keep_best": "keep the parameters of the epoch with the best --monitor (default: the lowest validation loss)",
        "early_stop_patience": "stop after this many epochs whose validation --monitor did not improve by more "
                               "than --min-delta, keeping the best epoch's parameters (default: off)",
        "monitor": "what --keep-best and --early-stop-patience compare, on the whole validation split at each "
                   "epoch's end: val_loss | val_accuracy (single, choice) | val_macro_f1 (single, multilabel)",
        "min_delta": "an improvement of --monitor is one by more than this",
        "drop_last": "drop the last partial training batch, as the book does",
        "max_steps": "stop after this many steps (default: no limit)",
        "padding": "auto | longest (the book) | context | buckets | none | N",
        "batching": "with length buckets: auto (global when the frozen prefix is cached, else buckets) | "
                    "buckets (each batch from one length bucket: least padding) | global (the book's "
                    "shuffle, each batch padded to the bucket of its longest text)",
        "cache": "reuse frozen-prefix activations across epochs (exact; never for lora/all/dropout)",
        "cache_budget_mb": "host memory (MiB) the frozen-prefix cache may take; over it, the cache spills to a "
                           "memory-mapped file in --cache-dir (or the run folder)",
        "cache_dtype": "cached states stored as auto (the compute dtype) | float32 (exact) | bfloat16 "
                       "(half the memory)",
        "cache_memory": "host | device: keep cached states in device memory (one device), so batches are "
                        "built there",
        "cache_dir": "folder for a frozen-prefix cache over --cache-budget-mb (default: the run folder, --out)",
        "keep_cache": "keep a spilled cache's file (prefix-cache-*.bin, described by prefix-cache.json) after the run",
        "compilation_cache": "keep compiled programs in this folder so the next run starts faster "
                             "(a folder only you can write; default: $JAXCLS_HOME/compilation-cache, "
                             "at most 2 GiB, least recently used programs evicted first)",
    },
    "output": {
        "out": "run folder: the saved classifier (pass it to classify/eval/serve as --model), metrics, "
               "curves, resumable state (default: runs/<name of --data>)",
        "save_every": "steps between resumable train-state saves",
        "save_full": "save every weight, not only the trained ones and the base checkpoint's path",
    },
    "devices and hosts (see docs/scaling.md)": {
        "data_parallel": "split each batch over all devices (and processes)",
        "fsdp": "also shard large parameters and their optimizer state over the devices",
    },
}
HELP = {name: text for group in GROUPS.values() for name, text in group.items()}
OUTPUT_NOT_OUT = "names classify's predictions file; train's run folder is --out DIR"


def register(sub) -> None:
    from jaxcls.cli.common import MODEL_HINT, compilation_cache_options, wrong_flag

    p = sub.add_parser("train", help="fine-tune GPT-2 as a classifier",
                       description="Fine-tune a pretrained GPT-2 (--checkpoint) as a classifier and save it\n"
                                   "to a run folder (--out). The defaults reproduce the book's chapter 6.")
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    where = {name: groups[title] for title, fields in GROUPS.items() for name in fields}
    for spec in SPECS:
        _add_fields(p, spec, where)
    p.set_defaults(dtype="auto")
    groups["model"].add_argument("--tokenizer", default=None,
                                 help="folder with encoder.json + vocab.bpe (default: the checkpoint's)")
    groups["model"].add_argument("--init-from", default=None, metavar="DIR",
                                 help="start from a saved classifier (a jaxcls folder, or a transformers "
                                      "GPT2ForSequenceClassification folder): its weights, labels and model "
                                      "settings, with a fresh optimizer (default: a new head on --checkpoint)")
    offline.add_flag(groups["model"])
    compilation_cache_options(where["compilation_cache"], folder_flag=False)
    groups["output"].add_argument("--resume", action="store_true", help="continue from the last save in --out")
    groups["output"].add_argument("--overwrite", action="store_true",
                                  help="replace the run already in --out: deletes only jaxcls's own run files "
                                       "(classifier.json, weights, metrics, curves, state/, best/), never other "
                                       "files (without it, or --resume, a used --out is refused)")
    groups["output"].add_argument("--quiet", action="store_true", help="no progress bars, log or summary")
    groups["output"].add_argument("--merge-lora", action="store_true",
                                  help="with --trainable lora: save the classifier with its adapters merged "
                                       "into the weights (every weight saved; serves as fast as a plain one)")
    wrong_flag(p, "--model", MODEL_HINT)
    wrong_flag(p, "--output", OUTPUT_NOT_OUT)
    multi = groups["devices and hosts (see docs/scaling.md)"]
    multi.add_argument("--distributed", action="store_true",
                       help="join the job JAX detects itself (Cloud TPU pod slice, SLURM, Open MPI)")
    multi.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default: single host)")
    multi.add_argument("--num-processes", type=int, default=None,
                       help="processes in the job, with --coordinator")
    multi.add_argument("--process-id", type=int, default=None, help="this process's rank, with --coordinator")
    p.set_defaults(func=cmd_train)


def _add_fields(p, spec, where: dict) -> None:
    """One flag per dataclass field, typed by its annotation; booleans get --x/--no-x."""
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        group = where.get(f.name, p)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=HELP.get(f.name))
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(flag, type=base if base in (int, float) else str, default=f.default,
                           help=HELP.get(f.name))


def _model_width(model) -> int | None:
    """n_embd of the model to train, from its size name or its folder's config file (no tensor is
    read); None where neither says (a Hub name not yet resolved)."""
    from jaxcls.config import preset
    from jaxcls.errors import JaxclsError

    try:
        return preset(model.checkpoint).n_embd
    except JaxclsError:
        pass
    try:
        from jaxcls.ckpt.load import read_config

        return read_config(Path(model.checkpoint))[0].n_embd
    except (JaxclsError, OSError):
        return None


def _start_process(args) -> None:
    """Join the distributed job if asked, and switch the compilation cache on (its default folder
    stays out of the recorded config)."""
    if args.distributed or args.coordinator or args.num_processes:
        from jaxcls.train import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from jaxcls.cli.common import use_compilation_cache

    use_compilation_cache(args)


def _resolve_dtype(model):
    """(the spec with `auto` resolved, the dtype used, why)."""
    from jaxcls.cpu_gemm import decide_dtype

    used, why = decide_dtype(model.dtype, width=_model_width(model) if model.dtype == "auto" else None)
    return model.replace(dtype=used), used, why


def cmd_train(args) -> int:
    from jaxcls.classifier import Classifier
    from jaxcls.data import load_spec

    _start_process(args)
    data, model, cfg = (spec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(spec)}) for spec in SPECS)
    if not args.init_from:  # with --init-from no checkpoint is read
        model, cfg = offline.choose_model(args, model, cfg)
    check_merge_lora(args.merge_lora, cfg.trainable)
    model, used, why = _resolve_dtype(model)
    out = Path(cfg.out or f"runs/{Path(data.data).stem}")
    cfg = cfg.replace(out=str(out))
    from jaxcls.train.distributed import is_main_process
    from jaxcls.train.state import finished_run, prepare_run_folder

    if is_main_process():  # the one process that writes into --out
        prepare_run_folder(out, resume=args.resume, overwrite=args.overwrite)
    config = {**dataclasses.asdict(data), **dataclasses.asdict(model), **dataclasses.asdict(cfg)}
    if args.init_from:
        config["init_from"] = str(Path(args.init_from).resolve())
    steps = finished_run(out, config) if args.resume else None
    if steps is not None:
        print(f"{out}: already complete ({steps} steps, as its metrics.json records); nothing to do. "
              "Resume with a larger --epochs or --max-steps to train further", flush=True)
        return 0
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    log(f"dtype: {used} ({why})")
    t0 = time.perf_counter()
    splits = load_spec(data, seed=cfg.seed, progress=not args.quiet)
    log(f"data: train {len(splits.train)}, validation {len(splits.validation or ())}, "
        f"test {len(splits.test or ())}; labels {list(splits.label_names)}")
    if args.init_from:
        clf = init_from(args, model, splits, log)
    else:
        clf = Classifier.from_spec(model, splits.label_names, trainable=cfg.trainable, seed=cfg.seed,
                                   tokenizer=args.tokenizer, task=task_of(data, splits))
    offline.log_copies(data, clf, log)
    report = clf.fit(splits, train_config=cfg, out=out, resume=args.resume, progress=not args.quiet, log=log)
    if not is_main_process():
        return 0  # process 0 writes the classifier and the metrics
    report["wall_time_total_s"] = time.perf_counter() - t0
    report["config"] = config
    report["dtype"] = {"requested": args.dtype, "used": used, "why": why}
    report["data_sha256"] = data_hashes(data)
    clf.save(out, full=cfg.save_full, merge_lora=args.merge_lora)
    from jaxcls.fileio import atomic_write_json

    atomic_write_json(out / "metrics.json", report)
    plot_curves(out)
    if not args.quiet:
        print_summary(report)
        print(f"saved to {out}")
    return 0


def check_merge_lora(merge: bool, trainable: str) -> None:
    """--merge-lora needs LoRA adapters; bottleneck adapters cannot be folded at all."""
    if merge and trainable == "adapters":
        raise ConfigError("--merge-lora: bottleneck adapters cannot be folded into the weights (a GELU sits "
                          "between their two projections); train without --merge-lora")
    if merge and trainable != "lora":
        raise ConfigError(f"--merge-lora merges LoRA adapters, which --trainable {trainable} does not add; "
                          "use it with --trainable lora")


def init_from(args, model: ModelSpec, splits, log):
    """The classifier saved in --init-from, to train further on data with the same labels. Flags
    that would build another model are refused rather than ignored; it is saved whole, since
    weights it trained earlier may now be frozen and a delta would drop them."""
    from jaxcls.classifier import Classifier
    from jaxcls.errors import ConfigError

    folder = args.init_from
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(ModelSpec)
             if getattr(model, f.name) != f.default] + ["--tokenizer"] * bool(args.tokenizer)
    if given:
        raise ConfigError(f"--init-from {folder}: the model, its settings and tokenizer come from that folder; "
                          f"drop {', '.join(given)}")
    clf = Classifier.load(folder)
    if set(clf.label_names) != set(splits.label_names):
        raise ConfigError(f"--init-from {folder}: its labels {list(clf.label_names)} are not the data's "
                          f"{list(splits.label_names)}; train a new head without --init-from, or relabel the data")
    clf.base = None
    log(f"init from {folder}: {len(clf.label_names)} labels, a fresh optimizer")
    return clf


def task_of(data: DataSpec, splits):
    """The task `--task` names, over the labels the data has (None: single-label text, as before)."""
    if data.task == "single":
        return None
    from jaxcls.task import make_task

    n = len(splits.label_names) if data.task == "choice" else None
    return make_task(data.task, splits.label_names, delimiter=data.delimiter, num_choices=n)


def data_hashes(spec: DataSpec) -> dict[str, str]:
    """sha256 of each training file by role, so `jaxcls eval` can tell a file the model saw
    (and whether it was split) wherever it has moved since."""
    from jaxcls.fileio import sha256_files

    files = {"validation": spec.validation, "test": spec.test}
    if spec.data not in ("sms-spam", "sms_spam"):
        files["train"] = spec.data
    return {role: sha256_files([Path(f)]) for role, f in files.items() if f}


# The printed table's metric columns per task type (metrics.json has every key).
SUMMARY_COLUMNS = {"single": ("accuracy", "macro_f1"), "choice": ("accuracy",),
                   "multilabel": ("micro_f1", "macro_f1", "subset_accuracy", "roc_auc_macro"),
                   "regression": ("mse", "mae", "pearson", "spearman")}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "macro_f1":
        return f"{value:.3f}"
    return f"{100 * value:.2f}%" if key in ("accuracy", "subset_accuracy") else f"{value:.4f}"


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    task = report.get("task") or {"type": "single"}
    first, *rest = SUMMARY_COLUMNS[task["type"]]
    layout = task.get("inputs", "text")
    name = (task["type"] if layout in ("text", "choice") else layout if task["type"] == "single"
            else f"{layout}-{task['type']}")
    title = first if task == {"type": "single"} else f"{name}: {first}"
    table = Table(title=title)
    for col in ("split", "n", first, "loss", *rest):
        table.add_column(col.replace("_f1", " F1").replace("_", " "))
    for name, r in report["splits"].items():
        table.add_row(name, str(r["n"]), _cell(first, r.get(first)), f"{r['loss']:.4f}",
                      *(_cell(k, r.get(k)) for k in rest))
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
    epochs = [r for r in rows if "val_loss_full" in r or any(k.startswith("train_") for k in r)
              and "train_loss" not in r]
    score = next((k[6:] for r in epochs for k in r if k.startswith("train_")), "acc")
    from jaxcls.fileio import atomic_open

    for name, series, x in (("loss", (("train_loss", steps), ("val_loss", steps)), "examples_seen"),
                            ("accuracy" if score == "acc" else score,
                             ((f"train_{score}", epochs), (f"val_{score}", epochs)), "epoch")):
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
