"""`jaxcls eval`: score a trained classifier on labelled data, never on rows it trained on unawares."""

from __future__ import annotations

import json
import sys

from jaxcls.cli.common import load_classifier, model_options, predictor_kw, report_long, stats_since, stderr
from jaxcls.cli.predict import COLUMN_FIELDS, DATA_HELP
from jaxcls.errors import ConfigError, DataError

EVAL_DESCRIPTION = """\
Score a trained classifier on labelled data.

Which rows are scored:
  --data FILE        every row of FILE (--split all). If FILE is the one the model was trained
                     on, stderr says so: those are training rows.
  --data FILE --split test|validation|train
                     only for the file the model was trained on without --validation/--test
                     files: the file is cut again with training's recorded --split and --seed, so
                     --split test scores exactly the rows training held out. Any other file is
                     never re-split.
  --data sms-spam    the book's test split (--split picks another; the seed is training's)."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class precision/recall/F1 and confusion matrix on labelled data",
                       description=EVAL_DESCRIPTION)
    model_options(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="sms-spam (the book's data set), or a .csv/.tsv/.jsonl file with text and label columns")
    p.add_argument("--data-path", default=None, metavar="PATH",
                   help="sms-spam only: the SMSSpamCollection file, zip or folder (default: the cached download)")
    p.add_argument("--split", default=None, choices=("test", "validation", "train", "all"),
                   help="which rows: for sms-spam the book's split (default: test); for a file, every row "
                        "(default: all), or one part of the file the model was trained on with a seeded "
                        "split, cut again exactly as in training")
    p.add_argument("--text-column", default=None,
                   help='the column or JSON key holding the text (default: the one training used for this file, '
                        'else the one named "text")')
    p.add_argument("--label-column", default=None,
                   help='the column or JSON key holding the label (default: the one training used for this file, '
                        'else the one named "label")')
    for name in COLUMN_FIELDS:  # pair, similarity and choice files: train's flags
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       help=DATA_HELP[name] + " (default: the one training used for this file)")
    p.add_argument("--seed", type=int, default=None,
                   help="the split seed (default: the one training recorded in metrics.json, else 123)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no download progress and no long-text summary on stderr")
    p.set_defaults(func=cmd_eval)


def _training_record(model_dir) -> dict:
    """The data settings `jaxcls train` recorded in the run folder's metrics.json ({} without one)."""
    from pathlib import Path

    from jaxcls.fileio import read_json
    from jaxcls.errors import CheckpointError

    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = read_json(path)
    except CheckpointError:
        return {}
    config = metrics.get("config")
    return {"config": config, "data_sha256": metrics.get("data_sha256") or {}} if isinstance(config, dict) else {}


def _training_role(path: str, record: dict) -> str | None:
    """Which training file (train, validation, test) `path` is, by content; None if none."""
    from pathlib import Path

    from jaxcls.fileio import sha256_files

    hashes = record.get("data_sha256")
    if not hashes:  # a run recorded before the hashes: go by path
        config = record.get("config") or {}
        for role, key in (("train", "data"), ("validation", "validation"), ("test", "test")):
            if config.get(key) and Path(config[key]).resolve() == Path(path).resolve():
                return role
        return None
    if not Path(path).is_file():
        return None
    digest = sha256_files([Path(path)])
    return next((role for role, h in hashes.items() if h == digest), None)


def _split_seed(args, config: dict | None, source: str) -> int:
    """The seed to cut `source` with: training's. Another seed would put training rows in the
    'test' split, so it is refused."""
    recorded = (config or {}).get("seed")
    if recorded is None:
        return 123 if args.seed is None else args.seed
    if args.seed is not None and args.seed != recorded:
        raise ConfigError(f"--seed {args.seed}: {args.model} was trained on {source} split by seed {recorded}; "
                          f"another seed would score training rows as {args.split}. Drop --seed")
    return recorded


