"""The one table between Flax parameter paths and the checkpoints' tensor names.

    Flax path                  OpenAI (TensorFlow)           Hugging Face (safetensors)
    wte/embedding              model/wte                     wte.weight
    h/11/attn/c_attn/kernel    model/h11/attn/c_attn/w       h.11.attn.c_attn.weight
    h/11/ln_1/scale            model/h11/ln_1/g              h.11.ln_1.weight
    ln_f/bias                  model/ln_f/b                  ln_f.bias

Only leaf names differ; OpenAI's kernels carry a leading axis of 1 ([1, in, out]); HF's Conv1D
weight is already [in, out], so nothing is transposed."""

from __future__ import annotations

import re

Path = tuple  # a Flax state path, e.g. ('h', 11, 'attn', 'c_attn', 'kernel')

OPENAI_LEAF = {"kernel": "w", "bias": "b", "scale": "g"}
HF_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
# Tensors the hub's files carry that are not parameters: causal-mask buffers and the tied LM head.
HF_IGNORED = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)")
HF_PREFIX = "transformer."
CHECKPOINT_MODULES = ("wte", "wpe", "h", "ln_f")
ADAPTER_LEAVES = ("lora_a", "lora_b")


def in_checkpoint(path: Path) -> bool:
    """Parameters a GPT-2 checkpoint holds; the classifier head, LoRA and bottleneck adapters are new."""
    return path[0] in CHECKPOINT_MODULES and path[-1] not in ADAPTER_LEAVES and "adapter" not in path


def to_openai(path: Path) -> str:
    if path[-1] == "embedding":
        return f"model/{path[0]}"
    parts = [str(p) for p in path[:-1]]
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    return "/".join(["model", *parts, OPENAI_LEAF[path[-1]]])


def to_hf(path: Path) -> str:
    return ".".join([*(str(p) for p in path[:-1]), HF_LEAF[path[-1]]])


def openai_kernel_squeezed(path: Path) -> bool:
    """OpenAI stores Conv1D kernels as [1, in, out]."""
    return path[-1] == "kernel"


def strip_hf_prefix(name: str) -> str:
    return name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
