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
from jaxcls.data.examples import encode_examples
from jaxcls.errors import ConfigError
from jaxcls.task import SingleLabel
from jaxcls.tokenizer import PAD_ID, pad_id_for
from jaxcls.train.step import Batch


@dataclasses.dataclass
class Prepared:
    """Every split padded into groups, and the padding policy the run settled on."""

    splits: dict  # name -> SplitData, for train / validation / test as given
    mode: str  # 'buckets', or the fixed mode: 'longest', 'context' or a number
    pad_length: int | None  # the fixed length, or None with buckets
    pooling: str  # the model's pooling for this run ('last_real' stands in for 'last' with --padding none)


def encode_split(task, encode, ds, max_length: int, log) -> tuple[list[np.ndarray], int]:
    """A split's token rows, flattened example-major (R = task.rows_per_example per example),
    through the one example encoder (data/examples.py), and how many examples were cut."""
    if task.inputs.kind == "text" and ds.fields is None:
        return data_lib.encode_texts(encode, ds.texts, max_length, source=ds.source)
    rows, enc = encode_examples(task, encode, ds.examples(), max_length, source=ds.source)
    line = enc.describe(len(ds))
    if line:
        log(f"{ds.source}: {line}")
    return [r for ex in rows for r in ex], enc.truncation.examples


def prepare_data(model, encode: Callable[[str], list[int]], splits: data_lib.DataSplits, cfg: TrainConfig,
                 log: Callable[[str], None], task=None) -> Prepared:
    """Encode every split and pad it as `cfg.padding` says. A fixed `--padding N` encodes to N
    tokens, so a pair's second part is cut by the encoder's rules, not at the pad length."""
    n_ctx = model.config.n_ctx
    mode, pooling = cfg.resolved_padding(model.pooling), model.pooling
    task = task or SingleLabel(tuple(splits.label_names))
    rows = task.rows_per_example
    max_length = min(int(mode), n_ctx) if mode.isdigit() and task.inputs.kind != "text" else n_ctx
    enc = {}
    for name in ("train", "validation", "test"):
        ds = getattr(splits, name)
        if ds is not None:
            enc[name] = (*encode_split(task, encode, ds, max_length, log), ds.labels)
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
                                pad_id=pad_id_for(model.config.n_vocab), rows_per_example=rows)
            for name, (s, t, y) in enc.items()}
    noun = "texts" if task.inputs.kind == "text" else "examples"
    for name, d in data.items():
        if d.truncated:
            log(f"{name}: {d.truncated} of {len(d)} {noun} truncated to {pad_length or n_ctx} tokens")
    return Prepared(data, mode, pad_length, pooling)


@dataclasses.dataclass
class Group:
    """Examples padded to one shared length."""

    length: int
    ids: np.ndarray  # (n * R, length) int32: the R rows of each example, adjacent
    lengths: np.ndarray  # (n * R,) int32; 0 for a missing choice option
    labels: np.ndarray  # (n,) int32, or (n, K) float32 (multilabel, regression)
    features: np.ndarray | None = None  # cached frozen-prefix output per row


@dataclasses.dataclass
class SplitData:
    name: str
    groups: list[Group]
    order: list[tuple[int, int]]  # example i -> (group, row)
    truncated: int
    pad_id: int = PAD_ID
    rows_per_example: int = 1

    def __len__(self) -> int:
        return len(self.order)


def _pad_rows(seqs, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """pad_batch for rows that may be empty (a missing choice option: all padding, length 0)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.array([len(s) for s in seqs], np.int32)


def prepare_split(name, seqs, labels, *, mode: str, pad_length: int | None, n_ctx: int,
                  truncated: int, pad_id: int = PAD_ID, rows_per_example: int = 1) -> SplitData:
    """Group a split's examples by padded length: one group for fixed padding, else a few
    power-of-two buckets by each example's longest row (`fit` runs `--padding none` as buckets with
    last_real pooling). `seqs` are the rows, R per example, flattened example-major."""
    r = rows_per_example
    labels = np.asarray(labels)
    labels = labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int32)
    if pad_length is not None:
        cut = np.array([len(s) > pad_length for s in seqs]).reshape(-1, r)
        # an example the encoder cut reaches its max_length, so a shorter pad length cuts it again:
        # these cuts include the encoder's whenever there are any, and a text is counted once
        truncated = max(truncated, int(cut.any(axis=1).sum()))
        seqs = [s[:pad_length] for s in seqs]
        targets = np.full(len(seqs) // r, pad_length)
    else:
        lengths = np.array([len(s) for s in seqs]).reshape(-1, r).max(axis=1)
        targets = data_lib.length_buckets(lengths, data_lib.default_bucket_lengths(n_ctx))
    groups, order = [], [None] * len(targets)
    for g, length in enumerate(sorted(set(int(t) for t in targets))):
        members = np.flatnonzero(targets == length)
        rows = [seqs[i * r + k] for i in members for k in range(r)]
        ids, lens = (data_lib.pad_batch(rows, length, pad_id) if r == 1 else _pad_rows(rows, length, pad_id))
        groups.append(Group(length, ids, lens, labels[members]))
        for row, i in enumerate(members):
            order[i] = (g, row)
    return SplitData(name, groups, order, truncated, pad_id, r)


def plan_batches(split: SplitData, rows: int, *, shuffle: bool, seed: int, epoch: int,
                 drop_last: bool, mixed: bool = False) -> list[tuple[int | None, np.ndarray]]:
    """(group, row indices) per batch; a pure function of (seed, epoch), so a resumed run replays
    the same order. One group, or `mixed`: the book's loader over the whole split, with group None
    and example indices (each batch then takes the length of its longest member's group).
    Otherwise: shuffle within each group, then the batches."""
    if len(split.groups) == 1 or mixed:
        n = len(split) if mixed else len(split.groups[0].labels)
        return [(None if mixed else 0, b)
                for b in data_lib.batches(n, rows, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)]
    rng = np.random.default_rng((seed, epoch))
    plan = []
    for g, group in enumerate(split.groups):
        idx = rng.permutation(len(group.labels)) if shuffle else np.arange(len(group.labels))
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
    """Arrays (micro, rows / micro, ...) for `rows` examples, their token rows (R each) flattened
    example-major; missing examples repeat the first with weight 0. Inputs are host arrays, or
    device arrays when the cached states live on the device."""
    r = split.rows_per_example
    fill = np.concatenate([idx, np.full(rows - len(idx), idx[0])]).astype(np.int64)
    weights = (np.arange(rows) < len(idx)).astype(np.float32)
    pairs = [(group, int(i)) for i in fill] if group is not None else [split.order[i] for i in fill]
    row_pairs = [(g, e * r + k) for g, e in pairs for k in range(r)]
    length = batch_length(split, group, idx)
    if use_features and isinstance(split.groups[0].features, jax.Array):
        gids, rids = (np.array(x, np.int32) for x in zip(*row_pairs))
        inputs = _device_rows(tuple(g.features for g in split.groups), gids, rids, length)
    elif group is not None:
        g = split.groups[group]
        row_fill = (fill[:, None] * r + np.arange(r)).reshape(-1)
        inputs = g.features[row_fill] if use_features else g.ids[row_fill]
    else:
        inputs = _host_rows(split, row_pairs, length, use_features)
    lengths = np.array([split.groups[g].lengths[i] for g, i in row_pairs], np.int32)
    labels = np.stack([split.groups[g].labels[i] for g, i in pairs])
    parts = (inputs, lengths, labels, weights)
    return Batch(*(p.reshape(micro, -1, *p.shape[1:]) for p in parts))


