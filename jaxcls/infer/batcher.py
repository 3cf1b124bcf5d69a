"""Dynamic batching for a server: texts from concurrent requests run together on one model thread.

A request's texts are submitted as one item and get a `concurrent.futures.Future` back. The
worker thread takes the oldest item, then keeps gathering items until the batch holds
`max_batch_size` texts or the oldest item has waited `max_delay_s`, runs them as ONE call, and
splits the results back to each item's future in order. An item is never split across batches;
an item larger than `max_batch_size` runs alone (the predictor cuts it into its own batches).
`max_delay_s=0` turns gathering off: each item runs alone, which is what the benchmark compares.

Gathering is by key. An item may carry a key (the server's: the length bucket its text pads to);
when the oldest item has one, the batch takes only items with the SAME key, from anywhere in the
queue, and the others keep their order and wait for a later batch. A model call then pads every
text to one length instead of to the longest of a random mix. The oldest waiting item always
leads the next batch, so no item waits behind more than the batches of the items older than it.
An oldest item with key None gathers as without keys: whatever follows it, in order.
Keys order items by length. With `fill(n)` (the server's: the rows a call of n texts is padded to
anyway), a keyed batch that has room left below fill(n) takes items of SMALLER keys too, oldest
first: padding them to the batch's length costs rows the call would compute as padding anyway.

The queue is bounded by texts, not requests: `submit` raises `QueueFull` when the texts waiting
(not yet taken by the worker) would pass `max_queue`, so a flood costs the server a 503, not memory.
A future cancelled while it waits (the client gave up, the compute timeout fired) is skipped.
When a gathered call raises (a text over the sliding-window token cap, a pair part with no
tokens), each of its items runs again alone, so only the request that holds the bad text gets
the error and the others their results.
One thread owns the model, so the predictor is never entered twice and no lock is contended.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

from jaxcls.errors import ConfigError


class QueueFull(Exception):
    """The pending queue cannot take these texts now; the client should retry later."""

    def __init__(self, pending: int, wanted: int, limit: int):
        super().__init__(f"the queue holds {pending} texts waiting; {wanted} more would pass its "
                         f"limit of {limit}")
        self.pending, self.wanted, self.limit = pending, wanted, limit


class _Item:
    __slots__ = ("texts", "key", "future", "since")

    def __init__(self, texts: list, key=None):
        self.texts, self.key, self.future, self.since = texts, key, Future(), time.monotonic()


class Batcher:
    """One worker thread running `run(texts) -> per-text results` on gathered batches.

    on_batch(n_texts, seconds) is called after every model call (metrics)."""

    def __init__(self, run: Callable[[list], Sequence], *, max_batch_size: int = 32,
                 max_delay_s: float = 0.002, max_queue: int = 4096,
                 on_batch: Callable[[int, float], None] | None = None,
                 fill: Callable[[int], int] | None = None):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_delay_s >= 0:
            raise ConfigError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        self.run, self.on_batch, self.fill = run, on_batch, fill
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.pending = 0  # texts submitted and not yet taken by the worker
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="jaxcls-model-worker", daemon=True)
        self._thread.start()

    def submit(self, texts: list, key=None) -> Future:
        """Queue `texts` (a non-empty list); the future's result is their results, in order.
        Items with the same `key` (hashable; None: any) may share a model call."""
        item = _Item(list(texts), key)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self.pending + len(item.texts) > self.max_queue:
                raise QueueFull(self.pending, len(item.texts), self.max_queue)
            self._items.append(item)
            self.pending += len(item.texts)
            self._cond.notify()
        return item.future

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then stop the worker; True if it stopped within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _take(self) -> list[_Item] | None:
        """The next batch: the oldest item plus items of its key, queued or arriving before its
        delay runs out."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            lead = self._items.popleft()
            batch, n, key = [lead], len(lead.texts), lead.key
            deadline = lead.since + self.max_delay_s
            at = 0  # items before this index were looked at and left for a later batch
            while self.max_delay_s > 0 and n < self.max_batch_size:
                if at < len(self._items):
                    item = self._items[at]
                    if key is None:
                        if n + len(item.texts) > self.max_batch_size:
                            break
                    elif item.key != key or n + len(item.texts) > self.max_batch_size:
                        at += 1
                        continue
                    del self._items[at]
                    batch.append(item)
                    n += len(item.texts)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            if key is not None and self.fill is not None and self.max_delay_s > 0:
                n = self._fill(batch, n, key)
            self.pending -= n
            return batch

    def _fill(self, batch: list[_Item], n: int, key) -> int:
        """Queued items of smaller keys join, oldest first, while the batch stays within fill(n)."""
        room, at = min(self.fill(n), self.max_batch_size), 0
        while n < room and at < len(self._items):
            item = self._items[at]
            if item.key is None or not item.key < key or n + len(item.texts) > room:
                at += 1
                continue
            del self._items[at]
            batch.append(item)
            n += len(item.texts)
        return n

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        texts = [t for item in live for t in item.texts]
        start = time.perf_counter()
        try:
            results = self.run(texts)
        except Exception as e:
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for item in live:  # one request's bad text must not fail the others gathered with it
                self._run_alone(item)
            return
        except BaseException as e:  # the requests get the error; the worker keeps serving
            for item in live:
                item.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(texts), time.perf_counter() - start)
        at = 0
        for item in live:
            item.future.set_result(results[at : at + len(item.texts)])
            at += len(item.texts)

    def _run_alone(self, item: _Item) -> None:
        start = time.perf_counter()
        try:
            results = self.run(item.texts)
        except BaseException as e:
            item.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(item.texts), time.perf_counter() - start)
        item.future.set_result(results)
