"""jaxcls: fine-tune OpenAI's GPT-2 checkpoints as text classifiers in JAX.

`__all__` is the public API; the modules behind it may move. The layers, each importing only
the ones above it in this list (tests/test_layout.py checks it): config, model, task, tokenizer
(the core) -> ckpt (checkpoints, saved folders) and data (tables, labels, splits) -> train (the
fine-tuning program and loop) and infer (predictor, files, server) -> classifier (the facade) -> cli.
"""

from jaxcls.ckpt.load import load_pretrained, load_tokenizer
from jaxcls.classifier import Classifier
from jaxcls.config import GPT2_SIZES, DataSpec, GPT2Config, ModelSpec, TrainConfig, preset
from jaxcls.data import DataSplits, TextDataset, load_data, load_sms_spam, load_spec
from jaxcls.errors import CheckpointError, ConfigError, DataError, DownloadError, JaxclsError, TrainingError
from jaxcls.infer.predictor import Predictor
from jaxcls.model import GPT2, GPT2Classifier
from jaxcls.task import SingleLabel
from jaxcls.tokenizer import PAD_ID
from jaxcls.train import FitResult, build_program, fit

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Classifier", "ConfigError", "DataError", "DataSpec", "DataSplits", "DownloadError",
           "FitResult", "GPT2", "GPT2Classifier", "GPT2Config", "GPT2_SIZES", "JaxclsError", "ModelSpec", "PAD_ID",
           "Predictor", "SingleLabel", "TextDataset", "TrainConfig", "TrainingError", "build_program", "fit",
           "load_data", "load_pretrained", "load_sms_spam", "load_spec", "load_tokenizer", "preset"]
