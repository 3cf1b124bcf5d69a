"""GPT-2 in Flax NNX, top to bottom. Attribute paths are the checkpoint's names:
`h/11/attn/c_attn/kernel` is OpenAI's `model/h11/attn/c_attn/w` and HF's `h.11.attn.c_attn.weight`."""

from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcls import cpu_amx
from jaxcls.config import POOLINGS, GPT2Config, head_hidden
from jaxcls.cpu_attention import attention_on_mkl, head_context, head_scores
from jaxcls.cpu_gemm import activation_dtype, matmul, matmul_gelu
from jaxcls.errors import ConfigError
from jaxcls.lora import LoRAHead, adapter_update, init_adapter, lora_parts, lora_scale, merged_lora_params

EMBED_STREAM = 1 << 20  # dropout key stream of the embeddings; blocks use their index
HEAD_STREAM = 1 << 23  # an MLP head's dropout (shared_prefix.py has 1 << 21 and 1 << 22)


def path_str(path: Iterable) -> str:
    """('h', 11, 'attn', 'c_attn', 'kernel') -> 'h/11/attn/c_attn/kernel': how files and messages
    name a parameter."""
    return "/".join(map(str, path))


def compute_dtype(config: GPT2Config):
    """The dtype of activations and of everything but the matmuls' operands (cpu_gemm)."""
    return activation_dtype(config.dtype)


def check_backend(config: GPT2Config) -> None:
    """Refuse a compute dtype the default backend cannot run, before anything is compiled: XLA:CPU
    has no float16 attention (jitted, it fails with "precision 'F16_F16_F32' is not supported")."""
    if config.dtype == "float16" and jax.default_backend() == "cpu":
        raise ConfigError("dtype 'float16' does not run on the CPU backend (XLA:CPU has no float16 "
                          "attention); use bfloat16 or float32")


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when `key` is None (evaluation) or the rate is zero."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def fold(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


class Bottleneck(nnx.Module):
    """A bottleneck adapter (Houlsby et al., 2019): h -> h + up(gelu(down(h))), n_embd -> size ->
    n_embd. `up` starts at zero, so the adapter starts as the identity and the model as the
    pretrained one; `down` starts as nnx.Linear's default (LeCun normal). GELU is GPT-2's tanh form."""

    def __init__(self, n_embd: int, size: int, *, config: GPT2Config, rngs: nnx.Rngs):
        dtype = compute_dtype(config)
        self.down = nnx.Linear(n_embd, size, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(size, n_embd, dtype=dtype, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, h):
        return h + self.up(jax.nn.gelu(self.down(h), approximate=True))


class Linear(nnx.Module):
    """GPT-2's Conv1D: kernel stored [in, out] as both checkpoints store it, plus a LoRA adapter of
    `lora_pairs` pairs when the config has a rank (modules pass `lora_parts(config, role)`), and a
    bottleneck adapter on its output when `adapter` (the sublayers' output projections ask for one)."""

    def __init__(self, n_in: int, n_out: int, *, config: GPT2Config, std: float = 0.02,
                 rngs: nnx.Rngs, lora_pairs: int = 1, adapter: bool = False):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (n_in, n_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32))
        self.dtype, self.operands = compute_dtype(config), jnp.dtype(config.dtype)
        self.lora_scale = lora_scale(config)
        if config.lora_rank and lora_pairs:
            self.lora_a, self.lora_b = init_adapter(config, n_in, n_out, lora_pairs, rngs.params())
        else:
            self.lora_a = self.lora_b = None
        size = config.adapter_size if adapter else 0
        self.adapter = Bottleneck(n_out, size, config=config, rngs=rngs) if size else None

    def __call__(self, x, cols: slice = slice(None), *, gelu: bool = False):
        """x @ kernel + bias, or only the output columns `cols` of it (the query part of c_attn);
        with `gelu`, GPT-2's GELU of that, fused into the AMX kernel where the kernel is packed
        for it (bfloat16 out: only the MLP's c_fc asks, and its output feeds a bfloat16 matmul)."""
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        if gelu and cpu_amx.is_packed(kernel) and self.lora_a is None and self.adapter is None:
            return matmul_gelu(x, cpu_amx.columns(kernel, cols), self.bias[cols])
        y = matmul(x, kernel, self.operands, cols).astype(self.dtype) + self.bias[cols].astype(self.dtype)
        if self.lora_a is not None:
            low = adapter_update(x, self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype), cols)
            y = y + self.lora_scale * low
        y = y if self.adapter is None else self.adapter(y)
        return jax.nn.gelu(y, approximate=True) if gelu else y


