"""The frozen-prefix cache. When the trainable set is a suffix of the network and nothing frozen
is random (dropout), the frozen prefix is a fixed function of each example: run it once, keep its
output (hidden states entering the first trainable block, or the pooled features when only the
head trains) and let every epoch's steps start from there. Exact: padding is masked, so cached
states padded with zeros give the same logits."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import data as data_lib
from jaxcls.config import TrainConfig
from jaxcls.fileio import OWNER, atomic_write_json, dead_here, owner_tag
from jaxcls.precision import cast_kernels
from jaxcls.train.batches import Group, Prepared
from jaxcls.train.step import StepSpec, make_features_step


# Examples per call while filling the cache (inference, so not the training batch): the book's SMS
# splits on gpt2-small in bfloat16 on MKL (2-core Intel Xeon, AMX) took 15.5 s at 32, 18.7 s at 8, 19.7 s at 64.
CACHE_ROWS = 32


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    dtype: str  # storage dtype
    memory: str  # 'host', 'device', or 'disk' (spilled to a memory-mapped file)
    mib: float
    spill: "Spill | None" = None


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
    spill = None
    if need > cfg.cache_budget_mb * 2**20:
        over = (f"frozen-prefix cache needs {need / 2**20:.0f} MiB ({store.name}), over the "
                f"{cfg.cache_budget_mb} MiB budget (--cache-budget-mb)"
                + ("; --cache-dtype bfloat16 would halve it" if store.itemsize > 2 else ""))
        spill, why = _open_spill(data, cached_spec.pooled, model.config.n_embd, store, need, cfg)
        if spill is None:
            log(f"{over}: training without it, every step runs the whole network ({why})")
            return spec, None
        log(f"{over}: spilling it to {spill.path}")
    t0 = time.perf_counter()
    features_step = make_features_step(graphdef, cached_spec)
    frozen = cast_kernels(frozen, model.config, pack=True)  # the fill is inference: the AMX kernel's layout
    # Padding is masked, so each chunk of length-sorted texts can run at the finer bucket of its
    # own longest text; the book's 'last' pooling reads padding and needs it all.
    lengths = data_lib.fine_bucket_lengths(model.config.n_ctx) if data.pooling != "last" else None
    for d in data.splits.values():
        for g in d.groups:
            g.features = cache_features(features_step, trainable, frozen, g, CACHE_ROWS, lengths, store,
                                        out=spill.views.pop(0) if spill else None)
    where = "disk" if spill else _place(data, need, cfg, multi_device, log)
    log(f"frozen prefix cached ({'pooled features' if cached_spec.pooled else f'blocks 0..{start - 1}'}, "
        f"{need / 2**20:.0f} MiB {store.name} in "
        f"{'a memory-mapped file' if spill else where + ' memory'}) in {time.perf_counter() - t0:.1f}s")
    if spill:
        spill.flush()
    return cached_spec, CacheInfo(store.name, where, need / 2**20, spill)


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
                   lengths: tuple[int, ...] | None, dtype=None, out: np.ndarray | None = None) -> np.ndarray:
    """The frozen prefix's output for every example of `group`, in its row order, stored as
    `dtype` (default: as computed). Examples run sorted by length in chunks of `rows`, each at the
    smallest of `lengths` that holds its longest text (or at the group's length when `lengths` is
    None); positions past that are zeros, which attention masks out like any padding. `out`, when
    given, is the zero-filled array to write into (a spilled cache's memory-mapped view)."""
    n, length = len(group.ids), group.length
    order = np.argsort(group.lengths, kind="stable")
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


# A spilled cache kept with --keep-cache: its file, and the description naming it.
KEPT_FILE, KEPT_INDEX = re.compile(r"prefix-cache-[0-9a-f]{12}\.bin"), "prefix-cache.json"
_SPILL_TMP = re.compile(rf"\.tmp-prefix-cache-{OWNER}-[0-9a-f]+\.bin")


def remove_dead_spills(folder: Path) -> list[Path]:
    """Spilled caches of runs on this host that no longer run (the host and PID in the name): a
    killed run's file is only ever named as temporary, so no later run reads it, and the next one
    in the folder removes it. A live process's file stays, and so does another host's."""
    removed = []
    for path in folder.glob(".tmp-prefix-cache-*.bin"):
        m = _SPILL_TMP.fullmatch(path.name)
        if m is None or not dead_here(m["host"], int(m["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _open_spill(data: Prepared, pooled: bool, n_embd: int, store, need: int, cfg: TrainConfig):
    """-> (the Spill, None), or (None, why not): no folder to spill to, or too little room there."""
    folder = cfg.cache_dir or cfg.out
    if folder is None:
        return None, "give --cache-dir or --out to spill it to disk"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_spills(folder)
    free = shutil.disk_usage(folder).free
    if need > free:
        return None, f"{folder} has {free / 2**20:.0f} MiB free, too little to spill it"
    shapes = [(len(g.ids), n_embd) if pooled else (len(g.ids), g.length, n_embd)
              for d in data.splits.values() for g in d.groups]
    return Spill(folder, shapes, np.dtype(store), keep=cfg.keep_cache), None


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class Spill:
    """A cache too large for the budget, in one memory-mapped file: every group's states back to
    back, in the order `build` fills them. While the run lives the file is named as temporary,
    with its PID; at the end it is deleted, or with `keep` renamed to prefix-cache-<id>.bin and
    described by prefix-cache.json (written after the rename, so the description only ever
    names a complete file). A process that dies early leaves only a temporary name."""

    def __init__(self, folder: Path, shapes: list[tuple[int, ...]], dtype: np.dtype, *, keep: bool):
        self.folder, self.keep, self.shapes, self.dtype = folder, keep, shapes, dtype
        self.id = uuid.uuid4().hex[:12]
        self.path = folder / f".tmp-prefix-cache-{owner_tag()}-{self.id}.bin"
        total = sum(int(np.prod(s)) for s in shapes)
        self._map = np.memmap(self.path, dtype=dtype, mode="w+", shape=(max(total, 1),))
        self._cleanup = weakref.finalize(self, _unlink, self.path)  # an error or exit mid-run
        self.views, offset = [], 0
        for s in shapes:
            size = int(np.prod(s))
            self.views.append(self._map[offset:offset + size].reshape(s))
            offset += size

    def flush(self) -> None:
        self._map.flush()

    def close(self) -> Path | None:
        """Delete the file, or keep it under its final name; -> the kept file."""
        if not self._cleanup.alive:
            return None
        self._map.flush()
        if not self.keep:
            self._cleanup()
            return None
        self._cleanup.detach()
        final = self.folder / f"prefix-cache-{self.id}.bin"
        os.replace(self.path, final)
        atomic_write_json(self.folder / KEPT_INDEX,
                          {"file": final.name, "dtype": self.dtype.name, "bytes": final.stat().st_size,
                           "shapes": [list(s) for s in self.shapes]})
        return final


class Prefetch:
    """Builds the batches of an epoch's plan one or two ahead of the steps, in a background
    thread, so a step from a spilled cache waits on the disk only when the disk is slower than
    the step. A batch asked for out of plan order (a resumed epoch) restarts it from there."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._plan, self._make, self._thread, self._next = [], None, None, -1

    def start(self, plan: list, make: Callable) -> None:
        self.stop()
        self._plan, self._make = plan, make
        self._pos = {id(idx): i for i, (_, idx) in enumerate(plan)}

    def get(self, group, idx):
        i = self._pos.get(id(idx)) if self._make else None
        if i is None or self._plan[i][1] is not idx:
            raise ValueError("Prefetch.get: the batch is not in the started plan")
        if self._thread is None or self._next != i:
            self._run_from(i)
        j, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self._next = j + 1
        return batch

    def _run_from(self, first: int) -> None:
        self.stop()
        self._queue, self._halt = queue.Queue(self.depth), threading.Event()
        q, halt, plan, make = self._queue, self._halt, self._plan, self._make

        def work():
            for j in range(first, len(plan)):
                try:
                    item = (j, make(*plan[j]))
                except BaseException as e:  # handed to the step that wanted the batch
                    item = (j, e)
                while not halt.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if halt.is_set() or isinstance(item[1], BaseException):
                    return

        self._thread = threading.Thread(target=work, name="jaxcls-prefetch", daemon=True)
        self._thread.start()
        self._next = first

    def stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
