"""`jaxcls classify`: use a classifier saved by `jaxcls train`."""

from __future__ import annotations

import re
import sys

from jaxcls.cli.common import (load_classifier, model_options, predictor_kw, report_long, shorten,
                               stats_since, stderr, wrong_flag)
from jaxcls.cli.train_help import GROUPS
from jaxcls.errors import ConfigError, DataError
from jaxcls.infer.answers import INPUT_FIELDS


# The columns of pair, similarity and choice tables: train's flags (DataSpec fields), same help.
DATA_HELP = GROUPS["data"]
COLUMN_FIELDS = ("pair_column", "context_column", "question_column", "choices_column", "choice_columns")


def register_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify texts (arguments, a file or stdin) with a saved classifier")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (or use --input)")
    model_options(p)
    p.add_argument("--input", metavar="FILE", help="a .txt (a text per line), .csv, .tsv or .jsonl file, "
                                                   "or - for stdin (a text per line); streamed in chunks")
    p.add_argument("--text-column", default=None,
                   help='the column or JSON key holding the text (default: the one named "text", any case)')
    for field in COLUMN_FIELDS:
        p.add_argument("--" + field.replace("_", "-"), default=None, help=DATA_HELP[field])
    p.add_argument("--output", metavar="FILE", help="write predictions to a .jsonl or .csv file "
                                                    "(default: a table for TEXT arguments, JSONL on stdout for --input)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep only the K most likely classes' probabilities in the output (default: all)")
    p.add_argument("--chunk-size", type=int, default=4096, metavar="N", help="texts read per chunk with --input")
    p.add_argument("--resume", action="store_true",
                   help="continue the --output FILE.jsonl of a run that was killed, from FILE.jsonl.partial: "
                        "its rows are kept (checked against the input), only the rest is classified")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")
    wrong_flag(p, "--out", "names train's run folder; classify writes its predictions to --output FILE")
    p.set_defaults(func=cmd_classify)


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
    if args.resume and not (args.input and args.output):
        raise ConfigError("--resume continues a killed run's --output FILE.jsonl: give --input and --output")
    if args.output:  # check the name before loading anything
        _check_output(args.output)
    clf = load_classifier(args)
    task = clf.task
    if args.texts and task.inputs.kind != "text":
        raise ConfigError(f"the {task.name} task takes examples of several fields: give --input FILE, a "
                          f"table with columns {', '.join(INPUT_FIELDS[task.inputs.kind])} (docs/predict.md)")
    if args.top_k is not None and task.kind != "single":
        raise ConfigError(f"--top-k ranks single-label probabilities; the {task.name} task has none to rank")
    predictor = clf.predictor(**predictor_kw(args))
    before = predictor.stats.as_dict()
    err = stderr()
    if args.texts:
        ids, probs = predictor.predict(list(args.texts))
        if args.output:
            with PredictionWriter(clf.label_names, args.output, top_k=args.top_k, task=task) as w:
                w.write(args.texts, ids, probs)
            if not args.quiet:
                err.print(f"wrote {len(ids)} predictions to {args.output}", highlight=False)
        elif task.kind == "single":
            _print_table(args.texts, ids, probs, clf.label_names, args.top_k)
        else:
            _print_answers(task, args.texts, ids, probs, clf.label_names)
    else:
        _classify_stream(args, clf, predictor, err)
    if not args.quiet:
        stats = stats_since(predictor, before)
        if task.inputs.kind == "text":
            report_long(stats, clf, predictor, err)
        elif line := predictor.truncation.describe(task.inputs.kind, stats["texts"], predictor.max_length):
            err.print(line, highlight=False)
    return 0


def _check_output(path: str) -> None:
    from pathlib import Path

    from jaxcls.infer.io import check_output_path

    try:
        check_output_path(path)
    except DataError as e:
        raise DataError(f"--output {e}") from None
    if Path(path).suffix.lower() not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise DataError(f"--output {path}: unknown output type; use .jsonl or .csv (or .tsv)")


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
        row = [shorten(text, 200), label_names[int(i)], f"{float(p[int(i)]):.4f}"]
        if show_top:
            ranked = np.argsort(-p, kind="stable")[:top_k]
            row.append(", ".join(f"{label_names[j]} {float(p[j]):.3f}" for j in ranked))
        table.add_row(*row)
    console.print(table)