class Attention(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's scaled init of residual projections
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, config=config, rngs=rngs,
                             lora_pairs=lora_parts(config, "attn.c_attn"))
        self.c_proj = Linear(config.n_embd, config.n_embd, config=config, std=proj_std, rngs=rngs,
                             lora_pairs=lora_parts(config, "attn.c_proj"), adapter=True)

    def __call__(self, x, mask, dropout_key=None):
        q, k, v = self.split_heads(self.c_attn(x), 3)
        return self.c_proj(self.attend(q, k, v, mask, dropout_key))

    def split_heads(self, y, n: int):
        """c_attn's output (B, T, n*C) as n inputs of `attend`: on MKL's path (heads, part) pairs that
        the batch GEMM reads in place, else n arrays (B, T, C)."""
        if not attention_on_mkl(self.config.dtype):
            return jnp.split(y, n, axis=-1)
        heads = y.reshape(*y.shape[:2], n, self.config.n_head, self.config.head_dim)
        return [(heads, i) for i in range(n)]

    def attend(self, q, k, v, mask, dropout_key=None):
        """q (B, Tq, C), k and v (B, T, C) -> (B, Tq, C); each may be a (heads, part) pair of
        `split_heads` instead."""
        cfg = self.config
        B, Tq = (q[0] if isinstance(q, tuple) else q).shape[:2]
        mkl = attention_on_mkl(cfg.dtype)
        if mkl:  # every input as (B, T, S, H, D) and its part
            (q, q_part), (k, k_part), (v, v_part) = (
                t if isinstance(t, tuple) else (t.reshape(*t.shape[:2], 1, cfg.n_head, cfg.head_dim), 0)
                for t in (q, k, v))
        else:
            q, k, v = (t.reshape(*t.shape[:2], cfg.n_head, cfg.head_dim) for t in (q, k, v))  # (B, T, nh, hd)
        if not mkl and (dropout_key is None or cfg.dropout == 0.0):
            y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            scores = (head_scores(q, k, q_part, k_part) if mkl
                      else jnp.einsum("bqhd,bkhd->bhqk", q, k)) / math.sqrt(cfg.head_dim)
            if mask is not None:
                scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
            probs = dropout(probs, cfg.dropout, dropout_key)
            y = head_context(probs, v, v_part) if mkl else jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return y.reshape(B, Tq, cfg.n_embd)


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, config=config, rngs=rngs,
                           lora_pairs=lora_parts(config, "mlp.c_fc"))
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, config=config, std=proj_std, rngs=rngs,
                             lora_pairs=lora_parts(config, "mlp.c_proj"), adapter=True)

    def __call__(self, x):
        return self.c_proj(self.c_fc(x, gelu=True))


def layer_norm(config: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.n_embd, epsilon=config.ln_epsilon, dtype=compute_dtype(config),
                         rngs=rngs)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block. With bottleneck adapters (config.adapter_size), each
    sublayer's output projection carries one, so the block computes x + adapter(sublayer(x)) twice
    (Houlsby placement: before the residual add and its dropout)."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.dropout_rate = config.dropout
        self.ln_1 = layer_norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.ln_2 = layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, mask, dropout_key=None):
        x = x + dropout(self.attn(self.ln_1(x), mask, fold(dropout_key, 0)), self.dropout_rate,
                        fold(dropout_key, 1))
        return x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, fold(dropout_key, 2))

    def at_positions(self, x, positions, mask, dropout_key=None):
        """The block's output at one position per row: x (B, T, C), positions (B,) -> (B, C).
        Keys and values come from every position; the query, projection and MLP run only where
        the output is read, which is what a classifier pooling one token needs of its last block."""
        C = x.shape[-1]
        h = self.ln_1(x)
        k, v = self.attn.split_heads(self.attn.c_attn(h, slice(C, 3 * C)), 2)
        x_at = jnp.take_along_axis(x, positions[:, None, None], axis=1)  # (B, 1, C)
        h_at = jnp.take_along_axis(h, positions[:, None, None], axis=1)
        q = self.attn.c_attn(h_at, slice(0, C))
        y = self.attn.c_proj(self.attn.attend(q, k, v, mask, fold(dropout_key, 0)))
        x_at = x_at + dropout(y, self.dropout_rate, fold(dropout_key, 1))
        x_at = x_at + dropout(self.mlp(self.ln_2(x_at)), self.dropout_rate, fold(dropout_key, 2))
        return x_at[:, 0]