def _eval_dataset(args, clf, warn):
    """(texts, label indices into clf.label_names, description). See EVAL_DESCRIPTION."""
    import numpy as np

    from jaxcls.config import DataSpec
    from jaxcls.data import label_ids, load_data, read_labelled

    names, theirs = tuple(clf.label_names), "the classifier's labels"
    record = _training_record(args.model)
    config = record.get("config") or {}
    if args.data in ("sms-spam", "sms_spam"):
        split = args.split or "test"
        on_sms = config.get("data") in ("sms-spam", "sms_spam")
        seed = _split_seed(args, config if on_sms and split != "all" else None, "sms-spam")
        splits = load_data("sms-spam", path=args.data_path, seed=seed, progress=not (args.json or args.quiet))
        parts = [splits.train, splits.validation, splits.test] if split == "all" else [getattr(splits, split)]
        texts = [t for d in parts for t in d.texts]
        named = [d.label_names[i] for d in parts for i in d.labels]
        labels = label_ids(named, names, source=f"sms-spam:{split}", described=theirs)
        return texts, labels, f"sms-spam:{split}"
    if args.data_path is not None:
        raise ConfigError("--data-path applies to --data sms-spam only")
    role = _training_role(args.data, record)
    was_split = config.get("validation") is None and config.get("test") is None
    columns = dict(text_column=args.text_column, label_column=args.label_column)
    if role is not None:  # read the file as training read it, unless told otherwise
        columns = {k: v if v is not None else config.get(k) for k, v in columns.items()}
    if args.split in (None, "all"):
        if role == "train":
            warn(f"note: {args.data} is the file {args.model} was trained on; "
                 + (f"{round(100 * DataSpec(split=config.get('split', '0.7,0.1,0.2')).split_fractions[0])}% "
                    "of its rows were training rows (--split test scores only the held-out ones)"
                    if was_split else "every row of it was a training row"))
        table = read_labelled(args.data, **columns)
        return table.texts, label_ids(table.labels, names, source=args.data, described=theirs,
                                      lines=table.lines, column=table.label_column), f"{args.data}:all"
    if role != "train" or not was_split:
        if not record:
            why = (f"{args.model} has no readable metrics.json from `jaxcls train` saying how its "
                   "training data was split")
        elif role == "train":
            why = (f"{args.model} trained on every row of it (its validation and test data were the "
                   "--validation/--test files)")
        elif role is not None:
            why = f"it is the {role} file {args.model} was trained with"
        else:
            why = f"it is not the file {args.model} was trained on ({config.get('data')})"
        raise ConfigError(f"--split {args.split}: {args.data} is not re-split, because {why}; "
                          "drop --split to score every row")
    seed = _split_seed(args, config, args.data)
    cut = ({"split_fractions": DataSpec(split=config["split"]).split_fractions} if "split" in config
           else {"stratify": False})  # a run recorded before --split was cut unstratified
    splits = load_data(args.data, **columns, seed=seed, label_names=list(names), **cut)
    data = getattr(splits, args.split)
    if data is None:
        raise DataError(f"{args.data}: there is no {args.split} split")
    if tuple(data.label_names) != names:  # load_splits was given our names; stay safe anyway
        data_labels = [data.label_names[i] for i in data.labels]
        return list(data.texts), label_ids(data_labels, names, source=data.source, described=theirs), data.source
    return list(data.texts), np.asarray(data.labels, np.int32), data.source


def _task_columns(args, config: dict):
    """The column flags for reading a task's file: eval's own, else those training recorded."""
    from types import SimpleNamespace

    from jaxcls.config import DataSpec
    from jaxcls.data.splits import columns_of

    keys = [f for f in DataSpec.__dataclass_fields__ if f.endswith(("_column", "_columns")) or f == "label_separator"]
    values = {k: config.get(k, DataSpec.__dataclass_fields__[k].default) for k in keys}
    given = ("text_column", "label_column", *COLUMN_FIELDS)
    values.update({k: getattr(args, k) for k in given if getattr(args, k, None) is not None})
    return columns_of(SimpleNamespace(**values))