def _print_answers(task, texts, decisions, probs, names) -> None:
    """The table for TEXT arguments of a multi-label or regression classifier."""
    from rich.console import Console
    from rich.table import Table

    from jaxcls.infer.answers import answer

    console = Console(file=sys.stdout)
    table = Table(show_edge=False)
    table.add_column("text", no_wrap=True, overflow="ellipsis", max_width=max(20, console.width // 2))
    table.add_column("labels" if task.kind == "multilabel" else "values")
    if task.kind == "multilabel":
        table.add_column("probabilities")
    for text, d, p in zip(texts, decisions, probs):
        ans = answer(task, names, d, p)
        if task.kind == "multilabel":
            table.add_row(shorten(text, 200), ", ".join(ans["labels"]) or "(none)",
                          ", ".join(f"{n} {x:.3f}" for n, x in ans["probs"].items()))
        else:
            table.add_row(shorten(text, 200), ", ".join(f"{n} {x:.4g}" for n, x in ans["values"].items()))
    console.print(table)


def _reader(args, task):
    from jaxcls.infer.io import ExampleReader, TextReader

    if task.inputs.kind == "text":
        return TextReader(args.input, text_column=args.text_column, chunk_size=args.chunk_size)
    from jaxcls.data.records import Columns

    names = {"text": args.text_column, "text_pair": args.pair_column, "context": args.context_column,
             "question": args.question_column, "choices": args.choices_column}
    options = tuple(c.strip() for c in args.choice_columns.split(",")) if args.choice_columns else ()
    return ExampleReader(args.input, task.inputs.kind, Columns(names={k: v for k, v in names.items() if v},
                                                               choice_columns=options),
                         chunk_size=args.chunk_size)


def _where(args, reader, chunk, e: DataError) -> DataError:
    """An error about example i of a chunk, renamed to the input file's line."""
    match = re.match(r"example (\d+): (.*)", str(e), re.S)
    if match is None or not getattr(reader, "lines", None):
        return e
    return DataError(f"{args.input}: line {reader.lines[int(match[1])]}: {match[2]}")


def _classify_stream(args, clf, predictor, err) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxcls.infer.io import PredictionWriter
    from jaxcls.infer.predictor import TooManyTokens

    reader = _reader(args, clf.task)
    if args.resume and clf.task.inputs.kind != "text":
        raise ConfigError(f"--resume takes a text per row; the {clf.task.name} task's examples have several fields")
    if args.output:
        writer = PredictionWriter(clf.label_names, args.output, top_k=args.top_k, task=clf.task,
                                  resume=args.resume)
    else:
        writer = PredictionWriter(clf.label_names, stream=sys.stdout, top_k=args.top_k, task=clf.task)
    unit = "texts" if clf.task.inputs.kind == "text" else "examples"
    progress = Progress(TextColumn("classifying"), BarColumn(), TextColumn(f"{{task.fields[n]}} {unit}"),
                        TimeElapsedColumn(), console=err, disable=args.quiet)
    with writer, progress:
        task = progress.add_task("classify", total=reader.total_bytes, n=0)
        for chunk in writer.skip_done(reader, args.input):
            try:
                ids, probs = predictor.predict(chunk)
            except TooManyTokens as e:
                raise DataError(f"{args.input}: text {reader.rows - len(chunk) + e.index + 1}: "
                                f"{str(e).split(': ', 1)[1]}") from None
            except DataError as e:
                raise _where(args, reader, chunk, e) from None
            writer.write(chunk, ids, probs)
            progress.update(task, completed=reader.bytes_read, n=reader.rows)
    if not args.quiet:
        where = f" to {args.output}" if args.output else ""
        err.print(f"classified {reader.rows} {unit} from {args.input}{where}", highlight=False)
    if reader.invalid_lines:
        err.print(f"warning: {reader.invalid_lines} lines of {args.input} were not valid UTF-8 "
                  f"(first: line {reader.first_invalid_line}); bad bytes were read as U+FFFD",
                  highlight=False)
