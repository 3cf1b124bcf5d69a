"""Frozen configuration dataclasses. Field names follow OpenAI's hparams.json; defaults follow the book."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

from jaxcls.errors import CheckpointError, ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = DTYPES + ("auto",)  # auto: jaxcls.cpu_gemm.decide_dtype picks one for the device
MONITORS = ("val_loss", "val_accuracy", "val_macro_f1")  # --monitor (which a task reports: train/hooks.py)
POOLINGS = ("last_real", "last", "first", "mean")
LORA_STYLES = ("book", "peft")  # what --lora-style offers; docs/lora.md
LEGACY_LORA = "legacy"  # the single fused adapter of folders saved before lora_style existed (load only)


def head_hidden(head: str, where: str = "head") -> int | None:
    """'linear' -> None; 'mlp:256' -> 256; anything else a ConfigError naming `where`."""
    if head == "linear":
        return None
    kind, _, width = str(head).partition(":")
    if kind == "mlp" and width.isdigit() and int(width) > 0:
        return int(width)
    raise ConfigError(f"{where}: {head!r} is not a head; choose linear or mlp:HIDDEN (e.g. mlp:256)")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2's shape (OpenAI's hparams names) plus the switches the book's experiments need."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0
    causal: bool = True
    dtype: str = "float32"
    ln_epsilon: float = 1e-5
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_style: str = "book"
    adapter_size: int = 0  # bottleneck adapters in every block (0: none); model.Adapter
    head: str = "linear"  # or "mlp:HIDDEN": the classifier's head (model.MLPHead)
    head_dropout: float = 0.1  # an MLP head's dropout, in training only

    def __post_init__(self):
        for field in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPT2Config.{field} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"GPT2Config.lora_rank must be a non-negative integer, got {self.lora_rank!r}")
        if self.lora_style not in (*LORA_STYLES, LEGACY_LORA):
            raise ConfigError(f"GPT2Config.lora_style must be one of {LORA_STYLES}, got {self.lora_style!r}")
        if not isinstance(self.adapter_size, int) or isinstance(self.adapter_size, bool) or self.adapter_size < 0:
            raise ConfigError(f"GPT2Config.adapter_size must be a non-negative integer, got {self.adapter_size!r}")
        head_hidden(self.head, "GPT2Config.head")
        if not (isinstance(self.head_dropout, (int, float)) and 0.0 <= self.head_dropout < 1.0):
            raise ConfigError(f"GPT2Config.head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if self.head != "linear" and self.lora_rank and self.lora_style == "book":
            raise ConfigError(f"head {self.head!r} with the book's LoRA style: the book freezes a linear head "
                              "and adapts it; use --lora-style peft (the head trained fully) or --head linear")
        if not (isinstance(self.ln_epsilon, float) and math.isfinite(self.ln_epsilon) and self.ln_epsilon > 0):
            raise ConfigError(f"GPT2Config.ln_epsilon must be a finite positive float, got {self.ln_epsilon!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"GPT2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes: Any) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    def hparams(self) -> dict[str, int]:
        """The five numbers OpenAI's hparams.json holds."""
        return {k: getattr(self, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], source: str = "hparams", **overrides) -> "GPT2Config":
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in hparams]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**{k: hparams[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")},
                       **overrides)
        except ConfigError as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> "GPT2Config":
        """From a Hugging Face GPT2Config dict; refuses variants this model does not implement."""
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
        n_embd = hf.get("n_embd")
        if hf.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None):
            raise CheckpointError(f"{source}: n_inner {hf['n_inner']!r} != 4 * n_embd is not supported")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise CheckpointError(f"{source}: scale_attn_weights=false is not supported")
        hparams = {
            "n_vocab": hf.get("vocab_size"),
            "n_ctx": hf.get("n_positions", hf.get("n_ctx")),
            "n_embd": n_embd,
            "n_head": hf.get("n_head"),
            "n_layer": hf.get("n_layer"),
        }
        hparams = {k: v for k, v in hparams.items() if v is not None}
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise CheckpointError(f"{source}: layer_norm_epsilon must be a number, got {eps!r}")
        return cls.from_hparams(hparams, source, ln_epsilon=float(eps), **overrides)


GPT2_SIZES: dict[str, GPT2Config] = {
    "gpt2-small": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "gpt2-large": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "gpt2-xl": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
SIZE_ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl",
                "gpt2": "gpt2-small"}
# Small random-init presets for tests, CI and CPU experiments without pretrained weights.
TINY_SIZES: dict[str, GPT2Config] = {
    "tiny": GPT2Config(n_ctx=64, n_embd=16, n_head=2, n_layer=2),
    "mini": GPT2Config(n_ctx=256, n_embd=128, n_head=4, n_layer=4),
}


def canonical_size(name: str) -> str | None:
    """'124M' or 'gpt2' -> 'gpt2-small'; None when `name` is not a released size."""
    name = SIZE_ALIASES.get(name, name)
    return name if name in GPT2_SIZES else None


