"""The frozen-prefix cache. When the trainable set is a suffix of the network and nothing frozen
is random (dropout), the frozen prefix is a fixed function of each example: run it once, keep its
output (hidden states entering the first trainable block, or the pooled features when only the
head trains) and let every epoch's steps start from there. Exact: padding is masked, so cached
states padded with zeros give the same logits."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import data as data_lib
from jaxcls.config import TrainConfig
from jaxcls.train.batches import Group, Prepared
from jaxcls.train.step import StepSpec, make_features_step


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    dtype: str  # storage dtype
    memory: str  # 'host' or 'device'
    mib: float


def cache_bytes(data: Prepared, pooled: bool, n_embd: int, store: np.dtype) -> int:
    return sum(len(g.ids) * (1 if pooled else g.length) for d in data.splits.values()
               for g in d.groups) * n_embd * store.itemsize


def build(model, graphdef, trainable, frozen, data: Prepared, spec: StepSpec, start: int | None,
          cfg: TrainConfig, *, multi_device: bool, log: Callable[[str], None]) -> tuple[StepSpec, CacheInfo | None]:
    """Fill `features` of every group when caching is exact and fits the budget; -> the step spec
    the run trains with (reading cached states or token ids) and what was cached."""
    if not (cfg.cache and start is not None and start > 0 and model.config.dropout == 0.0):
        return spec, None
    n_layer = model.config.n_layer
    cached_spec = dataclasses.replace(spec, start_block=start, pooled=start == n_layer)
    store = jnp.dtype(model.config.dtype if cfg.cache_dtype == "auto" else cfg.cache_dtype)
    need = cache_bytes(data, cached_spec.pooled, model.config.n_embd, store)
    if need > cfg.cache_budget_mb * 2**20:
        log(f"frozen-prefix cache needs {need / 2**20:.0f} MiB ({store.name}), over the "
            f"{cfg.cache_budget_mb} MiB budget (--cache-budget-mb)"
            + ("; --cache-dtype bfloat16 would halve it" if store.itemsize > 2 else "")
            + ": training without it, every step runs the whole network")
        return spec, None
    t0 = time.perf_counter()
    features_step = make_features_step(graphdef, cached_spec)
    # Padding is masked, so each chunk of length-sorted texts can run at the finer bucket of its
    # own longest text; the book's 'last' pooling reads padding and needs it all.
    lengths = data_lib.fine_bucket_lengths(model.config.n_ctx) if data.pooling != "last" else None
    for d in data.splits.values():
        for g in d.groups:
            g.features = cache_features(features_step, trainable, frozen, g, cfg.batch_size, lengths, store)
    where = _place(data, need, cfg, multi_device, log)
    log(f"frozen prefix cached ({'pooled features' if cached_spec.pooled else f'blocks 0..{start - 1}'}, "
        f"{need / 2**20:.0f} MiB {store.name} in {where} memory) in {time.perf_counter() - t0:.1f}s")
    return cached_spec, CacheInfo(store.name, where, need / 2**20)


def _place(data: Prepared, need: int, cfg: TrainConfig, multi_device: bool, log) -> str:
    """Move the cached states to device memory when asked and possible; -> where they live."""
    if cfg.cache_memory != "device":
        return "host"
    free = _device_free_bytes()
    if multi_device:
        log("--cache-memory device keeps the cache on one device; with several, it stays on the host")
        return "host"
    if free is not None and need > free:
        log(f"frozen-prefix cache ({need / 2**20:.0f} MiB) does not fit the device's "
            f"{free / 2**20:.0f} MiB free: keeping it in host memory")
        return "host"
    for d in data.splits.values():
        for g in d.groups:
            g.features = jax.device_put(g.features)
    return "device"


def cache_features(features_step, trainable, frozen, group: Group, rows: int,
                   lengths: tuple[int, ...] | None, dtype=None) -> np.ndarray:
    """The frozen prefix's output for every example of `group`, in its row order, stored as
    `dtype` (default: as computed). Examples run sorted by length in chunks of `rows`, each at the
    smallest of `lengths` that holds its longest text (or at the group's length when `lengths` is
    None); positions past that are zeros, which attention masks out like any padding."""
    n, length = len(group.ids), group.length
    order = np.argsort(group.lengths, kind="stable")
    out = None
    for i in range(0, n, rows):
        chunk = order[i:i + rows]
        fill = np.concatenate([chunk, np.full(rows - len(chunk), chunk[0])])
        t = length if lengths is None else min(length, int(data_lib.length_buckets(
            group.lengths[chunk[-1:]], (*lengths, length))[0]))
        f = np.asarray(features_step(trainable, frozen, group.ids[fill, :t], group.lengths[fill]))[:len(chunk)]
        pooled = f.ndim == 2  # one vector per example: no positions to pad
        if out is None:
            out = np.zeros((n, *f.shape[1:]) if pooled else (n, length, *f.shape[2:]), dtype or f.dtype)
        if pooled:
            out[chunk] = f
        else:
            out[chunk, :t] = f
    return out




def _device_free_bytes() -> int | None:
    """Free memory on the default device, where the backend reports it (GPU, TPU; not the CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


