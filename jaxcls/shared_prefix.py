"""Rows of one example that begin alike, run once: multiple choice (`context DELIM option_i`, N
rows) repeats the context in every option row, and under GPT-2's causal mask the context's hidden
states do not depend on what follows, so they are the same in every row. Here the shared prefix
of an example runs through the blocks once, each block's keys and values are kept, and only each
option's own tokens run, attending to those keys and values and to their own, at positions that
continue the prefix. The pooled features equal the flattened rows' (`GPT2Classifier.features`),
within float rounding; tests/test_shared_prefix.py checks features, logits and gradients.

Two halves:
  `split_rows` (host, NumPy): flattened rows (B*R, T) with lengths -> `SharedRows` (prefix ids
      (B, Tp) and lengths (B,), option ids (B, R, To) and lengths (B, R)), taking as the prefix
      the longest common start of an example's present rows, so rows whose contexts were cut
      differently (two-part truncation) stay exact; each present option keeps at least one token.
  `shared_prefix_features` / `shared_prefix_logits` (pure, jit- and grad-safe): the model on that
      form -> pooled features (B*R, C) / the task's logits, rows in the flattened order.

Supported: pooling `last_real` on a causal model (the only case where a row's pooled token is a
function of the prefix and that row's tokens alone, read at a position the row knows). `last`
reads a padding position, `first` would score every option the same, and `mean` would need the
prefix's final hidden states as well; those, and `causal=False`, are refused with a ConfigError.

Dropout: the prefix gets one dropout mask shared by the example's rows (the flattened path draws
one per row), so with dropout on the two paths agree in distribution only; they are compared
exactly with dropout off (key None), which is how evaluation and prediction run."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls.errors import ConfigError, DataError
from jaxcls.model import EMBED_STREAM, build_mask, dropout, fold

PREFIX_STREAM, OPTION_STREAM = 1 << 21, 1 << 22  # dropout key streams of the two passes


class SharedRows(NamedTuple):
    """An example's rows as one shared prefix plus R option suffixes; option_len 0 = missing row."""

    prefix_ids: np.ndarray  # (B, Tp) int32, right-padded
    prefix_len: np.ndarray  # (B,) int32
    option_ids: np.ndarray  # (B, R, To) int32, right-padded
    option_len: np.ndarray  # (B, R) int32


def split_rows(ids, lengths, rows_per_example: int, *, prefix_width: int | None = None,
               option_width: int | None = None, pad_id: int = 0) -> SharedRows:
    """Flattened example-major rows (B*R, T) and their lengths (B*R,) -> `SharedRows`. Widths
    default to the longest prefix / option (at least 1); pass them to keep shapes fixed across
    batches (one compile per shape), and a width too small is a ConfigError."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    R = int(rows_per_example)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1] or R < 1 or ids.shape[0] % R:
        raise DataError(f"token ids {ids.shape} and lengths {lengths.shape} are not B*R rows of "
                        f"R={R} options each")
    if lengths.size and (lengths.min() < 0 or lengths.max() > ids.shape[1]):
        raise DataError(f"lengths must lie in [0, {ids.shape[1]}], got {lengths.min()}..{lengths.max()}")
    B, T = ids.shape[0] // R, ids.shape[1]
    rows, lens = ids.reshape(B, R, T), lengths.reshape(B, R).astype(np.int64)
    present = lens > 0
    ref = np.argmax(present, axis=1)  # an example's first present row
    ref_rows, ref_len = rows[np.arange(B), ref], lens[np.arange(B), ref]
    pos = np.arange(T)
    same = (rows == ref_rows[:, None]) & (pos < lens[..., None]) & (pos < ref_len[:, None, None])
    common = np.cumprod(same, axis=-1).sum(-1)  # each row's common start with the reference
    big = np.iinfo(np.int64).max
    prefix_len = np.minimum(np.where(present, common, big).min(1),
                            np.where(present, lens - 1, big).min(1))
    prefix_len = np.where(present.any(1), prefix_len, 0)
    option_len = np.where(present, lens - prefix_len[:, None], 0)
    Tp = _width(prefix_width, prefix_len, "prefix_width")
    To = _width(option_width, option_len, "option_width")
    ref_wide = np.zeros((B, max(Tp, T)), ids.dtype)
    ref_wide[:, :T] = ref_rows
    prefix_ids = np.where(np.arange(Tp) < prefix_len[:, None], ref_wide[:, :Tp], pad_id)
    src = np.minimum(prefix_len[:, None, None] + np.arange(To), T - 1)
    option_ids = np.where(np.arange(To) < option_len[..., None],
                          np.take_along_axis(rows, src, axis=-1), pad_id)
    return SharedRows(prefix_ids.astype(np.int32), prefix_len.astype(np.int32),
                      option_ids.astype(np.int32), option_len.astype(np.int32))


def _width(given: int | None, lens: np.ndarray, name: str) -> int:
    need = int(lens.max(initial=0))
    if given is None:
        return max(need, 1)
    if given < max(need, 1):
        raise ConfigError(f"{name}={given} is too small for these rows: they need {max(need, 1)}")
    return int(given)


def check_supported(model) -> None:
    """ConfigError unless the model's pooled token is exact under a shared prefix."""
    if model.pooling != "last_real" or not model.config.causal:
        raise ConfigError(f"shared-prefix features need pooling 'last_real' on a causal model, got "
                          f"pooling {model.pooling!r} with causal={model.config.causal}; run the "
                          f"flattened rows instead")


