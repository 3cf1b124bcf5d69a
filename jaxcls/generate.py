"""Greedy decoding: the book's check that pretrained weights loaded right."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcls.model import GPT2


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef, state, ids, length):
    model = nnx.merge(graphdef, state)
    hidden = model(ids)  # causal: positions past `length` cannot change position length - 1
    return jnp.argmax(model.lm_logits(hidden[0, length - 1]))


def generate_greedy(model: GPT2, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Appends `max_new_tokens` argmax tokens. The buffer has one fixed length, so it compiles once."""
    n_ctx = model.config.n_ctx
    ids = list(token_ids)[-n_ctx:]
    width = min(n_ctx, len(ids) + max_new_tokens)
    graphdef, state = nnx.split(model)
    for _ in range(max_new_tokens):
        if len(ids) >= width:
            ids = ids[1:]  # slide the window when the context is full
        buf = np.full((1, width), 0, np.int32)
        buf[0, :len(ids)] = ids
        ids.append(int(_next_token(graphdef, state, jnp.asarray(buf), len(ids))))
    return ids
