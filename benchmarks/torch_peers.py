"""PyTorch peers for the jaxcls benchmark suite.

Two reference implementations of "GPT-2 as a spam classifier" (chapter 6 of
Raschka's *Build a Large Language Model (From Scratch)*) that the JAX numbers
are compared against:

* ``book``: :class:`BookGPT`, a plain eager PyTorch GPT-2 written the way the
  book writes its ``GPTModel`` (hand-rolled LayerNorm and tanh-GELU, separate
  query/key/value projections, a registered causal-mask buffer, the LM head
  replaced by a ``Linear(emb, num_classes)``), optionally under
  ``torch.compile``;
* ``hf``: Hugging Face ``GPT2ForSequenceClassification``, randomly initialised
  from a ``GPT2Config`` (no hub access here).

Both are trained the book's way: the logits of the last token, cross-entropy,
AdamW(lr=5e-5, weight_decay=0.1) over the trainable parameters, with the
book's freezing presets (``head``, ``last_block``, ``all``).

This module imports neither jax nor jaxcls (benchmarks/system.py, whose
peak-RSS helpers it shares, imports jax only inside the functions that need
it); everything it returns is a plain JSON-serialisable dict.  The main
benchmark script imports it only when torch is installed.  Quick manual run
from the repository root::

    python -m benchmarks.torch_peers --impl book --size small --mode train \
        --trainable last_block --batch 8 --seq-len 120 --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.system import peak_rss_mb, reset_peak_rss

__all__ = [
    "SIZES",
    "TRAINABLE_PRESETS",
    "BookGPT",
    "build_model",
    "apply_freezing",
    "load_gpt2_weights",
    "torch_info",
    "measure_train",
    "measure_infer",
    "finetune_sms",
]

PAD_ID = 50256  # <|endoftext|>, the book's padding token
TRAINABLE_PRESETS = ("head", "last_block", "all")
IMPLS = ("book", "hf")

_BASE = {"n_vocab": 50257, "n_ctx": 1024, "drop_rate": 0.0, "qkv_bias": True}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_BASE, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2},
    "small": {**_BASE, "n_embd": 768, "n_head": 12, "n_layer": 12},
    "medium": {**_BASE, "n_embd": 1024, "n_head": 16, "n_layer": 24},
    "large": {**_BASE, "n_embd": 1280, "n_head": 20, "n_layer": 36},
    "xl": {**_BASE, "n_embd": 1600, "n_head": 25, "n_layer": 48},
}


# --------------------------------------------------------------------------
# The book-style model
# --------------------------------------------------------------------------


class _LayerNorm(nn.Module):
    """LayerNorm written out by hand (biased variance, eps 1e-5) as in the book."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mu) / torch.sqrt(var + self.eps)) + self.shift


class _GELU(nn.Module):
    """The tanh approximation of GELU, spelled out elementwise."""

    _C = math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(self._C * (x + 0.044715 * x.pow(3))))


class _FeedForward(nn.Module):
    def __init__(self, emb: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb, 4 * emb), _GELU(), nn.Linear(4 * emb, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v projections and an
    explicit (masked_fill, softmax, matmul) attention, like the book."""

    def __init__(self, emb: int, n_ctx: int, n_head: int, dropout: float, qkv_bias: bool):
        super().__init__()
        if emb % n_head:
            raise ValueError(f"n_embd={emb} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.head_dim = emb // n_head
        self.W_query = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_key = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_value = nn.Linear(emb, emb, bias=qkv_bias)
        self.out_proj = nn.Linear(emb, emb)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(n_ctx, n_ctx), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, emb = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # (b, t, emb) -> (b, h, t, d)
            return proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query), heads(self.W_key), heads(self.W_value)
        scores = q @ k.transpose(2, 3)
        scores = scores.masked_fill(self.mask.bool()[:t, :t], float("-inf"))
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        ctx = (weights @ v).transpose(1, 2).contiguous().view(b, t, emb)
        return self.out_proj(ctx)


class _Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        emb = cfg["n_embd"]
        drop = cfg.get("drop_rate", 0.0)
        self.att = _CausalSelfAttention(emb, cfg["n_ctx"], cfg["n_head"], drop, cfg.get("qkv_bias", True))
        self.ff = _FeedForward(emb)
        self.norm1 = _LayerNorm(emb)
        self.norm2 = _LayerNorm(emb)
        self.drop_shortcut = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """GPT-2 in plain PyTorch with a classification head, the book's layout.

    ``cfg`` keys: ``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``, ``n_layer``,
    optional ``drop_rate`` (0.0), ``qkv_bias`` (True, as OpenAI's weights
    need) and ``num_classes`` (2).  ``forward`` returns logits for every
    position, shape ``(batch, seq, num_classes)``; the classifier reads the
    last one.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        emb = cfg["n_embd"]
        self.tok_emb = nn.Embedding(cfg["n_vocab"], emb)
        self.pos_emb = nn.Embedding(cfg["n_ctx"], emb)
        self.drop_emb = nn.Dropout(cfg.get("drop_rate", 0.0))
        self.trf_blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg["n_layer"])])
        self.final_norm = _LayerNorm(emb)
        self.out_head = nn.Linear(emb, cfg.get("num_classes", 2))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def _hf_model(cfg: dict) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    drop = cfg.get("drop_rate", 0.0)
    config = GPT2Config(
        vocab_size=cfg["n_vocab"],
        n_positions=cfg["n_ctx"],
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        num_labels=cfg.get("num_classes", 2),
        pad_token_id=PAD_ID,
        resid_pdrop=drop,
        embd_pdrop=drop,
        attn_pdrop=drop,
    )
    return GPT2ForSequenceClassification(config)