def _eval_task_dataset(args, clf, warn):
    """eval's rows for a task other than single-label text: a whole file, or the seeded split of
    the file training cut (as for single-label, see EVAL_DESCRIPTION)."""
    from jaxcls.data import load_splits, task_dataset

    record = _training_record(args.model)
    config = record.get("config") or {}
    if args.data in ("sms-spam", "sms_spam") or args.data_path is not None:
        raise ConfigError(f"--data {args.data}: the classifier is for --task {clf.task.name}; give its data file")
    role = _training_role(args.data, record)
    columns = _task_columns(args, config if role is not None else {})
    was_split = config.get("validation") is None and config.get("test") is None
    if args.split in (None, "all"):
        if role == "train":
            warn(f"note: {args.data} is the file {args.model} was trained on")
        return task_dataset(args.data, clf.task.name, columns, clf.label_names, source=f"{args.data}:all")
    if role != "train" or not was_split:
        raise ConfigError(f"--split {args.split}: {args.data} is not the file {args.model} was trained on "
                          "with a seeded split; drop --split to score every row")
    seed = _split_seed(args, config, args.data)
    splits = load_splits(args.data, seed=seed, task=clf.task.name, columns=columns,
                         label_names=None if clf.task.kind == "choice" else list(clf.label_names))
    data = getattr(splits, args.split)
    if data is None:
        raise DataError(f"{args.data}: there is no {args.split} split")
    return data


def cmd_eval(args) -> int:
    from jaxcls.metrics import classification_report

    clf = load_classifier(args)
    err = stderr()
    if clf.task.name != "single":
        data = _eval_task_dataset(args, clf, lambda line: err.print(line, highlight=False))
        report = clf.evaluate(data, batch_size=args.batch_size)
        if args.json:
            print(json.dumps({"data": data.source, "task": clf.task.to_json(), **report}, indent=2))
        else:
            _print_task_report(report, data.source, clf.task)
        return 0
    texts, labels, source = _eval_dataset(args, clf, lambda line: err.print(line, highlight=False))
    predictor = clf.predictor(**predictor_kw(args))
    before = predictor.stats.as_dict()
    ids, _ = predictor.predict(texts)
    report = classification_report(labels, ids, clf.label_names)
    stats = stats_since(predictor, before)
    if args.json:
        print(json.dumps({"data": source, **report, "long_texts": stats["long_texts"]}, indent=2))
    else:
        _print_report(report, source)
        if not args.quiet:
            report_long(stats, clf, predictor, err)
    return 0


def _print_report(report: dict, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout)
    out.print(f"{source}: {report['n']} texts, accuracy {report['accuracy']:.4f}, "
              f"macro F1 {report['macro_f1']:.4f}", highlight=False)
    table = Table(title="per class", show_edge=False)
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in report["per_class"].items():
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    out.print(table)
    cm = Table(title="confusion matrix", show_edge=False)
    cm.add_column("true \\ predicted")
    for name in report["label_names"]:
        cm.add_column(name, justify="right")
    for name, row in zip(report["label_names"], report["confusion_matrix"]):
        cm.add_row(name, *(str(x) for x in row))
    out.print(cm)




def _print_task_report(report: dict, source: str, task) -> None:
    """The headline metrics of a multilabel, regression or choice report, and the per-label table."""
    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout)
    keys = {"multilabel": ("micro_f1", "macro_f1", "weighted_f1", "subset_accuracy", "hamming_loss", "roc_auc_macro"),
            "regression": ("mse", "mae", "pearson", "spearman"), "choice": ("accuracy",),
            "single": ("accuracy", "macro_f1", "mcc")}[task.kind]
    shown = ", ".join(f"{k.replace('_', ' ')} {'-' if report.get(k) is None else format(report[k], '.4f')}" for k in keys)
    out.print(f"{source}: {report['n']} examples ({task.name}), {shown}", highlight=False)
    per = report.get("per_class") or report.get("per_target")
    if not per:
        return
    cols = list(next(iter(per.values())))
    table = Table(title="per label" if "per_class" in report else "per target", show_edge=False)
    table.add_column("label")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in per.items():
        table.add_row(name, *("-" if m[c] is None else str(m[c]) if isinstance(m[c], int) else f"{m[c]:.4f}"
                              for c in cols))
    out.print(table)
