"""What every subcommand shares: the help formatter, hints for another command's flags, and the
options and loading of a trained classifier (classify, eval, serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxcls.config import DTYPE_CHOICES
from jaxcls.errors import CheckpointError, ConfigError

LONG_MODES = ("truncate", "sliding")


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
    """No abbreviated flags: `--epoch` for `--epochs` would silently change meaning the day a
    second flag starts with the same letters."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("allow_abbrev", False)
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


def model_options(p) -> None:
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
    p.add_argument("--dtype", choices=("saved",) + DTYPE_CHOICES, default="saved",
                   help="the compute dtype: as the classifier was saved (default), or auto (decided for "
                        "this machine, as `train` decides it), float32 or bfloat16; the weights are the same")
    compilation_cache_options(p)
    wrong_flag(p, "--checkpoint", CHECKPOINT_HINT)


CACHE_HELP = ("keep compiled programs in DIR so the next run starts faster (a folder only you can "
              "write; default: $JAXCLS_HOME/compilation-cache, at most 2 GiB, least recently used "
              "programs evicted first)")


def compilation_cache_options(p, *, folder_flag: bool = True) -> None:
    """--compilation-cache DIR (unless the command has it already) and --no-compilation-cache."""
    if folder_flag:
        p.add_argument("--compilation-cache", metavar="DIR", default=None, help=CACHE_HELP)
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="compile every program afresh and write nothing to the compilation cache")


def use_compilation_cache(args) -> None:
    """Turn JAX's persistent compilation cache on (the flag's folder, else the default one under
    $JAXCLS_HOME) or, with --no-compilation-cache, off; before anything compiles."""
    from jaxcls.compile_cache import default_cache_dir, disable_compilation_cache, enable_compilation_cache

    if args.no_compilation_cache and args.compilation_cache:
        raise ConfigError("--compilation-cache DIR and --no-compilation-cache contradict each other; give one")
    if args.no_compilation_cache:
        disable_compilation_cache()
        return
    if args.compilation_cache and Path(args.compilation_cache).exists() and not Path(args.compilation_cache).is_dir():
        raise ConfigError(f"--compilation-cache {args.compilation_cache}: a file, not a folder")
    folder = args.compilation_cache or default_cache_dir()
    try:
        enable_compilation_cache(folder)
    except OSError as e:  # a folder that cannot be made: the flag's is an error, the default's only slows
        if args.compilation_cache:
            raise ConfigError(f"--compilation-cache {folder}: cannot use it ({e.strerror or e})") from None
        disable_compilation_cache()
        print(f"jaxcls: compilation cache off: cannot make {folder} ({e.strerror or e}); set $JAXCLS_HOME "
              "or --compilation-cache DIR", file=sys.stderr)


def check_model_folder(model: str) -> None:
    """Refuse, before anything loads, a --model that is a file or a classifier folder without its
    tokenizer files (which would otherwise send tiktoken to the network)."""
    from jaxcls.ckpt.folder import META
    from jaxcls.tokenizer import tokenizer_files

    folder = Path(model)
    if folder.is_file():
        raise CheckpointError(f"--model {model}: a file, not a folder; give the folder `jaxcls train "
                              f"--out` wrote (it holds {META})")
    if (folder / META).is_file() and tokenizer_files(folder) is None:
        raise CheckpointError(f"--model {model}: no tokenizer files (encoder.json + vocab.bpe, or "
                              "vocab.json + merges.txt); copy them from the GPT-2 checkpoint it was trained from")


def load_classifier(args):
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_folder(args.model)
    use_compilation_cache(args)
    from jaxcls.classifier import Classifier

    clf = Classifier.load(args.model, base=args.base)
    if args.dtype != "saved":
        from jaxcls.cpu_gemm import decide_dtype
        from jaxcls.precision import with_dtype

        used, why = decide_dtype(args.dtype, width=clf.model.config.n_embd)
        clf.model = with_dtype(clf.model, used)
        print(f"dtype: {used} ({why})", file=sys.stderr)
    return clf


def predictor_kw(args, **extra) -> dict:
    kw = {"batch_size": args.batch_size, "long": args.long, **extra}
    if args.window_stride is not None:
        kw["window_stride"] = args.window_stride
    return kw


def stderr():
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=True)


def shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def report_long(stats: dict, clf, predictor, console) -> None:
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


def stats_since(predictor, before: dict) -> dict:
    now = predictor.stats.as_dict()
    return {k: now[k] - before.get(k, 0) for k in now}
