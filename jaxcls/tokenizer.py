"""GPT-2's byte-pair encoding as a tiktoken Encoding, built offline from a checkpoint's own files."""

from __future__ import annotations

from pathlib import Path

import tiktoken

from jaxcls.errors import CheckpointError

PAD_ID = 50256  # <|endoftext|>, GPT-2's only special token; the book pads with it


def pad_id_for(n_vocab: int) -> int:
    """GPT-2 pads with <|endoftext|>; a smaller vocabulary pads with its last id (an id past the
    embedding table gathers NaN; padding is masked or, for `last` pooling, the same everywhere)."""
    return min(PAD_ID, n_vocab - 1)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FILE_PAIRS = (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json"))


def tokenizer_files(folder: Path) -> tuple[Path, Path] | None:
    """(merges, vocab) in OpenAI's names or HF's; both layouts hold the same two tables."""
    for merges, vocab in FILE_PAIRS:
        if (folder / merges).is_file() and (folder / vocab).is_file():
            return folder / merges, folder / vocab
    return None


def encoding_from_files(merges: Path, vocab: Path) -> tiktoken.Encoding:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
    except Exception as e:  # tiktoken raises bare asserts and KeyErrors on malformed tables
        raise CheckpointError(f"{merges} / {vocab}: not GPT-2 BPE files ({type(e).__name__}: {e})") from None
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": PAD_ID})


def tokenizer_from_folder(folder: str | Path | None = None) -> tiktoken.Encoding:
    """The tokenizer stored in a folder (a checkpoint's or a saved classifier's); tiktoken's own
    `gpt2` encoding, which needs the network on first use, only when the folder has none. Turning
    a size name into its folder is jaxcls.ckpt.load.load_tokenizer's work, so that reading a
    tokenizer never starts a checkpoint download."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder (looking for tokenizer files)")
        files = tokenizer_files(folder)
        if files is not None:
            return encoding_from_files(*files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise CheckpointError(
            f"no tokenizer files (encoder.json + vocab.bpe, or vocab.json + merges.txt) in "
            f"{folder}, and tiktoken could not fetch its gpt2 encoding ({e})") from None


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Texts are data, never control: '<|endoftext|>' inside a message is encoded as plain text."""
    return enc.encode_ordinary(text)
