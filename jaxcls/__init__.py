"""jaxcls: fine-tune OpenAI's GPT-2 checkpoints as text classifiers in JAX.

`__all__` is the public API; the modules behind it may move. The layers, each importing only
the ones above it in this list (tests/test_layout.py checks it): config, model, task, tokenizer
(the core) -> ckpt (checkpoints, saved folders) and data (tables, labels, splits) -> train (the
fine-tuning program and loop) and infer (predictor, files, server) -> classifier (the facade) -> cli.
"""

import importlib

_EXPORTS = {  # name -> the module that owns it; imported on first use, so `jaxcls classify` loads
    # only what it runs (importing every layer up front took 0.5 s of its start-up)
    "load_pretrained": "jaxcls.ckpt.load", "load_tokenizer": "jaxcls.ckpt.load",
    "Classifier": "jaxcls.classifier",
    **dict.fromkeys(("GPT2_SIZES", "DataSpec", "GPT2Config", "ModelSpec", "TrainConfig", "preset"), "jaxcls.config"),
    **dict.fromkeys(("DataSplits", "TextDataset", "load_data", "load_sms_spam", "load_spec"), "jaxcls.data"),
    **dict.fromkeys(("CheckpointError", "ConfigError", "DataError", "DownloadError", "JaxclsError",
                     "TrainingError"), "jaxcls.errors"),
    "Predictor": "jaxcls.infer.predictor",
    "GPT2": "jaxcls.model", "GPT2Classifier": "jaxcls.model",
    "SingleLabel": "jaxcls.task",
    "PAD_ID": "jaxcls.tokenizer",
    "FitResult": "jaxcls.train", "build_program": "jaxcls.train", "fit": "jaxcls.train",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxcls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)
