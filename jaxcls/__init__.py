"""jaxcls: fine-tune OpenAI's GPT-2 checkpoints as text classifiers in JAX."""

from jaxcls.config import GPT2_SIZES, GPT2Config, preset
from jaxcls.errors import CheckpointError, ConfigError, DataError, DownloadError, JaxclsError
from jaxcls.model import GPT2, GPT2Classifier
from jaxcls.tokenizer import PAD_ID
from jaxcls.ckpt.load import load_pretrained, load_tokenizer
from jaxcls.classifier import Classifier

__version__ = "0.1.0"
__all__ = ["Classifier", "GPT2", "GPT2Classifier", "GPT2Config", "GPT2_SIZES", "PAD_ID", "preset",
           "load_pretrained", "load_tokenizer", "JaxclsError", "CheckpointError", "ConfigError",
           "DataError", "DownloadError"]
