"""`jaxcls classify`, `jaxcls eval` and `jaxcls serve`: use a classifier saved by `jaxcls train`."""

from __future__ import annotations

import json
import sys

from jaxcls.errors import ConfigError, DataError

LONG_MODES = ("truncate", "sliding")


def register(sub) -> None:
    from jaxcls.cli import wrong_flag

    p = sub.add_parser("classify", help="classify texts (arguments, a file or stdin) with a saved classifier")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (or use --input)")
    _model_options(p)
    p.add_argument("--input", metavar="FILE", help="a .txt (a text per line), .csv, .tsv or .jsonl file, "
                                                   "or - for stdin (a text per line); streamed in chunks")
    p.add_argument("--text-column", default=None,
                   help='the column or JSON key holding the text (default: the one named "text", any case)')
    p.add_argument("--output", metavar="FILE", help="write predictions to a .jsonl or .csv file "
                                                    "(default: a table for TEXT arguments, JSONL on stdout for --input)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep only the K most likely classes' probabilities in the output (default: all)")
    p.add_argument("--chunk-size", type=int, default=4096, metavar="N", help="texts read per chunk with --input")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")
    wrong_flag(p, "--out", "names train's run folder; classify writes its predictions to --output FILE")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("eval", help="accuracy, per-class precision/recall/F1 and confusion matrix on labelled data",
                       description=EVAL_DESCRIPTION)
    _model_options(p)
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
    p.add_argument("--seed", type=int, default=None,
                   help="the split seed (default: the one training recorded in metrics.json, else 123)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no download progress and no long-text summary on stderr")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a saved classifier over HTTP (POST /classify, GET /)")
    _model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the default, 127.0.0.1, is reachable from this machine only")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--max-texts", type=int, default=1024, metavar="N", help="most texts per request")
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    p.set_defaults(func=cmd_serve)


EVAL_DESCRIPTION = """\
Score a trained classifier on labelled data.

Which rows are scored:
  --data FILE        every row of FILE (--split all). If FILE is the one the model was trained
                     on, stderr says so: those are training rows.
  --data FILE --split test|validation|train
                     only for the file the model was trained on without --validation/--test
                     files: the file is cut 70/10/20 again with training's recorded --seed, so
                     --split test scores exactly the rows training held out. Any other file is
                     never re-split.
  --data sms-spam    the book's test split (--split picks another; the seed is training's)."""


def _model_options(p) -> None:
    from jaxcls.cli import CHECKPOINT_HINT, wrong_flag

    p.add_argument("--model", required=True, metavar="DIR",
                   help="a trained classifier: the folder `jaxcls train --out` wrote (or Classifier.save)")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="where the pretrained checkpoint of a classifier saved without it now is "
                        "(default: the path recorded in DIR/classifier.json)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="texts per inference batch: speed and memory only, never the result")
    p.add_argument("--long", choices=LONG_MODES, default="truncate",
                   help="texts over the maximum length: keep the first tokens (truncate, as in training) "
                        "or average overlapping windows (sliding)")
    p.add_argument("--window-stride", type=int, default=None, metavar="N",
                   help="tokens between sliding windows (default: half the maximum length)")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="keep compiled programs in DIR so the next run starts faster "
                        "(a folder only you can write; default: off)")
    wrong_flag(p, "--checkpoint", CHECKPOINT_HINT)


def _load(args):
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.compilation_cache:
        from jaxcls.compile_cache import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    from jaxcls.classifier import Classifier

    return Classifier.load(args.model, base=args.base)


def _predictor_kw(args, **extra) -> dict:
    kw = {"batch_size": args.batch_size, "long": args.long, **extra}
    if args.window_stride is not None:
        kw["window_stride"] = args.window_stride
    return kw


def _stderr():
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=True)


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _report_long(stats: dict, clf, predictor, console) -> None:
    """Say on stderr how many texts were cut, windowed or empty."""
    n, L = stats["long_texts"], predictor.max_length
    if n and predictor.long == "truncate":
        console.print(f"{n} of {stats['texts']} texts had more than {L} tokens and were truncated to their "
                      f"first {L} (--long sliding classifies every part)", highlight=False)
    elif n:
        console.print(f"{n} of {stats['texts']} texts had more than {L} tokens; their {stats['windows']} "
                      f"windows were classified and averaged", highlight=False)
    if stats["empty"]:
        console.print(f"{stats['empty']} empty texts were classified as a lone padding token", highlight=False)


def _stats_since(predictor, before: dict) -> dict:
    now = predictor.stats.as_dict()
    return {k: now[k] - before.get(k, 0) for k in now}


