"""The jitted train step moves nothing between host and device implicitly."""

import jax
import jax.numpy as jnp
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
