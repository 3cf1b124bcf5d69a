"""The `jaxcls` command: one parser, a subcommand module each (train, classify, eval, serve, tools).
The cli package is the only part of jaxcls that reads argv."""

from __future__ import annotations

import argparse
import sys

from jaxcls.cli.common import Parser
from jaxcls.errors import JaxclsError

DESCRIPTION = """\
Fine-tune GPT-2 as a text classifier and use it.

  jaxcls download gpt2-small                      OpenAI's checkpoint files into the cache
  jaxcls train --data sms-spam --out runs/spam    fine-tune (--checkpoint: the GPT-2 to start from)
  jaxcls classify --model runs/spam "some text"   use the trained classifier (--model: its folder)
  jaxcls eval --model runs/spam --data test.csv   accuracy, per-class F1, confusion matrix
  jaxcls serve --model runs/spam                  an HTTP server

`jaxcls COMMAND --help` lists a command's options with their defaults."""


def build_parser() -> argparse.ArgumentParser:
    from jaxcls.cli import evaluate, export, predict, serve, tools, train

    parser = Parser(prog="jaxcls", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    tools.register(sub)
    train.register(sub)
    predict.register_classify(sub)
    evaluate.register(sub)
    serve.register(sub)
    export.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxclsError as e:
        print(f"jaxcls: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxcls: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
