"""`jaxcls` subcommands; the only module that reads argv."""

from __future__ import annotations

import argparse
import sys

from jaxcls.errors import JaxclsError

DESCRIPTION = """\
Fine-tune GPT-2 as a text classifier and use it.

  jaxcls download gpt2-small                      OpenAI's checkpoint files into the cache
  jaxcls train --data sms-spam --out runs/spam    fine-tune (--checkpoint: the GPT-2 to start from)
  jaxcls classify --model runs/spam "some text"   use the trained classifier (--model: its folder)
  jaxcls eval --model runs/spam --data test.csv   accuracy, per-class F1, confusion matrix
  jaxcls serve --model runs/spam                  an HTTP server

`jaxcls COMMAND --help` lists a command's options with their defaults."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help, unless the default is None or False (the help
    then says what happens) or the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = action.option_strings
            return f"{text} (default: {on if action.default else off})"
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)


class WrongFlag(argparse.Action):
    """A flag that belongs to another subcommand: using it stops with a hint naming the right one,
    instead of argparse's "unrecognized arguments" or "required: --model"."""

    def __init__(self, option_strings, dest, hint: str, **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} {self.hint}\n")


MODEL_HINT = ("names a trained classifier folder (classify, eval, serve); "
                        "the pretrained GPT-2 to start from is --checkpoint")
CHECKPOINT_HINT = ("names a pretrained GPT-2 checkpoint (train, generate); "
                        "a folder written by `jaxcls train` is --model DIR")


def wrong_flag(p, flag: str, hint: str) -> None:
    p.add_argument(flag, action=WrongFlag, hint=hint)


def cmd_download(args) -> int:
    from jaxcls.ckpt.download import download_checkpoint

    for name in args.names:
        folder = download_checkpoint(name, cache_dir=args.cache_dir, base_url=args.base_url,
                                              progress=not args.quiet)
        print(folder)
    return 0


def cmd_generate(args) -> int:
    from jaxcls.generate import generate_greedy
    from jaxcls.ckpt.load import load_pretrained, load_tokenizer
    from jaxcls.tokenizer import encode

    model = load_pretrained(args.checkpoint, verify=args.verify)
    enc = load_tokenizer(args.checkpoint)
    ids = generate_greedy(model, encode(enc, args.prompt), args.max_new_tokens)
    print(enc.decode(ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxcls", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("download", help="fetch OpenAI's GPT-2 checkpoint files into the cache")
    p.add_argument("names", nargs="+", metavar="SIZE",
                   help="gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M")
    p.add_argument("--cache-dir", default=None, help="default: $JAXCLS_HOME or ~/.cache/jaxcls")
    p.add_argument("--base-url", default=None, help="default: $JAXCLS_BASE_URL or OpenAI's public bucket")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("generate", help="greedy text generation, to check that weights loaded right")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--checkpoint", default="gpt2-small",
                   help="a pretrained GPT-2: checkpoint folder or released size (downloaded on first use)")
    p.add_argument("--max-new-tokens", type=int, default=15, help="tokens to generate")
    p.add_argument("--verify", action="store_true", help="check each tensor's crc32c (OpenAI files)")
    wrong_flag(p, "--model", MODEL_HINT)
    p.set_defaults(func=cmd_generate)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live beside their feature's module."""
    from jaxcls import cli_train, cli_predict, cli_bench

    return [cli_train.register, cli_predict.register, cli_bench.register]


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