def _heads(cfg, t):
    return t.reshape(*t.shape[:-1], cfg.n_head, cfg.head_dim)


def attend_shared(attn, q, k, v, kp, vp, mask, mask_p, dropout_key=None):
    """One softmax over an option row's own keys and its example's prefix keys. q (B, R, Tq, C);
    k, v (B, R, To, C); kp, vp (B, Tp, C); mask (B, R, 1, Tq, To), mask_p (B, 1, 1, 1, Tp) ->
    (B, R, Tq, C). The prefix keys are read per example, never copied per option."""
    cfg = attn.config
    B, R, Tq, C = q.shape
    q, k, v, kp, vp = (_heads(cfg, t) for t in (q, k, v, kp, vp))
    scale = 1.0 / math.sqrt(cfg.head_dim)
    s_p = jnp.einsum("brqhd,bkhd->brhqk", q, kp) * scale
    s_o = jnp.einsum("brqhd,brkhd->brhqk", q, k) * scale
    Tp = s_p.shape[-1]
    scores = jnp.concatenate([s_p, s_o], axis=-1)
    allowed = jnp.concatenate([jnp.broadcast_to(mask_p, (B, R, 1, Tq, Tp)),
                               jnp.broadcast_to(mask, (B, R, 1, Tq, s_o.shape[-1]))], axis=-1)
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    probs = dropout(probs, cfg.dropout, dropout_key)
    y = (jnp.einsum("brhqk,bkhd->brqhd", probs[..., :Tp], vp)
         + jnp.einsum("brhqk,brkhd->brqhd", probs[..., Tp:], v))
    return y.reshape(B, R, Tq, C)


def prefix_block(block, x, mask, dropout_key=None, *, last: bool = False):
    """`Block.__call__` on the prefix (B, Tp, C) that also returns its keys and values; in the
    last block only the keys and values are needed (-> None, k, v)."""
    C = x.shape[-1]
    h = block.ln_1(x)
    if last:
        return (None, *jnp.split(block.attn.c_attn(h, slice(C, 3 * C)), 2, axis=-1))
    q, k, v = jnp.split(block.attn.c_attn(h), 3, axis=-1)
    y = block.attn.c_proj(block.attn.attend(q, k, v, mask, fold(dropout_key, 0)))
    x = x + dropout(y, block.dropout_rate, fold(dropout_key, 1))
    return x + dropout(block.mlp(block.ln_2(x)), block.dropout_rate, fold(dropout_key, 2)), k, v


