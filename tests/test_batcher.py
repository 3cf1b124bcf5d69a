"""The dynamic batcher alone, with a fake model call: gathering by key, order, accounting.

Each test holds the worker inside a first call (`Gate`) while it queues items, so the batches
that follow are decided from a known queue, not from thread timing."""

import threading

import pytest

from jaxcls.infer.batcher import Batcher, QueueFull


class Gate:
    """A fake `run`: the first call blocks until `open()`; every call is recorded."""

    def __init__(self):
        self.calls, self.entered, self.release = [], threading.Event(), threading.Event()

    def __call__(self, texts):
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(10)
        return [t.upper() for t in texts]

    def open(self):
        self.release.set()


def held(**kw):
    """A batcher whose worker is busy with a first item until the gate opens."""
    gate = Gate()
    kw.setdefault("max_delay_s", 0.001)
    b = Batcher(gate, **kw)
    first = b.submit(["first"])
    assert gate.entered.wait(10)
    return b, gate, first


def finish(b, gate, futures):
    gate.open()
    results = [f.result(10) for f in futures]
    assert b.close(10)
    return results


def test_gathers_same_key_from_anywhere_and_others_run_next_in_order():
    """Fails if gathering takes only the head of the queue whatever its key (planted: the keyed
    branch of Batcher._take breaks at the first item of another key instead of skipping it)."""
    b, gate, first = held(max_batch_size=8)
    futures = [b.submit([t], key=k) for t, k in
               [("a1", 16), ("b1", 32), ("a2", 16), ("c1", None), ("b2", 32), ("a3", 16)]]
    results = finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["a1", "a2", "a3"], ["b1", "b2"], ["c1"]]
    assert results == [["FIRST"], ["A1"], ["B1"], ["A2"], ["C1"], ["B2"], ["A3"]]


def test_no_delay_turns_gathering_off_each_item_runs_alone():
    """`max_delay_s=0` (`--max-batch-delay-ms 0`): items queued together, keyed alike or not, each
    run as their own call, in order. Fails if gathering still takes what is queued (planted: the
    `self.max_delay_s > 0` condition dropped from the gathering loop)."""
    b, gate, first = held(max_batch_size=8, max_delay_s=0)
    futures = [b.submit([t], key=k) for t, k in [("a1", 16), ("a2", 16), ("b1", None), ("b2", None)]]
    results = finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["a1"], ["a2"], ["b1"], ["b2"]]
    assert results == [["FIRST"], ["A1"], ["A2"], ["B1"], ["B2"]]


def test_an_unkeyed_oldest_item_gathers_whatever_follows_it():
    """Fails if a key-None leader gathers only key-None items (planted: `item.key != key` also
    for key None) -- that would split requests of several texts from everything else."""
    b, gate, first = held(max_batch_size=8)
    futures = [b.submit(t, key=k) for t, k in [(["n1", "n2"], None), (["a1"], 16), (["b1"], 32)]]
    finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["n1", "n2", "a1", "b1"]]


def test_the_oldest_item_always_leads_so_nothing_starves():
    """Fails if the worker keeps serving the key it served last while an older item of another
    key waits (planted: Batcher._take leads with the first item of the previous batch's key)."""
    b, gate, first = held(max_batch_size=2)
    futures = [b.submit([t], key=k) for t, k in
               [("a1", 16), ("b1", 32), ("a2", 16), ("a3", 16), ("a4", 16), ("a5", 16)]]
    finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["a1", "a2"], ["b1"], ["a3", "a4"], ["a5"]]


def test_a_keyed_batch_skips_an_item_too_large_and_takes_smaller_ones_after_it():
    """Fails if a same-key item that does not fit ends the gathering (planted: `break` instead
    of skipping it), or is split: items are never cut across calls."""
    b, gate, first = held(max_batch_size=4)
    futures = [b.submit(t, key=16) for t in (["a1", "a2"], ["big1", "big2", "big3"], ["a3"])]
    results = finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["a1", "a2", "a3"], ["big1", "big2", "big3"]]
    assert results[2] == ["BIG1", "BIG2", "BIG3"]


