"""The jitted train step moves nothing between host and device implicitly."""

import jax
import numpy as np
import optax
from flax import nnx

from jaxcls.train import freeze
from jaxcls.train import step as train
from jaxcls.task import SingleLabel
from jaxcls.config import GPT2Config
from jaxcls.model import GPT2Classifier


def test_train_step_runs_under_transfer_guard():
    cfg = GPT2Config(n_vocab=100, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
    model = GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0))
    graphdef, tr, fr = freeze.split_trainable(model, freeze.trainable_pattern("last_block", 2))
    tx = optax.adamw(1e-3)
    step = train.make_train_step(graphdef, tx, train.StepSpec(SingleLabel.with_classes(2)))
    opt = tx.init(tr)
    rng = np.random.default_rng(0)
    batch = jax.device_put(train.Batch(rng.integers(0, 100, (1, 4, 16)).astype(np.int32),
                                       np.full((1, 4), 16, np.int32), np.array([[0, 1, 0, 1]], np.int32),
                                       np.ones((1, 4), np.float32)))
    key = jax.device_put(jax.random.PRNGKey(0))
    tr, opt, _ = step(tr, fr, opt, batch, key)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            tr, opt, metrics = step(tr, fr, opt, batch, key)
    assert np.isfinite(jax.device_get(metrics["loss"]))


def test_every_step_shape_compiles_before_the_first_step():
    """fit compiles the train step for each length bucket and the eval step before training, so
    no compile happens between steps: JAX's compile log, interleaved with fit's on_step reports,
    shows every train_step/eval_step compile before the first step, one train_step compile per
    batch length the steps ran at.
    Fails if fit skips precompile (planted: `if prog.mesh is None:` -> `if False:` before
    precompile in train/loop.py)."""
    import logging

    from jaxcls.config import TrainConfig
    from jaxcls.data import DataSplits, TextDataset
    from jaxcls.train import fit

    rng = np.random.default_rng(0)
    texts = [" ".join(str(rng.integers(1, 9)) for _ in range(n)) for n in rng.integers(2, 60, 40)]
    labels = np.arange(40) % 2
    ds = lambda a, b, name: TextDataset(tuple(texts[a:b]), labels[a:b], ("a", "b"), name)  # noqa: E731
    splits = DataSplits(ds(0, 32, "train"), ds(32, 40, "validation"), None, ("a", "b"))
    cfg = TrainConfig(trainable="last_block", padding="buckets", batching="buckets", epochs=1,
                      batch_size=4, eval_freq=2, eval_iter=1)
    model = GPT2Classifier(GPT2Config(n_vocab=16, n_ctx=64, n_embd=16, n_head=2, n_layer=2), 2,
                           rngs=nnx.Rngs(0))
    events = []

    class Compiles(logging.Handler):
        def emit(self, record):
            name = next((n for n in ("train_step", "eval_step") if f"Compiling jit({n})" in record.getMessage()), None)
            if name:
                events.append(("compile", name))

    handler, logger = Compiles(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            fit(model, lambda t: [int(w) for w in t.split()], splits, cfg, progress=False, log=lambda s: None,
                on_step=lambda s: events.append(("step", s["length"])))
    finally:
        logger.removeHandler(handler)
    first = events.index(next(e for e in events if e[0] == "step"))
    assert [e for e in events[first:] if e[0] == "compile"] == []
    lengths = {length for kind, length in events if kind == "step"}
    assert lengths == {32, 64}  # two train shapes, and evaluations between steps (eval_freq 2)
    assert events[:first].count(("compile", "train_step")) == len(lengths)
    assert ("compile", "eval_step") in events[:first]
