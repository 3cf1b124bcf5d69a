"""OpenAI's released GPT-2 checkpoints: where they are served, which files make one, and where
they live in the cache. The HTTP work itself is jaxcls.download's."""

from __future__ import annotations

import os
from pathlib import Path

import jaxcls.download as fetch
from jaxcls.ckpt.openai import OPENAI_FILES
from jaxcls.errors import ConfigError, DownloadError

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# The BPE files are shared by every GPT-2 size; the weights have no published hashes.
KNOWN_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SIZE_DIRS = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def size_dir(name: str) -> str:
    """OpenAI's folder name ("124M") for a model name ("gpt2-small") or for itself."""
    if name in SIZE_DIRS:
        return SIZE_DIRS[name]
    if name in SIZE_DIRS.values():
        return name
    known = ", ".join([*SIZE_DIRS, *SIZE_DIRS.values()])
    raise ConfigError(f"unknown GPT-2 model name {name!r}; expected one of: {known}")


def checkpoint_folder(name: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/models/<size>`, where a released checkpoint is (or will be) downloaded."""
    return Path(cache_dir if cache_dir is not None else fetch.cache_home()) / "models" / size_dir(name)


def missing_files(folder: Path) -> list[str]:
    """The files of an OpenAI checkpoint that `folder` lacks; [] when it is complete."""
    return [f for f in OPENAI_FILES if not (folder / f).is_file()]


def download_checkpoint(
    name: str,
    *,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
) -> Path:
    """Fetch the 7 files of an OpenAI GPT-2 checkpoint into `<cache>/models/<size>`; returns that folder.

    Files already there are kept (the BPE files only if their sha256 matches). The base URL comes
    from `base_url`, else `$JAXCLS_BASE_URL`, else OpenAI's public bucket.
    """
    size = size_dir(name)
    base = (base_url or os.environ.get("JAXCLS_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    folder = checkpoint_folder(size, cache_dir)
    for filename in OPENAI_FILES:
        try:
            fetch.download_file(
                f"{base}/{size}/{filename}",
                folder / filename,
                sha256=KNOWN_SHA256.get(filename),
                progress=progress,
                retries=retries,
                timeout=timeout,
            )
        except fetch.UnreachableError as e:
            raise DownloadError(
                f"could not reach {base}/{size}/ ({e.__cause__}); download the {len(OPENAI_FILES)} files "
                f"({', '.join(OPENAI_FILES)}) of {size} by hand into {folder}, "
                "or pass --checkpoint /path/to/folder"
            ) from e
    return folder
