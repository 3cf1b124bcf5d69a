"""A built model's compute dtype, changed after the fact: the blocks' kernels cast once to the
matmuls' operand dtype (what the train program's steps and the predictor read), and the same
classifier re-expressed in another dtype (`--dtype` on classify, eval and serve)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxcls import cpu_amx
from jaxcls.config import GPT2Config
from jaxcls.model import GPT2Classifier, compute_dtype, skeleton


def cast_kernels(state, config: GPT2Config, *, pack: bool = False):
    """`state` with the blocks' Linear kernels already in the matmuls' operand dtype, where that
    differs from the activations' (bfloat16 on MKL's path): the cast then happens once, not in every
    call, where it took a quarter of gpt2-small's forward pass. Values round exactly as the per-call
    cast rounds them. With `pack`, kernels the AMX kernel takes are also laid out for it
    (cpu_amx.pack): done per call, that transpose cost more than the kernel saves. Everything else,
    and any other configuration, is left as it is."""
    operands = jnp.dtype(config.dtype)
    if compute_dtype(config) == operands:
        return state

    def prepare(value):
        value = value.astype(operands)
        return cpu_amx.pack(value) if pack and operands == jnp.bfloat16 and cpu_amx.fits(*value.shape) else value

    leaves = [(p, v.replace(prepare(v.get_value())) if _block_kernel(p) else v) for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(leaves)


def inference_state(model: nnx.Module):
    """(graphdef, state) as inference reads them: `nnx.split` with the kernels cast once, and packed
    for the AMX kernel where it runs (inference only: packed kernels have no gradient)."""
    graphdef, state = nnx.split(model)
    return graphdef, cast_kernels(state, model.config, pack=True)


def _block_kernel(path) -> bool:
    return len(path) == 5 and path[0] == "h" and path[2] in ("attn", "mlp") and path[4] == "kernel"


def with_dtype(model: GPT2Classifier, dtype: str) -> GPT2Classifier:
    """The same classifier (its parameters shared, not copied) computing in `dtype`."""
    if model.config.dtype == dtype:
        return model
    graphdef, _ = skeleton(model, model.config.replace(dtype=dtype))
    return nnx.merge(graphdef, nnx.state(model))
