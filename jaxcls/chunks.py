"""Large CPU inference batches run as a loop over row chunks inside one program.

On XLA:CPU a batch of many rows runs slower per row than a few smaller ones in sequence: each
chunk's activations stay in cache between the elementwise passes around the matmuls. A `lax.map`
keeps one compiled body, so the compile costs what one chunk's does; accelerators run the batch
whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Tokens per model call inside one CPU inference program (`row_chunks`). gpt2-small, batch 64 x 120,
# chunks of 16 rows (1,920 tokens) against the whole batch at once: 48.7 vs 41.3 examples/s in
# bfloat16, 12.0 vs 10.3 in float32; chunks of 8 or 32 rows were slower than 16 (Intel Xeon, AMX-BF16).
CPU_CHUNK_TOKENS = 2048


def row_chunks(B: int, T: int, platform: str | None = None) -> int:
    """Rows per model call when an inference program runs B rows of T tokens: equal chunks of at
    most about CPU_CHUNK_TOKENS on the CPU; B (one call) on accelerators or for a small batch."""
    if (platform or jax.default_backend()) != "cpu":
        return B
    pieces = -(-B * T // CPU_CHUNK_TOKENS)
    return B if pieces <= 1 else -(-B // pieces)


def over_row_chunks(fn, *arrays, rows: int):
    """fn(*arrays) computed `rows` leading rows at a time: the whole chunks in one `lax.map` (one
    compiled body), a shorter remainder in one more call; results joined along rows. Exact for a
    row-wise fn (inference: no batch statistics, no dropout)."""
    B = arrays[0].shape[0]
    if rows >= B:
        return fn(*arrays)
    n, rest = divmod(B, rows)
    whole = jax.lax.map(lambda xs: fn(*xs), tuple(a[:n * rows].reshape(n, rows, *a.shape[1:]) for a in arrays))
    out = whole.reshape(n * rows, *whole.shape[2:])
    if rest:
        out = jnp.concatenate([out, fn(*(a[n * rows:] for a in arrays))])
    return out


def inference_features(model, token_ids, lengths):
    """`model.features` as the inference programs run it: in row chunks on the CPU (`row_chunks`)."""
    B, T = token_ids.shape
    return over_row_chunks(model.features, token_ids, lengths, rows=row_chunks(B, T))