def cmd_classify(args) -> int:
    from jaxcls.infer.io import PredictionWriter

    if args.texts and args.input:
        raise ConfigError("give TEXT arguments or --input, not both")
    if not args.texts and not args.input:
        raise ConfigError("nothing to classify: give TEXT arguments or --input FILE (- for stdin)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.output:  # check the name before loading anything
        _check_output(args.output)
    clf = _load(args)
    predictor = clf.predictor(**_predictor_kw(args))
    before = predictor.stats.as_dict()
    err = _stderr()
    if args.texts:
        ids, probs = predictor.predict(list(args.texts))
        if args.output:
            with PredictionWriter(clf.label_names, args.output, top_k=args.top_k) as w:
                w.write(args.texts, ids, probs)
            if not args.quiet:
                err.print(f"wrote {len(ids)} predictions to {args.output}", highlight=False)
        else:
            _print_table(args.texts, ids, probs, clf.label_names, args.top_k)
    else:
        _classify_stream(args, clf, predictor, err)
    if not args.quiet:
        _report_long(_stats_since(predictor, before), clf, predictor, err)
    return 0


def _check_output(path: str) -> None:
    from pathlib import Path

    if Path(path).suffix.lower() not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise DataError(f"{path}: unknown output type; use .jsonl or .csv (or .tsv)")


def _print_table(texts, ids, probs, label_names, top_k) -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    show_top = top_k is not None and top_k > 1
    longest = max(5, *(len(n) for n in label_names))
    others = longest + 22 + ((longest + 8) * min(top_k, len(label_names)) + 3 if show_top else 0)
    table = Table(show_edge=False)
    # the text is cut to what the terminal leaves beside the other columns
    table.add_column("text", no_wrap=True, overflow="ellipsis", max_width=max(20, console.width - others))
    table.add_column("label")
    table.add_column("probability", justify="right")
    if show_top:
        table.add_column(f"top {min(top_k, len(label_names))}")
    for text, i, p in zip(texts, ids, probs):
        row = [_shorten(text, 200), label_names[int(i)], f"{float(p[int(i)]):.4f}"]
        if show_top:
            ranked = np.argsort(-p, kind="stable")[:top_k]
            row.append(", ".join(f"{label_names[j]} {float(p[j]):.3f}" for j in ranked))
        table.add_row(*row)
    console.print(table)


def _classify_stream(args, clf, predictor, err) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxcls.infer.io import PredictionWriter, TextReader

    reader = TextReader(args.input, text_column=args.text_column, chunk_size=args.chunk_size)
    if args.output:
        writer = PredictionWriter(clf.label_names, args.output, top_k=args.top_k)
    else:
        writer = PredictionWriter(clf.label_names, stream=sys.stdout, top_k=args.top_k)
    progress = Progress(TextColumn("classifying"), BarColumn(), TextColumn("{task.fields[n]} texts"),
                        TimeElapsedColumn(), console=err, disable=args.quiet)
    with writer, progress:
        task = progress.add_task("classify", total=reader.total_bytes, n=0)
        for chunk in reader:
            ids, probs = predictor.predict(chunk)
            writer.write(chunk, ids, probs)
            progress.update(task, completed=reader.bytes_read, n=reader.rows)
    if not args.quiet:
        where = f" to {args.output}" if args.output else ""
        err.print(f"classified {reader.rows} texts from {args.input}{where}", highlight=False)
    if reader.invalid_lines:
        err.print(f"warning: {reader.invalid_lines} lines of {args.input} were not valid UTF-8 "
                  f"(first: line {reader.first_invalid_line}); bad bytes were read as U+FFFD",
                  highlight=False)


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
                 + ("70% of its rows were training rows (--split test scores only the held-out ones)"
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
    splits = load_data(args.data, **columns, seed=seed, label_names=list(names))
    data = getattr(splits, args.split)
    if data is None:
        raise DataError(f"{args.data}: there is no {args.split} split")
    if tuple(data.label_names) != names:  # load_splits was given our names; stay safe anyway
        data_labels = [data.label_names[i] for i in data.labels]
        return list(data.texts), label_ids(data_labels, names, source=data.source, described=theirs), data.source
    return list(data.texts), np.asarray(data.labels, np.int32), data.source


def cmd_eval(args) -> int:
    from jaxcls.metrics import classification_report

    clf = _load(args)
    err = _stderr()
    texts, labels, source = _eval_dataset(args, clf, lambda line: err.print(line, highlight=False))
    predictor = clf.predictor(**_predictor_kw(args))
    before = predictor.stats.as_dict()
    ids, _ = predictor.predict(texts)
    report = classification_report(labels, ids, clf.label_names)
    stats = _stats_since(predictor, before)
    if args.json:
        print(json.dumps({"data": source, **report, "long_texts": stats["long_texts"]}, indent=2))
    else:
        _print_report(report, source)
        if not args.quiet:
            _report_long(stats, clf, predictor, err)
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


def cmd_serve(args) -> int:
    from jaxcls.infer.serve import bind, serve

    if args.max_texts < 1:
        raise ConfigError(f"--max-texts must be >= 1, got {args.max_texts}")
    server = bind(args.host, args.port)  # a busy port fails now, not after loading and compiling
    try:
        clf = _load(args)
        # A request with a single text runs a one-row batch instead of a full batch of dummies.
        kw = _predictor_kw(args, row_buckets=(1, args.batch_size))
        serve(clf, server=server, max_texts=args.max_texts, predictor_kw=kw, log=not args.quiet)
    except KeyboardInterrupt:
        print("jaxcls: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
