"""Tokens, padding and batches: the one place that decides how texts become padded id arrays.

Plain Python and NumPy; no JAX.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxcls.errors import DataError
from jaxcls.tokenizer import PAD_ID, first_tokens

PADDING_MODES = ("longest", "context", "none")


def encode_texts(
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    max_length: int,
    *,
    source: str = "texts",
) -> tuple[list[np.ndarray], int]:
    """Token arrays (int32) cut to `max_length`, and how many were cut.

    The book keeps the first `max_length` tokens; so does this. A text with no tokens cannot be
    classified (there is no last token to pool), so it raises naming `source` and its index.
    Only the start of a text that `max_length + 1` tokens need is read (tokenizer.first_tokens),
    so a text of millions of characters costs no more than a short one.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    seqs, truncated = [], 0
    for i, text in enumerate(texts):
        ids = np.asarray(first_tokens(encode, text, max_length + 1), dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise DataError(f"{source}: text at index {i} encodes to no tokens: {text[:80]!r}")
        if ids.size > max_length:
            ids = ids[:max_length]
            truncated += 1
        seqs.append(ids)
    return seqs, truncated


def pad_batch(
    seqs: Sequence[np.ndarray], length: int | None = None, pad_id: int = PAD_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to `length` (None: the batch's longest): ids int32 [B, L] and lengths int32 [B].

    The lengths let the model pool at each text's last real token instead of a pad.
    """
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    if length is None:
        length = int(lengths.max()) if len(seqs) else 0
    if len(seqs) and lengths.min() == 0:
        raise DataError(f"sequence {int(np.argmin(lengths))} of the batch is empty")
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(
                f"sequence {i} of the batch has {len(s)} tokens, more than the pad length {length}"
            )
        ids[i, : len(s)] = s
    return ids, lengths


def resolve_pad_length(
    padding: str | int, train_seqs: Sequence[np.ndarray], context_length: int
) -> int | None:
    """Fixed pad length for `padding`, or None for per-batch lengths.

    "longest" (the book's default) is the longest training sequence, "context" the model's
    context_length, "none" pads each batch to its own longest; an int (or digit string, as from
    the command line) must lie in 1..context_length.
    """
    if isinstance(padding, str) and padding.strip().isdigit():
        padding = int(padding)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer, str)):
        raise DataError(f"padding must be one of {PADDING_MODES} or an integer, got {padding!r}")
    if isinstance(padding, str):
        if padding == "none":
            return None
        if padding == "context":
            return int(context_length)
        if padding != "longest":
            raise DataError(
                f"padding must be one of {PADDING_MODES} or an integer, got {padding!r}"
            )
        if not len(train_seqs):
            raise DataError("padding 'longest' needs training sequences, got none")
        longest = max(len(s) for s in train_seqs)
        if longest > context_length:
            raise DataError(
                f"padding 'longest': the longest training sequence has {longest} tokens, more than "
                f"context_length {context_length}; truncate the texts first"
            )
        return int(longest)
    if not 1 <= padding <= context_length:
        raise DataError(
            f"padding must be between 1 and context_length {context_length}, got {padding}"
        )
    return int(padding)


def batches(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool
) -> list[np.ndarray]:
    """Index batches over range(n). The shuffled order depends only on (seed, epoch), so a run
    resumed at an epoch replays exactly the order it would have seen."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def length_buckets(lengths: np.ndarray, bucket_lengths: Sequence[int]) -> np.ndarray:
    """The smallest bucket length >= each length: padding to a few lengths bounds recompiles."""
    buckets = np.sort(np.asarray(bucket_lengths, dtype=np.int64))
    lengths = np.asarray(lengths)
    if buckets.size == 0:
        raise ValueError("bucket_lengths is empty")
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(
            f"length {int(lengths.max())} exceeds the largest bucket {int(buckets[-1])}"
        )
    return buckets[np.searchsorted(buckets, lengths, side="left")].astype(np.int32)


def fine_bucket_lengths(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two and 1.5 times them (16, 24, 32, 48, 64, 96, 128, 192, ...) from `smallest`,
    capped by `max_length`: inference pads less than with powers of two alone, for a few more
    compiled shapes."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}")
    sizes = sorted({n for k in range(1, max_length.bit_length() + 1) for n in (2 ** k, 3 * 2 ** (k - 1))})
    out = [n for n in sizes if smallest <= n < max_length]
    return (*out, max_length)


def default_bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest`, capped by `max_length` as the last bucket."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length}, {smallest}")
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)