def option_block(block, x, kp, vp, mask, mask_p, positions=None, dropout_key=None):
    """The block on option tokens x (B, R, To, C) after their prefix. With `positions` (B, R) the
    query, projection and MLP run at that one token per row (as `Block.at_positions`) -> (B, R, C)."""
    C = x.shape[-1]
    h = block.ln_1(x)
    if positions is None:
        q, k, v = jnp.split(block.attn.c_attn(h), 3, axis=-1)
    else:
        k, v = jnp.split(block.attn.c_attn(h, slice(C, 3 * C)), 2, axis=-1)
        at = positions[..., None, None]
        x, h = (jnp.take_along_axis(t, at, axis=2) for t in (x, h))  # (B, R, 1, C)
        q = block.attn.c_attn(h, slice(0, C))
    y = block.attn.c_proj(attend_shared(block.attn, q, k, v, kp, vp, mask, mask_p, fold(dropout_key, 0)))
    x = x + dropout(y, block.dropout_rate, fold(dropout_key, 1))
    x = x + dropout(block.mlp(block.ln_2(x)), block.dropout_rate, fold(dropout_key, 2))
    return x if positions is None else x[:, :, 0]


def shared_prefix_features(model, prefix_ids, prefix_len, option_ids, option_len, *, dropout_key=None):
    """Pooled float32 features (B*R, C) of the rows `prefix[:prefix_len] + option[:option_len]`,
    flattened example-major: what `model.features` gives on those rows (`last_real` pooling), for
    one prefix pass per example. A missing option (length 0) gets finite features of no meaning
    (the task masks its row). The caller keeps prefix_len + option_len <= n_ctx (the encoder's
    max_length does); positions of padding past n_ctx are clipped."""
    check_supported(model)
    cfg, L = model.config, model.config.n_layer
    (B, Tp), (_, R, To) = prefix_ids.shape, option_ids.shape
    prefix_len, option_len = jnp.asarray(prefix_len), jnp.asarray(option_len)
    key_p, key_o = fold(dropout_key, PREFIX_STREAM), fold(dropout_key, OPTION_STREAM)
    xp = model.embed(prefix_ids, fold(key_p, EMBED_STREAM))
    pos = jnp.minimum(prefix_len[:, None, None] + jnp.arange(To), cfg.n_ctx - 1)
    xo = dropout(model.wte(option_ids) + model.wpe(pos), cfg.dropout, fold(key_o, EMBED_STREAM))
    mask_pp = build_mask(cfg, Tp, jnp.maximum(prefix_len, 1))  # the prefix among itself
    mask_p = (jnp.arange(Tp) < prefix_len[:, None])[:, None, None, None, :]  # options -> prefix
    seen = jnp.maximum(option_len, 1)
    own = jnp.arange(To)[None, None, None, :] < seen[..., None, None]  # (B, R, 1, To)
    causal = jnp.tril(jnp.ones((To, To), bool))
    last = seen - 1
    for i in range(L):
        xp, kp, vp = prefix_block(model.h[i], xp, mask_pp, fold(key_p, i), last=i == L - 1)
        if i < L - 1:
            xo = option_block(model.h[i], xo, kp, vp, (causal & own)[:, :, None], mask_p,
                              dropout_key=fold(key_o, i))
        else:
            at_last = (jnp.arange(To) <= last[..., None])[:, :, None, None, :] & own[:, :, None]
            xo = option_block(model.h[i], xo, kp, vp, at_last, mask_p, last, fold(key_o, i))
    return model.ln_f(xo).astype(jnp.float32).reshape(B * R, -1)


def shared_prefix_logits(model, task, rows: SharedRows, *, dropout_key=None):
    """The task's logits (B, outputs) from `SharedRows`: what `train.step.forward` gives on the
    flattened rows. Missing options (option_len 0) are masked by the task as there."""
    features = shared_prefix_features(model, *rows, dropout_key=dropout_key)
    return task.logits_from_features(model.head, features, jnp.reshape(rows.option_len, (-1,)))
