"""`jaxcls train` without network: the default job falls back to a random-init preset, --offline
refuses a data set it would have to download, and the log says which copy of the tokenizer and of
the SMS data a run read."""

from __future__ import annotations

import sys

from jaxcls.config import ModelSpec, TrainConfig

DEFAULT_CHECKPOINT = ModelSpec.checkpoint
# The random-init stand-in for the default job: every weight trained, at a rate that suits
# training from scratch (the README's `mini` run: about 95% test accuracy on the SMS data).
FALLBACK = {"checkpoint": "mini", "weights": "random"}
FALLBACK_TRAIN = {"trainable": "all", "lr": 5e-4}
OFFLINE_HELP = ("download nothing: a released size must already be in the cache; the default "
                f"{DEFAULT_CHECKPOINT}, when it is not, becomes the random-init {FALLBACK['checkpoint']!r} "
                "preset (as happens without network); --data imdb needs the cache's copy or --data-path")


def add_flag(group) -> None:
    group.add_argument("--offline", action="store_true", help=OFFLINE_HELP)


def choose_model(args, model: ModelSpec, cfg: TrainConfig) -> tuple[ModelSpec, TrainConfig]:
    """The model and loop settings to train: as given, unless the default checkpoint can be
    neither found in the cache nor downloaded (or --offline forbids the download); then the
    random-init preset, announced on stderr in one line. Any other download failure is raised."""
    from jaxcls.ckpt import hub
    from jaxcls.ckpt.download import checkpoint_folder, missing_files
    from jaxcls.ckpt.load import resolve_checkpoint_dir
    from jaxcls.config import canonical_size
    from jaxcls.download import UnreachableError
    from jaxcls.errors import DownloadError

    if model.weights != "pretrained" or canonical_size(model.checkpoint) is None:
        if args.offline and model.weights == "pretrained" and hub.parse(model.checkpoint) is not None:
            resolve_checkpoint_dir(model.checkpoint, download=False)  # a Hub name: cached, or refused
        return model, cfg
    if model.checkpoint != DEFAULT_CHECKPOINT or not missing_files(checkpoint_folder(model.checkpoint)):
        if args.offline:  # a size the user chose: refused, naming the download, if it is not cached
            resolve_checkpoint_dir(model.checkpoint, download=False)
        return model, cfg
    if args.offline:
        why = f"--offline, and {model.checkpoint} is not in the cache"
    else:
        try:
            resolve_checkpoint_dir(model.checkpoint, progress=not args.quiet)
            return model, cfg
        except DownloadError as e:
            if not isinstance(e.__cause__, UnreachableError):
                raise
            why = f"no network ({e.__cause__.__cause__})"
    train_changes = {k: v for k, v in FALLBACK_TRAIN.items() if getattr(cfg, k) == getattr(TrainConfig, k)}
    flags = " ".join(f"--{k} {v}" for k, v in train_changes.items())
    print(f"jaxcls: {why}: training the random-init {FALLBACK['checkpoint']!r} preset instead ({flags}); "
          f"its weights are RANDOM, not GPT-2's. For the pretrained run: `jaxcls download "
          f"{model.checkpoint}` (with network), or --checkpoint DIR (a GPT-2 folder you have)",
          file=sys.stderr, flush=True)
    return model.replace(**FALLBACK), cfg.replace(**train_changes)


def check_data(args, data) -> None:
    """--offline with `--data imdb` and no --data-path: the cache's archive, or one line saying so
    before the run folder is made (the SMS data never downloads: a copy ships with jaxcls)."""
    if not args.offline or data.data != "imdb" or data.data_path:
        return
    from jaxcls.data.imdb import IMDB_FILE, imdb_cache_file
    from jaxcls.errors import DataError

    cached = imdb_cache_file()
    if not cached.is_file():
        raise DataError(f"--offline, and the IMDB archive is not in the cache ({cached}): run once "
                        f"without --offline to download it, or pass --data-path {IMDB_FILE}")


def log_copies(data, clf, log) -> None:
    """Which tokenizer files and which copy of the SMS collection this run reads."""
    from jaxcls.tokenizer import describe_tokenizer_dir

    if data.is_sms:
        from jaxcls.data.sms import describe_sms_file, sms_spam_file

        log(f"data: sms-spam from {describe_sms_file(sms_spam_file(data.data_path))}")
    if clf.tokenizer_dir is not None:
        log(f"tokenizer: {describe_tokenizer_dir(clf.tokenizer_dir)}")