def test_many_clients_get_their_own_results():
    """Fails if results are handed to the wrong item when gathered out of queue order (planted:
    Batcher._run gives every item results[:len(item.texts)])."""
    b, gate, first = held(max_batch_size=16)
    items = [[f"r{i}t{j}" for j in range(1 + i % 3)] for i in range(60)]
    futures = [b.submit(texts, key=(i % 4 if i % 5 else None)) for i, texts in enumerate(items)]
    results = finish(b, gate, [first] + futures)[1:]
    assert results == [[t.upper() for t in texts] for texts in items]
    assert len(gate.calls) < 1 + len(items)  # some were gathered
    assert sorted(t for call in gate.calls[1:] for t in call) == sorted(t for texts in items for t in texts)


def test_queue_full_counts_texts_taken_by_keyed_batches():
    """Fails if a keyed batch gives back fewer than the texts it took (planted: `self.pending -=
    len(lead.texts)` in Batcher._take): the queue would look fuller and fuller and refuse work."""
    b, gate, first = held(max_batch_size=8, max_queue=5)
    futures = [b.submit(t, key=k) for t, k in [(["a1"], 16), (["b1", "b2"], 32), (["a2", "a3"], 16)]]
    assert b.pending == 5
    with pytest.raises(QueueFull) as e:
        b.submit(["x"], key=16)
    assert (e.value.pending, e.value.wanted, e.value.limit) == (5, 1, 5)
    gate.open()
    for f in futures:
        f.result(10)
    assert b.pending == 0
    assert b.submit(["c1", "c2", "c3", "c4", "c5"], key=16).result(10) == ["C1", "C2", "C3", "C4", "C5"]
    assert b.close(10)


def test_cancelled_items_are_skipped_and_their_keyed_neighbours_run():
    """Fails if a cancelled item's texts still reach the model (planted: Batcher._run keeps every
    item, ignoring set_running_or_notify_cancel)."""
    b, gate, first = held(max_batch_size=8)
    gone = b.submit(["gone"], key=16)
    kept = b.submit(["kept"], key=16)
    assert gone.cancel()
    finish(b, gate, [first, kept])
    assert gone.cancelled() and kept.result() == ["KEPT"]
    assert gate.calls == [["first"], ["kept"]]


def test_fill_tops_a_keyed_batch_up_with_smaller_keys_to_its_padded_rows():
    """With fill(n) (the rows n texts are padded to), a keyed batch takes its own key first, then
    smaller keys, oldest first, up to fill(n); larger and unkeyed items wait. Planted: _fill taking
    larger keys too (`item.key == key` for `not item.key < key`) -> the 64 item joins -> fails; room
    from max_batch_size instead of fill(n) -> 16s past the padded rows join -> fails."""
    b, gate, first = held(max_batch_size=8, fill=lambda n: 4 if n <= 4 else 8)
    futures = [b.submit([t], key=k) for t, k in
               [("s1", 16), ("big", 64), ("none", None), ("m1", 32), ("s2", 16), ("m2", 32), ("s3", 16),
                ("s4", 16), ("s5", 16)]]
    results = finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["s1", "s2", "s3", "s4", "s5"], ["big", "m1", "m2"], ["none"]]
    b, gate, first = held(max_batch_size=8, fill=lambda n: 4 if n <= 4 else 8)
    futures = [b.submit([t], key=k) for t, k in
               [("m1", 32), ("big", 64), ("s1", 16), ("none", None), ("m2", 32), ("s2", 16), ("s3", 16),
                ("s4", 16)]]
    results = finish(b, gate, [first] + futures)
    assert gate.calls == [["first"], ["m1", "m2", "s1", "s2"], ["big", "s3", "s4"], ["none"]]
    assert results[1:] == [["M1"], ["BIG"], ["S1"], ["NONE"], ["M2"], ["S2"], ["S3"], ["S4"]]
