"""GPT-2's byte-pair encoding as a tiktoken Encoding, built offline from a checkpoint's own files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import tiktoken

from jaxcls.assets import packaged_tokenizer_dir
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
    """The tokenizer stored in a folder (a checkpoint's or a saved classifier's). A folder without
    the files is refused naming it, never filled from elsewhere; `folder=None` means the copy
    packaged with jaxcls (jaxcls/assets/gpt2), never the network. Turning a size name into its
    folder is jaxcls.ckpt.load.load_tokenizer's work, so that reading a tokenizer never starts a
    checkpoint download."""
    if folder is None:
        return encoding_from_files(*tokenizer_files(packaged_tokenizer_dir()))
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (looking for tokenizer files)")
    files = tokenizer_files(folder)
    if files is None:
        raise CheckpointError(
            f"{folder}: no tokenizer files (encoder.json + vocab.bpe, or vocab.json + merges.txt); "
            "copy them from the GPT-2 checkpoint it came from")
    return encoding_from_files(*files)


def tokenizer_dir_for(folder: str | Path | None) -> Path:
    """The folder whose tokenizer files to read: `folder`'s own, else the copy packaged with
    jaxcls. GPT-2's released sizes all share one BPE, so a checkpoint folder without its tables
    (or a random-init preset, which has no folder) loses nothing by using the packaged copy."""
    if folder is not None and Path(folder).is_dir() and tokenizer_files(Path(folder)) is not None:
        return Path(folder)
    return packaged_tokenizer_dir()


def describe_tokenizer_dir(folder: Path) -> str:
    """For the log: which copy of the tokenizer a run uses."""
    if Path(folder).resolve() == packaged_tokenizer_dir():
        return f"GPT-2 BPE packaged with jaxcls ({folder})"
    return f"GPT-2 BPE from {folder}"


# tiktoken's regex overflows its backtracking stack on one whitespace run of 999,999 characters
# or more (measured with tiktoken 0.14: a PanicException, not an error). Runs longer than
# WHITESPACE_CHUNK + 1 are encoded in WHITESPACE_CHUNK-character chunks, far below that limit.
WHITESPACE_CHUNK = 65_536
_WS_CHARS = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
             + "\u2028\u2029\u202f\u205f\u3000")  # Unicode White_Space: the regex's \s
_LONG_RUN = re.compile(f"(?<![{_WS_CHARS}])[{_WS_CHARS}]{{{WHITESPACE_CHUNK + 2},}}")
# A piece of GPT-2's pre-tokenizer never runs from a non-space into a space, so the tokens of
# text[:p] are the first tokens of text when text[p-1] is not a space and text[p] is one.
_CUT_REVERSED = re.compile(r"[ \t\n\r\x0b\x0c](?=\S)")


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Texts are data, never control: '<|endoftext|>' inside a message is encoded as plain text.

    GPT-2's ids, except inside a whitespace run longer than WHITESPACE_CHUNK + 1 characters: its
    pre-tokenizer piece (the run less its last character when text follows) is encoded in chunks
    of WHITESPACE_CHUNK characters. For runs of one repeated character (spaces, newlines, tabs,
    no-break spaces) and of '\\r\\n' that is exactly GPT-2's encoding of the whole run."""
    ids: list[int] = []
    pos = 0
    for run in _LONG_RUN.finditer(text):
        start, end = run.span()
        ids += enc.encode_ordinary(text[pos:start])
        piece_end = end - 1 if end < len(text) else end
        for c in range(start, piece_end, WHITESPACE_CHUNK):
            ids += enc.encode_ordinary(text[c:min(c + WHITESPACE_CHUNK, piece_end)])
        pos = piece_end
    return ids + enc.encode_ordinary(text[pos:])


def _safe_cut(text: str, n: int) -> int:
    """The largest p <= n (0 if none) at which `encode(text[:p])` is a prefix of `encode(text)`:
    a non-space followed by a space, or a chunk boundary inside a long whitespace run."""
    window = text[max(0, n // 2 - 1):n + 1]
    hit = _CUT_REVERSED.search(window[::-1])
    cut = n - hit.start() if hit else 0
    tail = len(text[:n]) - len(text[:n].rstrip(_WS_CHARS))  # the whitespace run ending at n
    if tail > WHITESPACE_CHUNK and n < len(text):
        start = n - tail
        cut = max(cut, start + (n - 1 - start) // WHITESPACE_CHUNK * WHITESPACE_CHUNK)
    return cut


def first_tokens(encode: Callable[[str], Sequence[int]], text: str, max_tokens: int) -> list[int]:
    """`encode(text)[:max_tokens]`, reading only as much of `text` as that needs.

    Encodes a growing prefix of the text cut where the pre-tokenizer must cut too (see _safe_cut),
    so the ids are exactly the first ones of the whole text. `encode` must split text as GPT-2's
    pre-tokenizer does (`encode` above, or a per-character encoder); a huge text costs about
    twice the prefix its first `max_tokens` tokens span."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    n = 4 * max_tokens + 16
    while n < len(text):
        cut = _safe_cut(text, n)
        if cut:
            ids = encode(text[:cut])
            if len(ids) >= max_tokens:
                return list(ids[:max_tokens])
        n *= 2
    return list(encode(text))[:max_tokens]