def preset(name: str) -> GPT2Config:
    """A released size ('gpt2-small', '124M', ...) or a small random-init preset ('tiny', 'mini')."""
    size = canonical_size(name)
    if size is not None:
        return GPT2_SIZES[size]
    if name in TINY_SIZES:
        return TINY_SIZES[name]
    names = sorted(GPT2_SIZES) + sorted(SIZE_ALIASES) + sorted(TINY_SIZES)
    raise ConfigError(f"unknown model size {name!r}; known: {', '.join(names)}")


PADDINGS = ("auto", "longest", "context", "buckets", "none")
BATCHINGS = ("auto", "buckets", "global")
SCHEDULES = ("constant", "cosine")


def _unit(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except (TypeError, ValueError):
        return False


def _need(obj, cond, field, what):
    if not cond:
        raise ConfigError(f"{type(obj).__name__}.{field}: {what}, got {getattr(obj, field)!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What builds the classifier's network: the GPT-2 to start from and the switches the book's
    experiments flip. Fixed once the model exists (Classifier.fit may still change `pooling`)."""

    checkpoint: str = "gpt2-small"  # a checkpoint folder, a released size, or 'tiny'/'mini' (random)
    weights: str = "pretrained"  # or "random": the same shape, freshly initialized
    pooling: str = "last_real"
    lora_rank: int = 16  # adapters are added only with trainable 'lora'
    lora_alpha: float = 16.0
    lora_style: str = "book"  # book (appendix E) | peft (Hugging Face PEFT's GPT-2 defaults); docs/lora.md
    adapter_size: int = 64  # bottleneck width; adapters are added only with trainable 'adapters'
    head: str = "linear"  # or "mlp:HIDDEN"
    head_dropout: float = 0.1  # an MLP head's dropout while training
    causal: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # `jaxcls train` defaults to auto

    def __post_init__(self):
        _need(self, self.weights in ("pretrained", "random"), "weights", "must be 'pretrained' or 'random'")
        _need(self, self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {DTYPE_CHOICES}")
        _need(self, self.pooling in POOLINGS, "pooling", f"must be one of {POOLINGS}")
        _need(self, isinstance(self.lora_rank, int) and self.lora_rank > 0, "lora_rank", "must be a positive integer")
        _need(self, self.lora_style in LORA_STYLES, "lora_style", f"must be one of {LORA_STYLES}")
        _need(self, isinstance(self.adapter_size, int) and self.adapter_size > 0, "adapter_size",
              "must be a positive integer")
        head_hidden(self.head, "ModelSpec.head")
        _need(self, 0.0 <= self.head_dropout < 1.0, "head_dropout", "must be in [0, 1)")

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the labelled texts come from."""

    data: str = "sms-spam"  # "sms-spam" or a CSV/TSV/JSONL file (then split 70/10/20)
    data_path: str | None = None  # a local SMSSpamCollection or its zip, for sms-spam
    validation: str | None = None
    test: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    task: str = "single"  # see docs/tasks.md: single | multilabel | regression | pair[-...] | similarity[-...] | choice
    pair_column: str | None = None
    context_column: str | None = None
    question_column: str | None = None
    choices_column: str | None = None
    choice_columns: str | None = None  # option columns, comma-separated, instead of a choices list
    label_separator: str = ","  # between multi-label names in a CSV/TSV field
    delimiter: str = "<|endoftext|>"  # joins the two parts of a pair, similarity or choice row
    split: str = "0.7,0.1,0.2"  # train,validation,test fractions of a --data file without given splits

    def __post_init__(self):
        from jaxcls.task import Inputs, parse_task_name

        parse_task_name(self.task)  # a named ConfigError for an unknown task
        Inputs("text", self.delimiter)  # and for an empty delimiter
        _need(self, isinstance(self.label_separator, str) and self.label_separator != "", "label_separator",
              "must be a non-empty string")
        self.split_fractions  # noqa: B018 -- a named ConfigError for a bad --split

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        """`split` as three fractions: non-negative, summing to 1, train > 0."""
        try:
            parts = tuple(float(x) for x in str(self.split).split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or not all(map(math.isfinite, parts)) or min(parts) < 0 or parts[0] <= 0 \
                or abs(sum(parts) - 1) > 1e-6:
            raise ConfigError(f"--split {self.split}: must be three non-negative fractions train,validation,test "
                              "summing to 1 with train > 0, e.g. 0.8,0.2,0")
        return parts

    @property
    def is_sms(self) -> bool:
        return self.data in ("sms-spam", "sms_spam")

    def replace(self, **changes) -> "DataSpec":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What drives the training loop. With ModelSpec and DataSpec, one field per `jaxcls train`
    flag; the defaults reproduce the book's chapter 6 run."""

    trainable: str = "last_block"
    padding: str = "auto"  # auto: buckets unless pooling is 'last'; longest|context|buckets|none|N
    batching: str = "auto"  # with length buckets: auto | buckets | global (see resolved_batching)
    epochs: int = 5
    batch_size: int = 8
    accumulation: int = 1  # micro-batches of batch_size per optimizer update
    lr: float = 5e-5
    weight_decay: float = 0.1
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float | None = None
    class_weights: str = "none"  # none | balanced | comma-separated weights per class
    label_smoothing: float = 0.0
    pos_weight: str = "none"  # multilabel: none | auto | w1,w2,... per label
    thresholds: str = "0.5"  # multilabel: a decision threshold for every label, or 'tune' on validation
    standardize: bool = False  # regression: train on standardised targets (undone at prediction)
    seed: int = 123
    eval_freq: int = 50
    eval_iter: int = 5
    keep_best: bool = False  # keep the parameters of the epoch with the best --monitor (validation loss)
    early_stop_patience: int | None = None  # stop after this many epoch evaluations without improvement
    monitor: str = "val_loss"  # what keep-best and early stopping compare: val_loss | val_accuracy | val_macro_f1
    min_delta: float = 0.0  # an improvement is better than the best by more than this
    drop_last: bool = True  # the book drops the last partial training batch
    cache: bool = True  # reuse frozen-prefix activations across epochs where that is exact
    cache_budget_mb: int = 4096
    cache_dtype: str = "auto"  # cached states stored as: auto (the compute dtype) | float32 | bfloat16
    cache_memory: str = "host"  # where cached states live: host | device (single device)
    cache_dir: str | None = None  # where a cache over the budget spills (default: the run folder)
    keep_cache: bool = False  # keep a spilled cache's file after the run
    data_parallel: bool = False  # split each batch over all devices (and processes)
    fsdp: bool = False  # also shard large parameters and optimizer state over the devices
    compilation_cache: str | None = None  # folder for JAX's persistent compilation cache
    max_steps: int | None = None  # stop early (tests, benchmarks)
    save_every: int = 200  # steps between resumable train-state saves
    save_full: bool = False  # save every weight, not only the trained ones
    out: str | None = None

    def __post_init__(self):
        need = functools.partial(_need, self)
        need(str(self.padding) in PADDINGS or str(self.padding).isdigit(), "padding",
             f"must be one of {PADDINGS} or a positive integer")
        need(self.batching in BATCHINGS, "batching", f"must be one of {BATCHINGS}")
        need(self.cache_dtype in ("auto", "float32", "bfloat16"), "cache_dtype",
             "must be 'auto', 'float32' or 'bfloat16'")
        need(self.cache_memory in ("host", "device"), "cache_memory", "must be 'host' or 'device'")
        need(isinstance(self.cache_budget_mb, int) and self.cache_budget_mb >= 0, "cache_budget_mb",
             "must be a whole number of MiB >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        for field in ("epochs", "batch_size", "accumulation", "eval_freq", "eval_iter", "save_every"):
            need(isinstance(getattr(self, field), int) and getattr(self, field) > 0, field,
                 "must be a positive integer")
        need(self.lr > 0, "lr", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.thresholds == "tune" or _unit(self.thresholds), "thresholds", "must be 'tune' or a number in [0, 1]")
        need(self.max_steps is None or self.max_steps > 0, "max_steps", "must be positive")
        need(self.clip_norm is None or self.clip_norm > 0, "clip_norm", "must be positive")
        need(self.early_stop_patience is None or (isinstance(self.early_stop_patience, int)
                                                  and self.early_stop_patience > 0),
             "early_stop_patience", "must be a positive number of evaluations")
        need(self.monitor in MONITORS, "monitor", f"must be one of {MONITORS}")
        need(isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta) and self.min_delta >= 0,
             "min_delta", "must be a finite number >= 0")
        if (self.monitor != "val_loss" or self.min_delta) and not (self.keep_best or self.early_stop_patience):
            raise ConfigError(f"--monitor/--min-delta ({self.monitor}, {self.min_delta}) say what --keep-best and "
                              "--early-stop-patience compare; give one of them")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def resolved_padding(self, pooling: str) -> str:
        """'auto' means length buckets, unless the pooling reads a padding position (the book's
        literal 'last'), which needs the book's fixed padding to the longest training text."""
        if self.padding == "auto":
            return "longest" if pooling == "last" else "buckets"
        return str(self.padding)

    def resolved_batching(self, cached: bool) -> str:
        """How length-bucketed training forms its batches. 'buckets' draws each batch from one
        length bucket: least padding, but batch composition follows length, and length often
        follows the label (SMS spam: 84% of the texts up to 32 tokens are ham, 85% of those of
        33-64 tokens spam), so batches are nearly single-class. 'global' shuffles the whole split
        as the book's loader does and pads each batch to the bucket of its longest text: the same
        batches, hence the same optimization path, as fixed padding. 'auto' picks 'global' when
        the frozen prefix is cached (a step then costs little per padded position) and 'buckets'
        when every step runs the whole network."""
        if self.batching == "auto":
            return "global" if cached else "buckets"
        return self.batching
