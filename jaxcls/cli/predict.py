"""`jaxcls classify`: use a classifier saved by `jaxcls train`."""

from __future__ import annotations

import sys

from jaxcls.cli.common import (load_classifier, model_options, predictor_kw, report_long, shorten,
                               stats_since, stderr, wrong_flag)
from jaxcls.errors import ConfigError, DataError


def register_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify texts (arguments, a file or stdin) with a saved classifier")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (or use --input)")
    model_options(p)
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
    clf = load_classifier(args)
    predictor = clf.predictor(**predictor_kw(args))
    before = predictor.stats.as_dict()
    err = stderr()
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
        report_long(stats_since(predictor, before), clf, predictor, err)
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


def _classify_stream(args, clf, predictor, err) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jaxcls.infer.io import PredictionWriter, TextReader
    from jaxcls.infer.predictor import TooManyTokens

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
            try:
                ids, probs = predictor.predict(chunk)
            except TooManyTokens as e:
                raise DataError(f"{args.input}: text {reader.rows - len(chunk) + e.index + 1}: "
                                f"{str(e).split(': ', 1)[1]}") from None
            writer.write(chunk, ids, probs)
            progress.update(task, completed=reader.bytes_read, n=reader.rows)
    if not args.quiet:
        where = f" to {args.output}" if args.output else ""
        err.print(f"classified {reader.rows} texts from {args.input}{where}", highlight=False)
    if reader.invalid_lines:
        err.print(f"warning: {reader.invalid_lines} lines of {args.input} were not valid UTF-8 "
                  f"(first: line {reader.first_invalid_line}); bad bytes were read as U+FFFD",
                  highlight=False)
