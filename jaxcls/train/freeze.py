"""Which parameters train. One path predicate drives the trainable/frozen split (so gradients and
optimizer state exist only for what trains) and the optax label tree (`optax.partition`)."""

from __future__ import annotations

import re

import optax
from flax import nnx

from jaxcls.errors import ConfigError
from jaxcls.lora import LORA_TARGETS
from jaxcls.model import path_str

PRESETS = ("head", "last_layer", "last_block", "last_two_blocks", "last_k_blocks:K", "all", "lora", "adapters")


def trainable_pattern(trainable: str, n_layer: int, lora_style: str = "book") -> str:
    """A preset name -> the regex over parameter paths ('h/11/attn/c_attn/kernel') it means;
    anything else is taken as a regex already. 'lora' trains the adapters, and the head too
    unless the style puts an adapter on it (the book freezes the new head and adapts it);
    'adapters' trains the bottleneck adapters and the head."""
    if trainable in ("head", "last_layer"):  # "last_layer" is the book's name for the new head
        return r"head/.*"
    if trainable == "last_block":
        trainable = "last_k_blocks:1"
    if trainable == "last_two_blocks":
        trainable = "last_k_blocks:2"
    if trainable.startswith("last_k_blocks:"):
        try:
            k = int(trainable.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"trainable: {trainable!r} needs an integer K, e.g. last_k_blocks:3") from None
        if not 1 <= k <= n_layer:
            raise ConfigError(f"trainable: {trainable!r}: K must be in 1..{n_layer} (the model's n_layer)")
        blocks = "|".join(str(i) for i in range(n_layer - k, n_layer))
        return rf"h/({blocks})/.*|ln_f/.*|head/.*"
    if trainable == "all":
        return r".*"
    if trainable == "lora":
        return r"(.*/)?lora_[ab]" + ("" if "head" in LORA_TARGETS[lora_style] else r"|head/.*")
    if trainable == "adapters":
        return r"(.*/)?adapter/.*|head/.*"
    try:
        re.compile(trainable)
    except re.error as e:
        raise ConfigError(f"trainable: {trainable!r} is neither a preset {PRESETS} nor a regex ({e})") from None
    return trainable


def first_trainable_block(trainable: str, n_layer: int) -> int | None:
    """For suffix presets, the first block whose parameters train (n_layer when only the head
    trains): everything before it is a fixed function of the input. None when not a suffix."""
    if trainable in ("head", "last_layer"):
        return n_layer
    k = {"last_block": 1, "last_two_blocks": 2}.get(trainable)
    if k is None and trainable.startswith("last_k_blocks:"):
        k = int(trainable.split(":", 1)[1])
    return None if k is None else n_layer - k


def is_trainable(pattern: str):
    """The one predicate: (path, value) -> bool."""
    rx = re.compile(pattern)
    return lambda path, _: rx.fullmatch(path_str(path)) is not None


def trainable_filter(pattern: str):
    return nnx.All(nnx.Param, is_trainable(pattern))


def split_trainable(model: nnx.Module, pattern: str):
    """-> graphdef, trainable state, frozen state (everything else)."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(pattern), ...)
    if not nnx.to_flat_state(trainable):
        raise ConfigError(f"trainable: pattern {pattern!r} matches no parameter")
    return graphdef, trainable, frozen


def optax_labels(params: nnx.State, pattern: str) -> nnx.State:
    """'train'/'freeze' per leaf, from the same predicate, for `optax.partition` over a full tree."""
    keep = is_trainable(pattern)
    return nnx.map_state(lambda path, _: "train" if keep(path, None) else "freeze", params)


def masked_optimizer(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
    """The freeze stated in optax over the whole tree: frozen leaves get zero updates and no state."""
    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_params(state: nnx.State) -> int:
    return sum(int(v.get_value().size) for _, v in nnx.to_flat_state(state))


def describe(n_trainable: int, n_total: int) -> str:
    def human(n):
        return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

    return f"trainable: {human(n_trainable)} of {human(n_total)} parameters ({100 * n_trainable / n_total:.1f}%)"
