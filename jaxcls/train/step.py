"""Fine-tuning numerics: pure, jitted functions of pytrees. The loop that feeds them is in loop.py;
the loss comes from the task (jaxcls.task)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcls.config import TrainConfig
from jaxcls.model import compute_dtype, pool
from jaxcls.task import TaskBase


class Batch(NamedTuple):
    """One optimizer step's data, with a leading micro-batch axis A (gradient accumulation), for B
    examples of R = task.rows_per_example rows each, flattened example-major (the R rows of one
    example adjacent). `inputs` are token ids (A, B*R, T), or cached frozen-prefix features
    (A, B*R, T, C) / pooled (A, B*R, C)."""

    inputs: jax.Array
    lengths: jax.Array  # (A, B*R) int32; 0 marks a missing choice option
    labels: jax.Array  # (A, B) int32 (single, choice) or (A, B, K) float32 (multilabel, regression)
    weights: jax.Array  # (A, B) float32; 0 marks filler examples that keep shapes fixed


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the jitted step computes, as hashable static data."""

    task: TaskBase  # rows per example, how their features become logits, the loss (jaxcls.task)
    start_block: int = 0  # 0: inputs are token ids; k > 0: hidden states entering block k
    pooled: bool = False  # inputs are pooled final features: only the head runs (linear probe)


def row_features(model, inputs, lengths, spec: StepSpec, dropout_key=None):
    """Pooled final features (rows, C) of each row, from whatever the batch holds: token ids, a
    cached prefix, or the pooled features themselves. A row of length 0 (a missing option) runs as
    one token, so no query attends to an empty set of keys (finite on XLA:CPU, but not promised by
    every attention kernel); the task masks the row out by its true length."""
    if spec.pooled:
        return inputs.astype(jnp.float32)
    seen = jnp.maximum(lengths, 1)
    if spec.start_block:
        return model.suffix_features(inputs.astype(compute_dtype(model.config)), seen, spec.start_block, dropout_key)
    return model.features(inputs, seen, dropout_key=dropout_key)


def forward(model, inputs, lengths, spec: StepSpec, dropout_key=None):
    """Logits (B, outputs) of the B examples whose rows the batch holds."""
    features = row_features(model, inputs, lengths, spec, dropout_key)
    return spec.task.logits_from_features(model.head_fn(dropout_key), features, lengths)


def frozen_features(model, token_ids, lengths, spec: StepSpec):
    """The part of the network that no step changes, per row: hidden states entering
    `start_block`, or the pooled final features when only the head trains."""
    seen = jnp.maximum(lengths, 1)
    if spec.pooled:
        x = model.prefix(token_ids, seen, model.config.n_layer)
        return pool(model.ln_f(x), seen, model.pooling)
    return model.prefix(token_ids, seen, spec.start_block)


def loss_terms(logits, labels, weights, spec: StepSpec):
    """(sum of weighted per-example losses, sum of weights), as the task defines them."""
    return spec.task.loss_terms(logits, labels, weights)


def make_train_step(graphdef, tx: optax.GradientTransformation, spec: StepSpec, *, out_shardings=None):
    """-> jitted `train_step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state,
    metrics)`. Gradients exist only for `trainable`; its buffers and the optimizer state are donated.
    `out_shardings` pins the outputs' placement (FSDP: parameters and optimizer state stay sharded)."""

    def loss_sum(trainable, frozen, inputs, lengths, labels, weights, key):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = forward(model, inputs, lengths, spec, key)
        return loss_terms(logits, labels, weights, spec)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 2), out_shardings=out_shardings)
    def train_step(trainable, frozen, opt_state, batch: Batch, key):
        def micro(carry, xs):
            grads, total, weight = carry
            inputs, lengths, labels, weights, i = xs
            (s, w), g = grad_fn(trainable, frozen, inputs, lengths, labels, weights,
                                jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), total + s, weight + w), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        steps = jnp.arange(batch.inputs.shape[0])
        (grads, total, weight), _ = jax.lax.scan(
            micro, (zeros, jnp.float32(0), jnp.float32(0)), (*batch, steps))
        weight = jnp.maximum(weight, 1e-12)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": total / weight, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(graphdef, spec: StepSpec):
    """-> jitted `eval_step(trainable, frozen, inputs, lengths, labels, weights) -> (loss sum,
    weight sum, logits)`."""

    @jax.jit
    def eval_step(trainable, frozen, inputs, lengths, labels, weights):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = forward(model, inputs, lengths, spec)
        s, w = loss_terms(logits, labels, weights, spec)
        return s, w, logits

    return eval_step


def make_features_step(graphdef, spec: StepSpec):
    @jax.jit
    def features_step(trainable, frozen, token_ids, lengths):
        return frozen_features(nnx.merge(graphdef, trainable, frozen), token_ids, lengths, spec)

    return features_step


def learning_rate(cfg: TrainConfig, total_steps: int):
    """A constant rate (the book), or linear warmup then cosine decay to zero (optax's schedule)."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                                  max(total_steps, cfg.warmup_steps + 1))
    if cfg.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return cfg.lr


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW over the trainable tree (the book's torch.optim.AdamW: decay on every parameter),
    optionally after global-norm clipping."""
    adamw = optax.adamw(learning_rate(cfg, total_steps), weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
