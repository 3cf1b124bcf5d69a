"""Prediction for layouts of several parts: pair, similarity and choice examples.

An example's token rows come from jaxcls.data.examples (the encoder training uses, so a pair
means the same tokens to `train`, `classify`, `serve` and `Classifier.predict`). A pair is one
row and runs through the Predictor's single-row path (identical rows once, length buckets). A
similarity example's two rows, and a choice example's option rows, run in ONE model call: the
call holds whole examples, its length is the bucket of the longest row among them, and the task
combines each example's rows (`rows_step`, the computation of train/step.py's `forward`).

Choice examples may have fewer options than the task was trained with (the missing ones are
rows of length 0, probability 0) or more: the head scores each option row alone, so an example
with n > num_choices options runs as a task of num_choices * 2**k rows, the smallest such that
holds n, which bounds the number of new shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Sequence

import numpy as np

from jaxcls.data import length_buckets
from jaxcls.data.examples import ExampleEncoder
from jaxcls.errors import DataError

PAIR_FORM = "(text, text_pair) pairs or {'text': ..., 'text_pair': ...} mappings"
CHOICE_FORM = "{'context': ..., 'question': ... (optional), 'choices': [...]} mappings"


def fields_of(task, example, i: int) -> Mapping:
    """The example as the encoder's fields; a pair may be a 2-sequence."""
    if isinstance(example, Mapping):
        return example
    if task.inputs.kind != "choice" and isinstance(example, (tuple, list)) and len(example) == 2:
        return {"text": example[0], "text_pair": example[1]}
    form = CHOICE_FORM if task.inputs.kind == "choice" else PAIR_FORM
    raise DataError(f"example {i}: the {task.name} task takes {form}, got {type(example).__name__}")


def rows_task(task, fields: Mapping):
    """The task whose row count holds this example: the task itself, or for a choice example
    with more options than trained, the same task with num_choices * 2**k options."""
    if task.inputs.kind != "choice":
        return task
    choices = fields.get("choices")
    n = len(choices) if isinstance(choices, Sequence) and not isinstance(choices, str) else 0
    rows = task.num_choices
    while rows < n:
        rows *= 2
    return task if rows == task.num_choices else dataclasses.replace(task, num_choices=rows)


def _encoder(predictor, task) -> ExampleEncoder:
    enc = predictor._encoders.get(task)
    if enc is None:
        enc = predictor._encoders[task] = ExampleEncoder(task, predictor.encode, predictor.max_length,
                                                         truncation=predictor.truncation)
    return enc


def example_logits(predictor, examples: list) -> np.ndarray:
    """float32 logits of the examples in input order: [N, num_outputs], or for choice [N, W]
    with W the larger of num_choices and the most options of an example in the call, and -inf
    for an option an example lacks."""
    task, p = predictor.task, predictor
    cut_before = p.truncation.examples
    groups: dict = {}  # rows task -> ([example index], [its rows])
    width = task.num_outputs
    for i, example in enumerate(examples):
        fields = fields_of(task, example, i)
        t = rows_task(task, fields)
        rows = _encoder(p, t).rows(fields, where=f"example {i}")
        if t is not task:
            width = max(width, len(fields["choices"]))
        idx, rs = groups.setdefault(t, ([], []))
        idx.append(i)
        rs.append(rows)
    cut = p.truncation.examples - cut_before
    p.stats.truncated += cut
    p.stats.long_texts += cut
    p.stats.texts += len(examples)
    out = np.full((len(examples), width), -np.inf if task.inputs.kind == "choice" else 0.0, np.float32)
    for t, (idx, rows) in groups.items():
        if t.rows_per_example == 1:
            logits = p._logits_of([r[0] for r in rows])
        else:
            logits = _grouped_logits(p, t, rows)
        out[np.asarray(idx), : min(width, t.num_outputs)] = logits[:, :width]
    return out


def _grouped_logits(p, task, examples: list[list[np.ndarray]]) -> np.ndarray:
    """Examples of R rows each: identical examples once, sorted by their longest row, cut into
    calls of whole examples from the long end, each at the bucket of its longest row."""
    R = task.rows_per_example
    index: dict[bytes, int] = {}
    keys = [b"".join(len(r).to_bytes(4, "little") + r.tobytes() for r in ex) for ex in examples]
    inverse = np.array([index.setdefault(k, len(index)) for k in keys], np.int64)
    unique: list = [None] * len(index)
    for ex, u in zip(examples, inverse):
        unique[u] = ex
    p.stats.duplicates += len(examples) - len(unique)
    p.stats.tokens += sum(len(r) for ex in unique for r in ex)
    longest = np.array([max(1, *(len(r) for r in ex)) for ex in unique], np.int64)
    order = np.argsort(longest, kind="stable")
    buckets = p.example_buckets(R)
    cuts = list(range(len(order), 0, -buckets[-1]))[::-1]
    out = np.zeros((len(unique), task.num_outputs), np.float32)
    for lo, hi in zip([0] + cuts[:-1], cuts):
        chunk = order[lo:hi]
        length = int(length_buckets(longest[chunk[-1:]], p.bucket_lengths)[0])
        n = next(e for e in buckets if e >= len(chunk))
        ids = np.full((n * R, length), p.pad_id, np.int32)
        lengths = np.ones((n * R,), np.int32)  # filler examples: one padding token per row
        for k, j in enumerate(chunk):
            for r, row in enumerate(unique[j]):
                ids[k * R + r, : len(row)] = row
                lengths[k * R + r] = len(row)
        out[chunk] = p._run(ids, lengths, task)[: len(chunk)]
    return out[inverse]
