"""Training data as fixed-shape batches: each split padded into length groups, a seeded plan of
batches per epoch (a pure function of seed and epoch, so a resumed run replays it), and the
arrays of one step. `prepare_data` is the one place that turns the padding settings into shapes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import data as data_lib
from jaxcls.config import TrainConfig
from jaxcls.errors import ConfigError
from jaxcls.tokenizer import PAD_ID, pad_id_for
from jaxcls.train.step import Batch


@dataclasses.dataclass
class Prepared:
    """Every split padded into groups, and the padding policy the run settled on."""

    splits: dict  # name -> SplitData, for train / validation / test as given
    mode: str  # 'buckets', or the fixed mode: 'longest', 'context' or a number
    pad_length: int | None  # the fixed length, or None with buckets
    pooling: str  # the model's pooling for this run ('last_real' stands in for 'last' with --padding none)


def prepare_data(model, encode: Callable[[str], list[int]], splits: data_lib.DataSplits, cfg: TrainConfig,
                 log: Callable[[str], None]) -> Prepared:
    """Encode every split and pad it as `cfg.padding` says."""
    n_ctx = model.config.n_ctx
    mode, pooling = cfg.resolved_padding(), model.pooling
    enc = {}
    for name in ("train", "validation", "test"):
        ds = getattr(splits, name)
        if ds is not None:
            enc[name] = (*data_lib.encode_texts(encode, ds.texts, n_ctx, source=ds.source), ds.labels)
    pad_length = (data_lib.resolve_pad_length(mode, enc["train"][0], n_ctx)
                  if mode in ("longest", "context") or mode.isdigit() else None)
    if mode == "none":
        # Unpadded texts pooled at their last token are exactly last_real pooling with the padding
        # masked, which lets length buckets stand in for one compile per distinct length.
        if pooling == "last":
            pooling = "last_real"
            log("padding none: pooling at the last token of unpadded texts = last_real with length buckets")
        mode = "buckets"
    if mode == "buckets" and pooling == "last":
        raise ConfigError("padding 'buckets' with pooling 'last' would pool at padding positions "
                          "that differ between buckets; use --padding longest/context/N/none, or "
                          "--pooling last_real")
    data = {name: prepare_split(name, s, y, mode=mode, pad_length=pad_length, n_ctx=n_ctx, truncated=t,
                                pad_id=pad_id_for(model.config.n_vocab))
            for name, (s, t, y) in enc.items()}
    for name, d in data.items():
        if d.truncated:
            log(f"{name}: {d.truncated} of {len(d)} texts truncated to {pad_length or n_ctx} tokens")
    return Prepared(data, mode, pad_length, pooling)


@dataclasses.dataclass
class Group:
    """Examples padded to one shared length."""

    length: int
    ids: np.ndarray  # (n, length) int32
    lengths: np.ndarray  # (n,) int32
    labels: np.ndarray  # (n,) int32
    features: np.ndarray | None = None  # cached frozen-prefix output per example


@dataclasses.dataclass
class SplitData:
    name: str
    groups: list[Group]
    order: list[tuple[int, int]]  # example i -> (group, row)
    truncated: int
    pad_id: int = PAD_ID

    def __len__(self) -> int:
        return len(self.order)


def prepare_split(name, seqs, labels, *, mode: str, pad_length: int | None, n_ctx: int,
                  truncated: int, pad_id: int = PAD_ID) -> SplitData:
    """Group a split's token arrays by padded length: one group for fixed padding, else a few
    power-of-two buckets (`fit` runs `--padding none` as buckets with last_real pooling)."""
    if pad_length is not None:
        truncated += sum(len(s) > pad_length for s in seqs)
        seqs = [s[:pad_length] for s in seqs]
        targets = np.full(len(seqs), pad_length)
    else:
        lengths = np.array([len(s) for s in seqs])
        targets = data_lib.length_buckets(lengths, data_lib.default_bucket_lengths(n_ctx))
    groups, order = [], [None] * len(seqs)
    for g, length in enumerate(sorted(set(int(t) for t in targets))):
        members = np.flatnonzero(targets == length)
        ids, lens = data_lib.pad_batch([seqs[i] for i in members], length, pad_id)
        groups.append(Group(length, ids, lens, np.asarray(labels)[members].astype(np.int32)))
        for row, i in enumerate(members):
            order[i] = (g, row)
    return SplitData(name, groups, order, truncated, pad_id)


def plan_batches(split: SplitData, rows: int, *, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, mixed: bool = False) -> list[tuple[int | None, np.ndarray]]:
    """(group, row indices) per batch; a pure function of (seed, epoch), so a resumed run replays
    the same order. One group, or `mixed`: the book's loader over the whole split, with group None
    and example indices (each batch then takes the length of its longest member's group).
    Otherwise: shuffle within each group, then the batches."""
    if len(split.groups) == 1 or mixed:
        n = len(split) if mixed else len(split.groups[0].ids)
        return [(None if mixed else 0, b)
                for b in data_lib.batches(n, rows, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)]
    rng = np.random.default_rng((seed, epoch))
    plan = []
    for g, group in enumerate(split.groups):
        idx = rng.permutation(len(group.ids)) if shuffle else np.arange(len(group.ids))
        plan += [(g, idx[i:i + rows]) for i in range(0, len(idx), rows)]
    if shuffle:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def batch_length(split: SplitData, group: int | None, idx: np.ndarray) -> int:
    """The padded length a planned batch runs at."""
    if group is not None:
        return split.groups[group].length
    return max(split.groups[split.order[i][0]].length for i in idx)


def _host_rows(split: SplitData, pairs, length: int, use_features: bool) -> np.ndarray:
    """Rows from several groups, padded to `length`: ids with the pad id, cached states with zeros
    (padded positions are masked out of attention and never pooled, so their value does not reach
    the logits)."""
    if use_features:
        sample = split.groups[pairs[0][0]].features[0]
        shape = sample.shape if sample.ndim == 1 else (length, *sample.shape[1:])
        inputs = np.zeros((len(pairs), *shape), sample.dtype)
    else:
        inputs = np.full((len(pairs), length), split.pad_id, np.int32)
    for k, (g, r) in enumerate(pairs):
        src = split.groups[g].features[r] if use_features else split.groups[g].ids[r]
        inputs[k, :len(src)] = src
    return inputs


@functools.partial(jax.jit, static_argnames="length")
def _device_rows(features: tuple, group_ids, row_ids, length: int) -> jax.Array:
    """The same from device-resident cached states (`--cache-memory device`): every group's rows
    gathered, cut or padded to `length`, and picked per row, in one program per batch shape, so a
    step's inputs never leave the device."""
    out = None
    for g, f in enumerate(features):
        x = jnp.take(f, jnp.where(group_ids == g, row_ids, 0), axis=0)
        if x.ndim == 3:
            x = x[:, :length] if x.shape[1] >= length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
        pick = (group_ids == g).reshape(-1, *(1,) * (x.ndim - 1))
        out = x if out is None else jnp.where(pick, x, out)
    return out


def make_batch(split: SplitData, group: int | None, idx: np.ndarray, rows: int, micro: int,
               use_features: bool) -> Batch:
    """Arrays (micro, rows / micro, ...); missing rows repeat the first with weight 0. Inputs are
    host arrays, or device arrays when the cached states live on the device."""
    fill = np.concatenate([idx, np.full(rows - len(idx), idx[0])]).astype(np.int64)
    weights = (np.arange(rows) < len(idx)).astype(np.float32)
    pairs = [(group, int(r)) for r in fill] if group is not None else [split.order[i] for i in fill]
    length = batch_length(split, group, idx)
    if use_features and isinstance(split.groups[0].features, jax.Array):
        gids, rids = (np.array(x, np.int32) for x in zip(*pairs))
        inputs = _device_rows(tuple(g.features for g in split.groups), gids, rids, length)
    elif group is not None:
        g = split.groups[group]
        inputs = g.features[fill] if use_features else g.ids[fill]
    else:
        inputs = _host_rows(split, pairs, length, use_features)
    lengths = np.array([split.groups[g].lengths[r] for g, r in pairs], np.int32)
    labels = np.array([split.groups[g].labels[r] for g, r in pairs], np.int32)
    parts = (inputs, lengths, labels, weights)
    return Batch(*(p.reshape(micro, rows // micro, *p.shape[1:]) for p in parts))


