"""Batched inference with a bounded number of compiles.

Texts are tokenized once; identical token sequences in a call run once. The rest are sorted by
length and cut into consecutive batches of `batch_size`, each padded to the smallest bucket length
that holds its longest text, so shapes come from a few (rows x bucket length) pairs. Each shape
compiles once (`predict_step`). Only one batch per call is partial, the one with the shortest
texts, and it is filled up with cheap dummy rows so no new shape appears. Results come back in
input order.

Layouts of several parts (pair, similarity, choice; jaxcls.task) take examples, not texts: their
rows come from jaxcls.data.examples, the encoder training uses, and the R rows of one example run
in the same model call (infer/rows.py), batched by the example's longest row.

Padding never changes a result for the `last_real`, `mean` and `first` poolings (padding is
masked out of attention), so any bucket gives the numbers a one-text batch of exactly its length
gives. The book's literal `last` pooling reads the final padded position and attends over
padding, so a `last` classifier is served with one bucket of exactly the `pad_length` it was
trained with: every text is truncated and padded to that length, as it was in training.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcls.chunks import inference_features
from jaxcls.compile_cache import load_program
from jaxcls.data import fine_bucket_lengths, length_buckets
from jaxcls.data.examples import Truncation
from jaxcls.errors import ConfigError, DataError
from jaxcls.precision import inference_state
from jaxcls.shared_prefix import SharedRows, check_supported, shared_prefix_logits
from jaxcls.task import SingleLabel
from jaxcls.tokenizer import first_tokens, pad_id_for

LONG_MODES = ("truncate", "sliding")
MAX_TEXT_TOKENS = 1 << 18  # "sliding" reads at most this many tokens of one text


class TooManyTokens(DataError):
    """A text longer than `max_text_tokens` for sliding windows; `index` is its place in the call."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


_traces = threading.local()  # tracing runs in the calling thread, so a thread-local count is exact


