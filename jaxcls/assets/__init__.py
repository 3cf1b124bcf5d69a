"""Small, freely licensed files shipped inside the package so that the main job runs offline:
GPT-2's byte-pair encoding (MIT, OpenAI's gpt-2 repository) and the UCI SMS Spam Collection
(CC BY 4.0, Almeida & Hidalgo). Each file is checked against its sha256 before use, so a copy
damaged after installation is refused, naming it, rather than silently changing results."""

from __future__ import annotations

import functools
from pathlib import Path

from jaxcls.errors import JaxclsError
from jaxcls.fileio import sha256_files

ASSETS = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS / "gpt2"
SMS_SPAM_ZIP = ASSETS / "sms_spam" / "sms+spam+collection.zip"

# The tokenizer hashes are the ones tiktoken pins for its `gpt2` encoding
# (tiktoken_ext/openai_public.py); the SMS zip's is that of the copy shipped here.
SHA256 = {
    TOKENIZER_DIR / "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    TOKENIZER_DIR / "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    SMS_SPAM_ZIP: "c9f231bf9be81dc188ef6832bb00596a20a893a94dfeca07abf686481f136da1",
}


class AssetError(JaxclsError):
    """A packaged file is missing or no longer the one the package was built with."""


@functools.cache
def _verified(path: Path) -> Path:
    if not path.is_file():
        raise AssetError(f"{path}: packaged file missing; reinstall jaxcls (pip install --force-reinstall jaxcls)")
    actual = sha256_files([path])
    if actual != SHA256[path]:
        raise AssetError(f"{path}: packaged file damaged (sha256 {actual}, expected {SHA256[path]}); "
                         "reinstall jaxcls")
    return path


def packaged(path: Path) -> Path:
    """`path` (one of SHA256's keys) once its sha256 is checked (once per process)."""
    return _verified(path)


def packaged_tokenizer_dir() -> Path:
    """The folder holding the packaged encoder.json and vocab.bpe, both checked."""
    for name in ("encoder.json", "vocab.bpe"):
        packaged(TOKENIZER_DIR / name)
    return TOKENIZER_DIR
