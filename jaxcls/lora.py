"""LoRA adapters, as the book builds them (appendix E) and as Hugging Face PEFT does for GPT-2;
docs/lora.md compares the two. model.Linear and the classifier's head hold the parameters; this
module owns what differs by style (targets, A's initialisation, the scale) and the merge."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcls.config import LEGACY_LORA, GPT2Config

# Per style, the linears that get adapters and into how many column blocks
# each one's adapter is split: the book wraps W_query, W_key and W_value separately, which here are
# the three column blocks of GPT-2's fused c_attn, so its A and B are stacked [3, ...].
LORA_TARGETS = {
    "book": {"attn.c_attn": 3, "attn.c_proj": 1, "mlp.c_fc": 1, "mlp.c_proj": 1, "head": 1},
    "peft": {"attn.c_attn": 1},
    LEGACY_LORA: {"attn.c_attn": 1, "attn.c_proj": 1, "mlp.c_fc": 1, "mlp.c_proj": 1},
}


def lora_parts(config: GPT2Config, role: str) -> int:
    """How many adapter pairs the linear `role` ('attn.c_attn', 'head', ...) has; 0 for none."""
    return LORA_TARGETS[config.lora_style].get(role, 0) if config.lora_rank else 0


def lora_scale(config: GPT2Config) -> float:
    """The book (appendix E) scales the update by alpha; PEFT by alpha / rank."""
    alpha = float(config.lora_alpha)
    return alpha / config.lora_rank if config.lora_style == "peft" else alpha


def lora_bound(config: GPT2Config, n_in: int) -> float:
    """A ~ U(+-bound). torch's kaiming_uniform_(a=sqrt(5)) gives 1/sqrt(fan_in), fan_in being dim 1
    of the tensor filled: the book's A is (in, rank), so 1/sqrt(rank); PEFT fills lora_A =
    nn.Linear(in, rank).weight, (rank, in), so 1/sqrt(in) (as did the legacy style)."""
    return 1.0 / math.sqrt(config.lora_rank if config.lora_style == "book" else n_in)


def init_adapter(config: GPT2Config, n_in: int, n_out: int, parts: int, key):
    """(A, B) params: A (n_in, r) and B (r, n_out) zero, or stacked (parts, n_in, r) and
    (parts, r, n_out // parts) when each column block has its own pair."""
    r, bound = config.lora_rank, lora_bound(config, n_in)
    lead = () if parts == 1 else (parts,)
    a = jax.random.uniform(key, (*lead, n_in, r), jnp.float32, -bound, bound)
    return nnx.Param(a), nnx.Param(jnp.zeros((*lead, r, n_out // parts), jnp.float32))


def adapter_update(x, a, b, cols: slice = slice(None)):
    """x @ A @ B (unscaled) at the output columns `cols`; a stacked adapter's blocks are whole
    column blocks, and `cols` must fall on their boundaries."""
    if a.ndim == 2:
        return (x @ a) @ b[:, cols]
    width = b.shape[-1]
    start, stop, step = cols.indices(width * a.shape[0])
    if step != 1 or start % width or stop % width:
        raise ValueError(f"columns {start}:{stop} split a LoRA block of width {width}")
    return jnp.concatenate([(x @ a[p]) @ b[p] for p in range(start // width, stop // width)], axis=-1)


def adapter_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A @ B as the (n_in, n_out) kernel update, in float64; stacked blocks side by side."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 2:
        return a @ b
    return np.concatenate([a[p] @ b[p] for p in range(a.shape[0])], axis=1)


class LoRAHead(nnx.Linear):
    """The classification head with the book's adapter (LinearWithLoRA around the new head): the
    kernel and bias initialised as nnx.Linear's, then frozen; only A and B train."""

    def __init__(self, n_in: int, n_out: int, *, config: GPT2Config, rngs: nnx.Rngs):
        super().__init__(n_in, n_out, rngs=rngs)
        self.lora_scale = lora_scale(config)
        self.lora_a, self.lora_b = init_adapter(config, n_in, n_out, 1, rngs.params())

    def __call__(self, x):
        return super().__call__(x) + self.lora_scale * adapter_update(x, self.lora_a[...], self.lora_b[...])


def merged_lora_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Flax path -> float32 array with every adapter folded into its kernel (kernel + scale * A B,
    each stacked block into its own columns) and dropped: the one place adapters are merged."""
    flat = {p: np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    scale = lora_scale(model.config)
    out = {}
    for path, arr in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        a = flat.get((*path[:-1], "lora_a"))
        if path[-1] == "kernel" and a is not None:
            update = scale * adapter_delta(a, flat[(*path[:-1], "lora_b")])
            arr = (arr.astype(np.float64) + update).astype(np.float32)
        out[path] = arr
    return out