def build_mask(config: GPT2Config, T: int, lengths=None):
    """Boolean mask (B or 1, 1, T, T): causal if the config says so, and keys past each text's
    length hidden when `lengths` is given. None when nothing is masked."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None] if config.causal else None
    if lengths is not None:
        keys = (jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


class GPT2(nnx.Module):
    """The GPT-2 backbone; `__call__` returns the final hidden states after `ln_f`."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        check_backend(config)
        self.config = config
        dtype = compute_dtype(config)
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(config.n_vocab, config.n_embd, dtype=dtype, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(config.n_ctx, config.n_embd, dtype=dtype, embedding_init=init, rngs=rngs)
        self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = layer_norm(config, rngs)

    def embed(self, token_ids, dropout_key=None):
        T = token_ids.shape[-1]
        if T > self.config.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the context length n_ctx={self.config.n_ctx}")
        x = self.wte(token_ids) + self.wpe(jnp.arange(T))[None]
        return dropout(x, self.config.dropout, dropout_key)

    def run_blocks(self, x, mask, start: int = 0, stop: int | None = None, dropout_key=None):
        """Blocks [start, stop): the frozen-prefix cache runs the two halves separately."""
        stop = self.config.n_layer if stop is None else stop
        for i in range(start, stop):
            x = self.h[i](x, mask, fold(dropout_key, i))
        return x

    def __call__(self, token_ids, attention_mask=None, *, dropout_key=None):
        """token_ids (B, T) -> hidden (B, T, n_embd). `attention_mask` (B, T), 1 for real tokens,
        keeps padding out of attention; without it every position is attended (as HF does)."""
        lengths = None if attention_mask is None else jnp.sum(attention_mask, axis=-1)
        mask = build_mask(self.config, token_ids.shape[-1], lengths)
        x = self.embed(token_ids, fold(dropout_key, EMBED_STREAM))
        return self.ln_f(self.run_blocks(x, mask, dropout_key=dropout_key))

    def lm_logits(self, hidden):
        """The tied LM head: hidden (..., n_embd) -> float32 logits (..., n_vocab)."""
        return self.wte.attend(hidden).astype(jnp.float32)


SINGLE_POSITION = ("last_real", "last", "first")


def pool_positions(lengths, B: int, T: int, pooling: str):
    """The one position per row that a single-token pooling reads."""
    if pooling == "last" or (pooling == "last_real" and lengths is None):
        return jnp.full((B,), T - 1)
    if pooling == "first":
        return jnp.zeros((B,), jnp.int32)
    return jnp.asarray(lengths) - 1


def query_mask(config: GPT2Config, positions, T: int, lengths=None):
    """Keys visible from each row's query position: (B, 1, 1, T)."""
    keys = jnp.arange(T)[None, :]
    allowed = keys <= positions[:, None] if config.causal else jnp.ones((positions.shape[0], T), bool)
    if lengths is not None:
        allowed = allowed & (keys < jnp.asarray(lengths)[:, None])
    return allowed[:, None, None, :]


def pool(hidden, lengths, pooling: str):
    """hidden (B, T, C) -> (B, C). `last_real` and `mean` use the true lengths, never a search for
    the padding id, which can occur inside a text."""
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "first":
        return hidden[:, 0]
    if lengths is None:
        lengths = jnp.full(hidden.shape[:1], hidden.shape[1])
    if pooling == "last_real":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        real = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]
        total = jnp.sum(jnp.where(real, hidden.astype(jnp.float32), 0.0), axis=1)
        return (total / jnp.maximum(lengths, 1)[:, None]).astype(hidden.dtype)
    raise ConfigError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