def build_model(impl: str, cfg: dict, *, seed: int = 0, weights: str | None = None) -> nn.Module:
    """A fresh randomly initialised peer model (``impl`` in ``book``/``hf``);
    with ``weights``, the GPT-2 backbone is loaded from an OpenAI/HF
    ``model.safetensors`` file (the classification head stays random)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    torch.manual_seed(seed)
    model = BookGPT(cfg) if impl == "book" else _hf_model(cfg)
    if weights is not None:
        load_gpt2_weights(model, weights)
    return model


def _classify(impl: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the last token, shape (batch, num_classes)."""
    if impl == "book":
        return model(x)[:, -1, :]
    return model(input_ids=x).logits


# --------------------------------------------------------------------------
# Loading OpenAI's GPT-2 weights (optional; needs a local file)
# --------------------------------------------------------------------------


def load_gpt2_weights(model: nn.Module, path: str) -> None:
    """Copy a GPT-2 checkpoint in the Hugging Face ``model.safetensors``
    layout (``wte``, ``wpe``, ``h.N.attn.c_attn`` ..., optionally prefixed by
    ``transformer.``) into a :class:`BookGPT` or a
    ``GPT2ForSequenceClassification``.  Only the backbone is copied."""
    from safetensors.numpy import load_file

    raw = load_file(path)
    sd = {k.removeprefix("transformer."): torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
    with torch.no_grad():
        if isinstance(model, BookGPT):
            _load_into_book(model, sd)
        else:
            missing, _ = model.transformer.load_state_dict(sd, strict=False)
            missing = [m for m in missing if not m.endswith(".attn.bias") and not m.endswith("masked_bias")]
            if missing:
                raise KeyError(f"checkpoint lacks {missing[:5]}")


def _load_into_book(model: BookGPT, sd: dict[str, torch.Tensor]) -> None:
    def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if param.shape != value.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
        param.copy_(value)

    put(model.tok_emb.weight, sd["wte.weight"], "wte.weight")
    put(model.pos_emb.weight, sd["wpe.weight"], "wpe.weight")
    for i, blk in enumerate(model.trf_blocks):
        p = f"h.{i}."
        # HF stores Conv1D weights as (in, out); nn.Linear wants (out, in).
        qw, kw, vw = sd[p + "attn.c_attn.weight"].chunk(3, dim=-1)
        qb, kb, vb = sd[p + "attn.c_attn.bias"].chunk(3, dim=-1)
        att = blk.att
        for lin, w, b, n in ((att.W_query, qw, qb, "q"), (att.W_key, kw, kb, "k"), (att.W_value, vw, vb, "v")):
            put(lin.weight, w.T, p + "attn.c_attn." + n)
            if lin.bias is not None:
                put(lin.bias, b, p + "attn.c_attn.bias." + n)
        put(att.out_proj.weight, sd[p + "attn.c_proj.weight"].T, p + "attn.c_proj.weight")
        put(att.out_proj.bias, sd[p + "attn.c_proj.bias"], p + "attn.c_proj.bias")
        put(blk.ff.layers[0].weight, sd[p + "mlp.c_fc.weight"].T, p + "mlp.c_fc.weight")
        put(blk.ff.layers[0].bias, sd[p + "mlp.c_fc.bias"], p + "mlp.c_fc.bias")
        put(blk.ff.layers[2].weight, sd[p + "mlp.c_proj.weight"].T, p + "mlp.c_proj.weight")
        put(blk.ff.layers[2].bias, sd[p + "mlp.c_proj.bias"], p + "mlp.c_proj.bias")
        put(blk.norm1.scale, sd[p + "ln_1.weight"], p + "ln_1.weight")
        put(blk.norm1.shift, sd[p + "ln_1.bias"], p + "ln_1.bias")
        put(blk.norm2.scale, sd[p + "ln_2.weight"], p + "ln_2.weight")
        put(blk.norm2.shift, sd[p + "ln_2.bias"], p + "ln_2.bias")
    put(model.final_norm.scale, sd["ln_f.weight"], "ln_f.weight")
    put(model.final_norm.shift, sd["ln_f.bias"], "ln_f.bias")


# --------------------------------------------------------------------------
# Freezing and the optimiser
# --------------------------------------------------------------------------


def apply_freezing(impl: str, model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` per the book's presets and return the trainable
    parameters: ``head`` (classifier only), ``last_block`` (last transformer
    block + final LayerNorm + classifier, the book's choice) or ``all``."""
    if trainable not in TRAINABLE_PRESETS:
        raise ValueError(f"trainable must be one of {TRAINABLE_PRESETS}, not {trainable!r}")
    if trainable == "all":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if impl == "book":
            parts = [model.out_head]
            if trainable == "last_block":
                parts += [model.trf_blocks[-1], model.final_norm]
        else:
            parts = [model.score]
            if trainable == "last_block":
                parts += [model.transformer.h[-1], model.transformer.ln_f]
        for part in parts:
            part.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)


def _count(params) -> int:
    return int(sum(p.numel() for p in params))


# --------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------


def _system(impl: str, compile: bool) -> str:
    if impl == "book":
        return "pytorch-book-compile" if compile else "pytorch-book-eager"
    return "hf-transformers-compile" if compile else "hf-transformers"


def _check_shape(cfg: dict, batch: int, seq_len: int, steps: int, warmup: int) -> None:
    if seq_len < 1 or seq_len > cfg["n_ctx"]:
        raise ValueError(f"seq_len={seq_len} must be in 1..n_ctx={cfg['n_ctx']}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise ValueError("batch and steps must be >= 1, warmup >= 0")


def _random_batch(cfg: dict, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids that are never the pad id, so HF pools the last token."""
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg["n_vocab"], PAD_ID)
    x = torch.randint(0, hi, (batch, seq_len), generator=g)
    y = torch.randint(0, cfg.get("num_classes", 2), (batch,), generator=g)
    return x, y


def _summary(system: str, step_times: list[float], warmup_s: float, batch: int, seq_len: int) -> dict:
    med = statistics.median(step_times)
    return {
        "system": system,
        "examples_per_s": batch / med,
        "tokens_per_s": batch * seq_len / med,
        "step_time_s_median": med,
        "step_times_s": step_times,
        "warmup_s": warmup_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:limit]


def torch_info() -> dict:
    """Versions and settings that the peer numbers depend on."""
    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "mkl": bool(torch.backends.mkl.is_available()),
        "compile_available": hasattr(torch, "compile"),
        "cxx_compiler": shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++"),
    }
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        info["cpu_capability"] = None
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except Exception:  # noqa: BLE001 - optional
        info["transformers_version"] = None
    return info


def _timed_record(
    impl: str,
    cfg: dict,
    mode: str,
    prepare,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    threads: int,
    compile: bool,
    seed: int,
    **extra: Any,
) -> dict:
    """The body shared by :func:`measure_train` and :func:`measure_infer`.

    Checks the shape, sets the thread count, resets the peak-RSS counter,
    builds the model and one fixed random batch ``(x, y)``, then calls
    ``prepare(model, x, y)``, which puts the model in its mode and returns
    ``(run, fields)``: ``run(fwd)`` does one step through ``fwd`` (the
    model, or its ``torch.compile`` wrapper) and ``fields`` are record
    entries known only after preparation.  ``warmup`` untimed steps, then
    ``steps`` steps each timed around its ``run`` call.  With
    ``compile``, a failure to compile or run is returned as
    ``{"system", "error"}``; without it, errors propagate.  ``extra`` goes
    into the record after ``mode`` and ``impl``, ``fields`` after
    ``threads``."""
    _check_shape(cfg, batch, seq_len, steps, warmup)
    torch.set_num_threads(threads)
    system = _system(impl, compile)
    reset_peak_rss()
    model = build_model(impl, cfg, seed=seed)
    x, y = _random_batch(cfg, batch, seq_len, seed)
    run, fields = prepare(model, x, y)
    fwd = model
    if compile:
        try:
            fwd = torch.compile(model)
        except Exception as exc:  # noqa: BLE001
            return {"system": system, "error": _short(exc)}

    def step() -> float:
        t0 = time.perf_counter()
        run(fwd)
        return time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warmup_s = time.perf_counter() - t0
        times = [step() for _ in range(steps)]
    except Exception as exc:  # noqa: BLE001
        if not compile:
            raise
        return {"system": system, "error": _short(exc)}

    out = _summary(system, times, warmup_s, batch, seq_len)
    out.update(mode=mode, impl=impl, **extra)
    out.update(batch=batch, seq_len=seq_len, threads=threads, **fields)
    out["total_params"] = _count(model.parameters())
    if impl == "hf":
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return out


def measure_train(
    impl: str,
    cfg: dict,
    *,
    trainable: str,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    threads: int,
    compile: bool = False,
    seed: int = 0,
) -> dict:
    """Steady-state throughput of the book's training step on one fixed
    random batch: median wall time of ``steps`` timed steps after ``warmup``
    untimed ones (``warmup_s`` includes ``torch.compile``'s compilation).
    ``peak_rss_mb`` is the process's peak RSS since this call started (Linux)."""

    def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        model.train()
        params = apply_freezing(impl, model, trainable)
        opt = _optimizer(params)

        def run(fwd: nn.Module) -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(_classify(impl, fwd, x), y)
            loss.backward()
            opt.step()

        return run, {"trainable_params": _count(params)}

    return _timed_record(
        impl, cfg, "train", prepare, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
        threads=threads, compile=compile, seed=seed, trainable=trainable,
    )


def measure_infer(
    impl: str,
    cfg: dict,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    threads: int,
    compile: bool = False,
    seed: int = 0,
) -> dict:
    """Steady-state classification throughput (eval mode, ``inference_mode``)."""

    def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        model.eval()

        def run(fwd: nn.Module) -> None:
            with torch.inference_mode():
                logits = _classify(impl, fwd, x)
                logits.argmax(dim=-1)

        return run, {}

    return _timed_record(
        impl, cfg, "infer", prepare, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
        threads=threads, compile=compile, seed=seed,
    )


# --------------------------------------------------------------------------
# The book's fine-tuning loop
# --------------------------------------------------------------------------


def _batches(n: int, batch: int, *, drop_last: bool, order: np.ndarray | None = None):
    idx = np.arange(n) if order is None else order
    stop = (n // batch) * batch if drop_last else n
    for start in range(0, stop, batch):
        yield idx[start : start + batch]


def finetune_sms(
    impl: str,
    cfg: dict,
    *,
    train_ids,
    train_labels,
    val_ids,
    val_labels,
    test_ids,
    test_labels,
    epochs: int,
    batch: int,
    trainable: str,
    eval_freq: int = 50,
    eval_iter: int = 5,
    threads: int,
    seed: int = 123,
    weights: str | None = None,
) -> dict:
    """The book's ``train_classifier_simple`` on pre-tokenised, pre-padded
    int arrays ``(n, seq_len)`` with labels ``(n,)``.

    Each epoch walks a fresh shuffle of the training set in full batches
    (``drop_last=True``, as the book's train loader); every ``eval_freq``
    steps (from step 0, as the book counts) the mean loss over the first
    ``eval_iter`` batches of train and val is logged, and after each epoch
    the accuracy on ``eval_iter`` batches.  At the end the accuracy over
    every example of train, val and test is computed.  ``wall_s`` is the
    training loop including its periodic evaluations (what the book
    times); ``final_eval_s`` is the final full-set accuracy pass.
    """
    torch.set_num_threads(threads)
    data = {}
    for name, ids, labels in (
        ("train", train_ids, train_labels),
        ("val", val_ids, val_labels),
        ("test", test_ids, test_labels),
    ):
        x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ValueError(f"{name}: ids must be (n, seq_len) and labels (n,), got {tuple(x.shape)}, {tuple(y.shape)}")
        if x.shape[1] > cfg["n_ctx"]:
            raise ValueError(f"{name}: seq_len {x.shape[1]} exceeds n_ctx {cfg['n_ctx']}")
        data[name] = (x, y)
    if data["train"][0].shape[0] < batch:
        raise ValueError("fewer training examples than one batch")

    model = build_model(impl, cfg, seed=seed, weights=weights)
    params = apply_freezing(impl, model, trainable)
    opt = _optimizer(params)
    rng = np.random.default_rng(seed)

    def loss_of(xb, yb):
        return F.cross_entropy(_classify(impl, model, xb), yb)

    @torch.no_grad()
    def mean_loss(name: str, num_batches: int | None) -> float:
        x, y = data[name]
        losses = []
        for sel in itertools.islice(_batches(x.shape[0], batch, drop_last=(name == "train")), num_batches):
            losses.append(loss_of(x[sel], y[sel]).item())
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def accuracy(name: str, num_batches: int | None) -> float:
        x, y = data[name]
        correct = seen = 0
        for sel in itertools.islice(_batches(x.shape[0], batch, drop_last=False), num_batches):
            pred = _classify(impl, model, x[sel]).argmax(dim=-1)
            correct += int((pred == y[sel]).sum())
            seen += len(sel)
        return correct / seen if seen else float("nan")

    history: dict[str, list] = {"step": [], "train_loss": [], "val_loss": [], "epoch_train_acc": [], "epoch_val_acc": []}
    examples_seen, global_step = 0, -1
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        x, y = data["train"]
        for sel in _batches(x.shape[0], batch, drop_last=True, order=rng.permutation(x.shape[0])):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x[sel], y[sel])
            loss.backward()
            opt.step()
            examples_seen += len(sel)
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                history["step"].append(global_step)
                history["train_loss"].append(mean_loss("train", eval_iter))
                history["val_loss"].append(mean_loss("val", eval_iter))
                model.train()
        model.eval()
        history["epoch_train_acc"].append(accuracy("train", eval_iter))
        history["epoch_val_acc"].append(accuracy("val", eval_iter))
    wall_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    model.eval()
    acc = {name: accuracy(name, None) for name in ("train", "val", "test")}
    final_eval_s = time.perf_counter() - t1

    return {
        "system": _system(impl, False),
        "impl": impl,
        "trainable": trainable,
        "epochs": epochs,
        "batch": batch,
        "seq_len": int(data["train"][0].shape[1]),
        "threads": threads,
        "pretrained": weights is not None,
        "wall_s": wall_s,
        "final_eval_s": final_eval_s,
        "train_steps": global_step + 1,
        "examples_seen": examples_seen,
        "examples_per_s": examples_seen / wall_s if wall_s > 0 else None,
        "train_accuracy": acc["train"],
        "val_accuracy": acc["val"],
        "test_accuracy": acc["test"],
        "history": history,
        "trainable_params": _count(params),
        "total_params": _count(model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one PyTorch peer measurement and print JSON.")
    ap.add_argument("--impl", choices=IMPLS, default="book")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--mode", choices=("train", "infer", "info"), default="train")
    ap.add_argument("--trainable", choices=TRAINABLE_PRESETS, default="last_block")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: min(120, n_ctx)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.mode == "info":
        print(json.dumps(torch_info(), indent=2))
        return 0
    cfg = dict(SIZES[args.size])
    seq_len = args.seq_len if args.seq_len is not None else min(120, cfg["n_ctx"])
    common = dict(
        batch=args.batch, seq_len=seq_len, steps=args.steps, warmup=args.warmup,
        threads=args.threads, compile=args.compile, seed=args.seed,
    )
    if args.mode == "train":
        res = measure_train(args.impl, cfg, trainable=args.trainable, **common)
    else:
        res = measure_infer(args.impl, cfg, **common)
    res["size"] = args.size
    print(json.dumps(res, indent=2))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
