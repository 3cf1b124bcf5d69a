"""`jaxcls export`: a trained classifier in another library's format (today: transformers)."""

from __future__ import annotations

import sys
from pathlib import Path

from jaxcls.cli.common import CHECKPOINT_HINT, check_model_folder, wrong_flag
from jaxcls.errors import ConfigError

FORMATS = ("hf",)


def register(sub) -> None:
    p = sub.add_parser("export", help="write a trained classifier as a transformers model folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist or be empty)")
    p.add_argument("--model", required=True, metavar="DIR", help="a trained classifier folder")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="where the pretrained checkpoint of a classifier saved without it now is")
    p.add_argument("--format", default="hf", metavar="FORMAT",
                   help="hf: transformers GPT2ForSequenceClassification (config.json, model.safetensors, "
                        "tokenizer files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    wrong_flag(p, "--checkpoint", CHECKPOINT_HINT)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: choose from {', '.join(FORMATS)}")
    check_model_folder(args.model)
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ConfigError(f"{args.out}: is the --model folder itself; export to another folder")
    from jaxcls.classifier import Classifier

    clf = Classifier.load(args.model, base=args.base)
    out = clf.export_hf(args.out, overwrite=args.overwrite, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(out)
    return 0