class MLPHead(nnx.Module):
    """Linear(n_embd, hidden), ReLU, dropout, Linear(hidden, classes): the feature-extraction
    recipe's head (--head mlp:HIDDEN). Dropout runs only when given a key, i.e. in training."""

    def __init__(self, n_in: int, hidden: int, n_out: int, *, rate: float, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(n_in, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, n_out, rngs=rngs)
        self.rate = rate

    def __call__(self, x, dropout_key=None):
        return self.out(dropout(jax.nn.relu(self.hidden(x)), self.rate, dropout_key))


class GPT2Classifier(GPT2):
    """GPT-2 with its LM head replaced by `head` (n_embd -> num_classes) on a pooled token.
    `num_classes` is the task's head width (jaxcls.task: 1 for multiple choice, whose rows are
    scored one by one); `features` / `suffix_features` stop before the head, for tasks that combine
    several rows of one example (similarity sums two) before it."""

    def __init__(self, config: GPT2Config, num_classes: int, *, pooling: str = "last_real",
                 rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
        super().__init__(config, rngs=rngs)
        self.pooling = pooling
        self.num_classes = num_classes
        hidden = head_hidden(config.head)
        if hidden:
            self.head = MLPHead(config.n_embd, hidden, num_classes, rate=config.head_dropout, rngs=rngs)
        elif lora_parts(config, "head"):
            self.head = LoRAHead(config.n_embd, num_classes, config=config, rngs=rngs)
        else:
            self.head = nnx.Linear(config.n_embd, num_classes, rngs=rngs)

    def head_fn(self, dropout_key=None):
        """The head as tasks call it (features -> logits): an MLP head's dropout is on when a key
        is given, drawn from the step's key on its own stream."""
        if dropout_key is None or not isinstance(self.head, MLPHead):
            return self.head
        return lambda features: self.head(features, fold(dropout_key, HEAD_STREAM))

    def uses_padding_mask(self) -> bool:
        """The book's literal `last` pooling reads a padding position, so it runs unmasked as the
        book does; every other pooling keeps padding out of attention."""
        return self.pooling != "last"

    def prefix(self, token_ids, lengths, stop: int, dropout_key=None):
        """Hidden states entering block `stop`."""
        mask = build_mask(self.config, token_ids.shape[-1],
                              lengths if self.uses_padding_mask() else None)
        return self.run_blocks(self.embed(token_ids, fold(dropout_key, EMBED_STREAM)), mask, 0, stop, dropout_key)

    def suffix_features(self, x, lengths, start: int, dropout_key=None):
        """Blocks from `start`, ln_f and pooling: x (B, T, C) -> float32 pooled features (B, C).
        A single-token pooling runs the last block at that token only (`Block.at_positions`)."""
        B, T, _ = x.shape
        n_layer = self.config.n_layer
        seen = lengths if self.uses_padding_mask() else None
        mask = build_mask(self.config, T, seen)
        if self.pooling in SINGLE_POSITION and start < n_layer:
            x = self.run_blocks(x, mask, start, n_layer - 1, dropout_key)
            positions = pool_positions(lengths, B, T, self.pooling)
            pooled = self.h[n_layer - 1].at_positions(
                x, positions, query_mask(self.config, positions, T, seen), fold(dropout_key, n_layer - 1))
            pooled = self.ln_f(pooled)
        else:
            hidden = self.ln_f(self.run_blocks(x, mask, start, dropout_key=dropout_key))
            pooled = pool(hidden, lengths, self.pooling)
        return pooled.astype(jnp.float32)

    def features(self, token_ids, lengths=None, *, dropout_key=None):
        """token_ids (B, T), lengths (B,) -> float32 pooled features (B, n_embd): what the head
        reads, and what a task combines across the rows of one example (jaxcls.task)."""
        x = self.prefix(token_ids, lengths, 0, dropout_key)
        return self.suffix_features(x, lengths, 0, dropout_key)

    def suffix(self, x, lengths, start: int, dropout_key=None):
        """`suffix_features` and the head: x (B, T, C) -> float32 logits (B, classes)."""
        return self.head_fn(dropout_key)(self.suffix_features(x, lengths, start, dropout_key))

    def __call__(self, token_ids, lengths=None, *, dropout_key=None):
        """token_ids (B, T), lengths (B,) -> float32 logits (B, num_classes), one row per text."""
        return self.head_fn(dropout_key)(self.features(token_ids, lengths, dropout_key=dropout_key))


def skeleton(model: GPT2Classifier, config: GPT2Config):
    """(graphdef, abstract state) of a classifier like `model` (its classes and pooling) built from
    `config`, without making any array: what merge_lora and precision.with_dtype fill in."""
    return nnx.split(nnx.eval_shape(
        lambda: GPT2Classifier(config, model.num_classes, pooling=model.pooling, rngs=nnx.Rngs(0))))


def merge_lora(model: GPT2Classifier) -> GPT2Classifier:
    """The same classifier without adapters (lora_rank 0), its kernels holding the merged update:
    the same logits, at a plain model's cost."""
    if not model.config.lora_rank:
        return model
    params = merged_lora_params(model)
    plain = GPT2Config()
    config = model.config.replace(lora_rank=0, lora_alpha=plain.lora_alpha, lora_style=plain.lora_style)
    graphdef, abstract = skeleton(model, config)
    leaves = [(p, v.replace(jnp.asarray(params[p], v.get_value().dtype))) for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
