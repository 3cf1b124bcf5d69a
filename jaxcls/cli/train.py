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
from jaxcls.cli.train_help import GROUPS
from jaxcls.config import DataSpec, ModelSpec, TrainConfig
from jaxcls.errors import ConfigError

SPECS = (DataSpec, ModelSpec, TrainConfig)  # every field a flag; its help text by group in GROUPS
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
    offline.check_data(args, data)
    check_merge_lora(args.merge_lora, cfg.trainable)
    model, used, why = (model, None, "as saved in --init-from") if args.init_from else _resolve_dtype(model)
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
    used = used or clf.model.config.dtype
    log(f"dtype: {used} ({why})")
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
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)} | {"dtype": "auto"}  # the CLI's
    given = [f"--{name.replace('_', '-')}" for name, default in defaults.items()
             if getattr(model, name) != default] + ["--tokenizer"] * bool(args.tokenizer)
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
        if ax.get_legend_handles_labels()[0]:  # a run too short to evaluate has nothing to name
            ax.legend()
        fig.tight_layout()
        with atomic_open(out / f"{name}.png", "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
    return out / "loss.png"
