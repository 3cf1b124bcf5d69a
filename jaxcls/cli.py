"""`jaxcls` subcommands; the only module that reads argv."""

from __future__ import annotations

import argparse
import sys

from jaxcls.errors import JaxclsError


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
    parser = argparse.ArgumentParser(prog="jaxcls", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch OpenAI's GPT-2 checkpoint files into the cache")
    p.add_argument("names", nargs="+", help="gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M")
    p.add_argument("--cache-dir", default=None, help="default: $JAXCLS_HOME or ~/.cache/jaxcls")
    p.add_argument("--base-url", default=None, help="default: $JAXCLS_BASE_URL or OpenAI's public bucket")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("generate", help="greedy text generation, to check that weights loaded right")
    p.add_argument("prompt")
    p.add_argument("--checkpoint", default="gpt2-small", help="a checkpoint folder or a size name")
    p.add_argument("--max-new-tokens", type=int, default=15)
    p.add_argument("--verify", action="store_true", help="check each tensor's crc32c (OpenAI files)")
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