def _trace_count() -> int:
    return getattr(_traces, "n", 0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def rows_step(graphdef, task, state, ids, lengths):
    """ids int32 [E*R, T], lengths int32 [E*R] (0: a missing choice option) -> float32 logits
    [E, outputs] of E examples of R rows each, as train/step.py's `forward` computes them: the
    rows' pooled features combined by the task. One compile per (graphdef, task, E*R, T)."""
    _traces.n = _trace_count() + 1
    model = nnx.merge(graphdef, state)
    features = inference_features(model, ids, jnp.maximum(lengths, 1))
    return task.logits_from_features(model.head, features, lengths).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def shared_step(graphdef, task, state, rows: SharedRows):
    """Choice logits [E, R] with each example's shared start run once (jaxcls.shared_prefix):
    `rows_step`'s numbers. One compile per (graphdef, task, E, prefix width, option width)."""
    _traces.n = _trace_count() + 1
    return shared_prefix_logits(nnx.merge(graphdef, state), task, rows).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def predict_step(graphdef, state, ids, lengths):
    """ids int32 [B, T], lengths int32 [B] -> float32 logits [B, C]. One compile per
    (graphdef, B, T); the Python body (and so the counter) runs only when JAX traces."""
    _traces.n = _trace_count() + 1
    model = nnx.merge(graphdef, state)
    return model.head(inference_features(model, ids, lengths)).astype(jnp.float32)


def resolve_buckets(n_ctx: int, pad_length, bucket_lengths) -> tuple[int | None, tuple[int, ...]]:
    """(pad length, the padded lengths batches may have): exactly the pad length a classifier was
    trained with, or the given lengths, or the default ladder up to n_ctx."""
    if pad_length is not None:
        if isinstance(pad_length, bool) or not 1 <= int(pad_length) <= n_ctx:
            raise ConfigError(f"pad_length must be in 1..n_ctx={n_ctx}, got {pad_length!r}")
        pad_length = int(pad_length)
        if bucket_lengths is not None and tuple(bucket_lengths) != (pad_length,):
            raise ConfigError(
                f"bucket_lengths {tuple(bucket_lengths)} conflict with pad_length {pad_length}: "
                "a classifier trained with a fixed pad length is served with exactly that length")
        return pad_length, (pad_length,)
    if bucket_lengths is None:
        return None, fine_bucket_lengths(n_ctx)
    buckets = tuple(sorted({int(b) for b in bucket_lengths}))
    if not buckets or buckets[0] < 1 or buckets[-1] > n_ctx:
        raise ConfigError(f"bucket_lengths must lie in 1..n_ctx={n_ctx}, got {tuple(bucket_lengths)}")
    return None, buckets


@dataclasses.dataclass
class PredictStats:
    """Counts over a Predictor's lifetime (they add up across calls)."""

    texts: int = 0  # texts classified
    truncated: int = 0  # texts longer than max_length, cut to their first max_length tokens
    long_texts: int = 0  # texts longer than max_length (truncated or windowed)
    windows: int = 0  # windows classified for long texts in "sliding" mode
    empty: int = 0  # texts with no tokens, classified as a single padding token
    duplicates: int = 0  # sequences identical to an earlier one in the same call, not run again
    batches: int = 0  # model calls
    tokens: int = 0  # real tokens run (after truncation and de-duplication)
    tokens_run: int = 0  # rows x length over all model calls: padding and dummy rows included

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Predictor:
    """Classify texts with `model` (a `GPT2Classifier`) in fixed-shape batches.

    encode: text -> token ids (e.g. `lambda t: jaxcls.tokenizer.encode(enc, t)`).
    pad_length: the fixed length a classifier was trained with (needed for `last` pooling):
        one bucket of exactly that length; texts are truncated and padded to it.
    batch_size: rows per model call; a partial batch is filled with dummy rows. On the CPU a call
        of more than about 2,048 tokens runs as a loop over equal row chunks (jaxcls.chunks).
    bucket_lengths: the padded lengths batches may have (default 16, 24, 32, 48, 64, 96, ... up to n_ctx);
        the largest is `max_length`. Not allowed together with pad_length.
    row_buckets: row counts a batch may have (default: only batch_size). E.g. (1, 8, 32) lets a
        server answer a single text without computing 31 dummy rows, at the price of more compiles.
    long: "truncate" keeps the first max_length tokens of a longer text (the book's choice);
        "sliding" classifies windows of max_length tokens, `window_stride` apart (default
        max_length // 2), the last window ending at the text's end, and averages their logits.
        A text of more than `max_text_tokens` tokens then raises TooManyTokens (a DataError).
    task: how logits become probabilities and predictions, and the input layout (jaxcls.task;
        default single-label text over the model's classes). Its `head_width` must be the
        model's. For pair, similarity and choice, `logits`/`predict` take examples (infer/rows.py)
        and `row_buckets`/`batch_size` count rows: a call holds whole examples, batch_size // R of
        them (at least one).
    shared_prefix: for choice on a `last_real`, causal model, run each example's common start
        (its context) once and only the options after it (jaxcls.shared_prefix) in a call where
        that runs fewer token positions, prefix and option widths from the length buckets; the
        logits are the flattened rows' within float rounding. False, or another model, runs the
        flattened rows.

    A text with no tokens (the empty string) has no token to pool; it is classified as a single
    padding token (length 1), a well-defined, text-independent prediction (`stats.empty`).

    The weights are split from the model once, here: a model trained further afterwards needs
    `refresh()`. `num_compiles` counts the traces this predictor caused (programs loaded whole
    from the compilation cache take none), never more than len(shapes()) (choice examples with
    more options than trained add row counts). A lock serializes calls: threads may share it.
    """

    def __init__(
        self,
        model,
        encode: Callable[[str], Sequence[int]],
        *,
        pad_length: int | None = None,
        batch_size: int = 32,
        bucket_lengths: Sequence[int] | None = None,
        row_buckets: Sequence[int] | None = None,
        long: str = "truncate",
        window_stride: int | None = None,
        pad_id: int | None = None,
        task=None,
        max_text_tokens: int = MAX_TEXT_TOKENS,
        shared_prefix: bool = True,
    ):
        n_ctx = int(model.config.n_ctx)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if long not in LONG_MODES:
            raise ConfigError(f"long must be one of {LONG_MODES}, got {long!r}")
        pad_length, buckets = resolve_buckets(n_ctx, pad_length, bucket_lengths)
        if getattr(model, "pooling", None) == "last" and pad_length is None:
            warnings.warn(
                "pooling 'last' without pad_length: a text's result depends on the bucket length it "
                "is padded to; pass the pad length the classifier was trained with", stacklevel=2)
        rows = (int(batch_size),) if row_buckets is None else tuple(sorted({int(r) for r in row_buckets}))
        if rows[0] < 1 or rows[-1] != batch_size:
            raise ConfigError(f"row_buckets must be positive and end with batch_size {batch_size}, got {rows}")
        self.max_length = buckets[-1]
        window_stride = max(1, self.max_length // 2) if window_stride is None else window_stride
        if long == "sliding" and not 1 <= int(window_stride) <= self.max_length:
            raise ConfigError(f"window_stride must be in 1..{self.max_length}, got {window_stride!r}")
        self.model = model
        self.encode = encode
        self.pad_length = pad_length
        self.batch_size = int(batch_size)
        self.bucket_lengths = buckets
        self.row_buckets = rows
        self.long = long
        self.window_stride = int(window_stride)
        self.max_text_tokens = int(max_text_tokens)
        self.pad_id = pad_id_for(model.config.n_vocab) if pad_id is None else int(pad_id)
        self.num_classes = int(model.num_classes)
        self.task = SingleLabel.with_classes(self.num_classes) if task is None else task
        if self.task.head_width != self.num_classes:
            raise ConfigError(f"the {self.task.name} task needs a head of width {self.task.head_width}; "
                              f"the model's head has {self.num_classes}")
        self.layout = self.task.inputs.kind
        if long == "sliding" and self.layout != "text":
            raise ConfigError(f"--long sliding averages windows of one text; the {self.task.name} task joins "
                              "several parts in a row, so use --long truncate")
        self.shared_prefix = bool(shared_prefix) and self.layout == "choice" and _exact_shared(model)
        self.share_lengths = fine_bucket_lengths(pad_length) if pad_length else buckets  # prefix, option widths
        self.truncation = Truncation()  # parts cut in multi-part rows (jaxcls.data.examples)
        self._encoders: dict = {}  # rows task -> ExampleEncoder (infer/rows.py)
        self.num_compiles, self.stats = 0, PredictStats()
        self._lock = threading.RLock()
        self.refresh()

    def refresh(self) -> None:
        """Take the model's current weights (after further training, say)."""
        with self._lock:
            self._graphdef, self._state = inference_state(self.model)
            self._programs = {}  # (step, static arguments, batch shapes) -> compile_cache.load_program's

    # -- tokens -----------------------------------------------------------------------------

    def _windows(self, ids: np.ndarray) -> list[np.ndarray]:
        L, n = self.max_length, len(ids)
        if n <= L:
            return [ids]
        if self.long == "truncate":
            return [ids[:L]]
        starts = list(range(0, n - L + 1, self.window_stride))
        if starts[-1] + L < n:
            starts.append(n - L)
        return [ids[s : s + L] for s in starts]

    def token_ids(self, text: str, i: int = 0) -> np.ndarray:
        """The tokens a text needs, never more: max_length + 1 (enough to see it is long) when
        truncating, at most `max_text_tokens` for windows; `text.ids` if a server set them at submit."""
        if (ids := getattr(text, "ids", None)) is not None:
            return ids
        limit = self.max_length if self.long == "truncate" else self.max_text_tokens
        ids = np.asarray(first_tokens(self.encode, text, limit + 1), dtype=np.int32).reshape(-1)
        if self.long == "sliding" and ids.size > limit:
            raise TooManyTokens(f"text at index {i}: more than {limit} tokens, the most sliding windows "
                                "read of one text; use --long truncate, or split the text", i)
        return ids

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Sequences to run and, for each, the index of the text it belongs to."""
        seqs, owner = [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, not str")
            ids = self.token_ids(text, i)
            if ids.size == 0:
                ids = np.array([self.pad_id], np.int32)
                self.stats.empty += 1
            parts = self._windows(ids)
            if len(ids) > self.max_length:
                self.stats.long_texts += 1
                if self.long == "truncate":
                    self.stats.truncated += 1
                else:
                    self.stats.windows += len(parts)
            seqs.extend(parts)
            owner.extend([i] * len(parts))
        return seqs, np.asarray(owner, np.int64)

    # -- batches ----------------------------------------------------------------------------

    def _run(self, ids, lengths: np.ndarray | None = None, task=None) -> np.ndarray:
        """One model call: rows -> their logits, or with `task` (R > 1 rows per example) the
        examples' logits; `ids` may be SharedRows (choice with a shared prefix, no lengths)."""
        before, shared, g = _trace_count(), isinstance(ids, SharedRows), self._graphdef
        step, static = ((shared_step, (g, task)) if shared else
                        (predict_step, (g,)) if task is None else (rows_step, (g, task)))
        dynamic = (self._state, ids) if shared else (self._state, ids, lengths)
        key = (step, static, tuple(np.shape(x) for x in jax.tree.leaves(dynamic[1:])))  # the weights are fixed
        if (program := self._programs.get(key)) is None:
            self._programs[key], out = load_program(step, static, dynamic)
        else:
            out = program(*dynamic)
        self.num_compiles += _trace_count() - before
        self.stats.batches += 1
        self.stats.tokens_run += ids.prefix_ids.size + ids.option_ids.size if shared else ids.size
        return np.asarray(out)

    def _batch(self, seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
        rows = next(r for r in self.row_buckets if r >= len(seqs))
        ids = np.full((rows, length), self.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)  # dummy rows: one padding token
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
            lengths[r] = len(s)
        return ids, lengths

    def _logits_of(self, seqs: list[np.ndarray]) -> np.ndarray:
        if not seqs:
            return np.zeros((0, self.num_classes), np.float32)
        index: dict[bytes, int] = {}
        inverse = np.array([index.setdefault(s.tobytes(), len(index)) for s in seqs], np.int64)
        unique = [None] * len(index)
        for s, u in zip(seqs, inverse):
            unique[u] = s
        self.stats.duplicates += len(seqs) - len(unique)
        self.stats.tokens += sum(len(s) for s in unique)
        lengths = np.array([len(s) for s in unique], np.int64)
        order = np.argsort(lengths, kind="stable")
        # Cut from the long end, so the one partial batch holds the shortest texts.
        cuts = list(range(len(order), 0, -self.batch_size))[::-1]
        per_unique = np.zeros((len(unique), self.num_classes), np.float32)
        for lo, hi in zip([0] + cuts[:-1], cuts):
            chunk = order[lo:hi]
            length = int(length_buckets(lengths[chunk[-1:]], self.bucket_lengths)[0])
            ids, lens = self._batch([unique[j] for j in chunk], length)
            per_unique[chunk] = self._run(ids, lens)[: len(chunk)]
        return per_unique[inverse]

    # -- public -----------------------------------------------------------------------------

    def logits(self, texts: Sequence) -> np.ndarray:
        """float32 [N, outputs] logits in input order; a windowed text gets its windows' mean.
        Examples of a multi-part layout go through infer/rows.py (choice: [N, W], W the most
        options in the call, -inf for an option an example lacks)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        if self.layout != "text":
            from jaxcls.infer.rows import example_logits

            with self._lock:
                return example_logits(self, list(texts))
        texts = list(texts)
        with self._lock:
            seqs, owner = self._tokenize(texts)
            per_seq = self._logits_of(seqs)
            self.stats.texts += len(texts)
        if len(seqs) == len(texts):  # one sequence per text, in order
            return per_seq
        total = np.zeros((len(texts), self.num_classes), np.float64)
        np.add.at(total, owner, per_seq)
        counts = np.bincount(owner, minlength=len(texts))
        return (total / counts[:, None]).astype(np.float32)

    def predict(self, texts: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(decisions, probabilities float32 [N, C]) in input order, as the task decides:
        single-label class ids [N] and the softmax; multi-label 0/1 [N, K] and each label's
        sigmoid; regression the values [N, K] twice; choice option indices [N] and each option's
        probability (0 for an option the example lacks)."""
        probs = self.task.probabilities(self.logits(texts))
        return self.task.decide(probs), probs

    def example_buckets(self, rows_per_example: int) -> tuple[int, ...]:
        """Examples a call of R-row examples may hold: the row buckets in whole examples."""
        return tuple(sorted({max(1, r // rows_per_example) for r in self.row_buckets}))

    def shapes(self) -> list[tuple[int, ...]]:
        """Every (rows, length) batch shape this predictor can run (for choice: examples with at
        most the trained number of options; with a shared prefix, (rows, prefix width, option
        width))."""
        R = self.task.rows_per_example
        if R == 1:
            return [(r, b) for b in self.bucket_lengths for r in self.row_buckets]
        flat = [(e * R, b) for b in self.bucket_lengths for e in self.example_buckets(R)]
        if not self.shared_prefix:
            return flat
        from jaxcls.infer.rows import shared_widths

        return flat + [(e * R, *w) for w in shared_widths(self, R) for e in self.example_buckets(R)]

    def warmup(self) -> int:
        """Compile every batch shape now; returns the number of new compiles (0 when warm)."""
        with self._lock:
            before, tokens_run = self.num_compiles, self.stats.tokens_run
            for rows, *widths in self.shapes():
                ids = np.full((rows, sum(widths)), self.pad_id, np.int32)
                lengths = np.ones((rows,), np.int32)
                if widths[1:]:  # (prefix width, option width)
                    from jaxcls.infer.rows import shared_rows

                    ids = shared_rows(self, ids, lengths, self.task.rows_per_example, widths)
                self._run(ids, lengths, self.task if self.task.rows_per_example > 1 else None)
                self.stats.batches -= 1  # warm-up calls are not work
            self.stats.tokens_run = tokens_run
            return self.num_compiles - before


def _exact_shared(model) -> bool:
    try:
        check_supported(model)
    except ConfigError:
        return False
    return True
