"""PyTorch peers for the jaxcls benchmark suite: what a user would run instead of jaxcls to fine-tune
GPT-2 as a spam classifier (chapter 6 of Raschka's *Build a Large Language Model (From Scratch)*).

Two models, each in several configurations (:data:`PEER_CONFIGS`):

* ``book``: the book's ``GPTModel`` in eager PyTorch (benchmarks/torch_book.py);
* ``hf``: transformers' ``GPT2ForSequenceClassification`` (benchmarks/torch_hf.py);

each in float32 or under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (bfloat16 matmuls with
float32 parameters and optimizer state: on CPUs with AMX or AVX512-BF16 oneDNN runs them several
times faster), eager or under ``torch.compile``. All are trained the book's way: the logits of the
last token, cross-entropy, AdamW(lr=5e-5, weight_decay=0.1) over the trainable parameters, with the
book's freezing presets (``head``, ``last_block``, ``all``). The book's training loop itself is in
benchmarks/torch_finetune.py.

For inference only there is a third dtype, ``bfloat16-weights`` (names suffixed ``-bf16-weights``,
:data:`BF16_WEIGHTS_CONFIGS`): the model's parameters and buffers cast with
``model.to(torch.bfloat16)``, no autocast, so every op runs in bfloat16 and no float32 weight is
converted per call (on CPUs with AMX it classifies faster than autocast). Nobody trains that way
(AdamW updates on bfloat16 weights lose most small steps), so :func:`measure_train` refuses it.

This module imports neither jax nor jaxcls; everything it returns is a plain JSON-serialisable
dict. Quick manual run from the repository root::

    python -m benchmarks.torch_peers --impl book --size small --mode train --dtype bfloat16 \
        --trainable last_block --batch 8 --seq-len 120 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.system import peak_rss_mb, reset_peak_rss
from benchmarks.torch_book import PAD_ID, BookGPT, load_into_book
from benchmarks.torch_hf import hf_model

__all__ = ["SIZES", "TRAINABLE_PRESETS", "PEER_CONFIGS", "BF16_WEIGHTS_CONFIGS", "BookGPT", "build_model",
           "apply_freezing", "cast_weights", "param_dtype", "load_gpt2_weights", "torch_info", "measure_train", "measure_infer",
           "fastest"]

TRAINABLE_PRESETS = ("head", "last_block", "all")
IMPLS = ("book", "hf")
TRAIN_DTYPES = ("float32", "bfloat16")  # bfloat16: CPU autocast over float32 parameters
BF16_WEIGHTS = "bfloat16-weights"  # inference only: parameters and buffers cast to bfloat16, no autocast
DTYPES = (*TRAIN_DTYPES, BF16_WEIGHTS)

_BASE = {"n_vocab": 50257, "n_ctx": 1024, "drop_rate": 0.0, "qkv_bias": True}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_BASE, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 2},
    "small": {**_BASE, "n_embd": 768, "n_head": 12, "n_layer": 12},
    "medium": {**_BASE, "n_embd": 1024, "n_head": 16, "n_layer": 24},
    "large": {**_BASE, "n_embd": 1280, "n_head": 20, "n_layer": 36},
    "xl": {**_BASE, "n_embd": 1600, "n_head": 25, "n_layer": 48},
}


class PeerConfig(NamedTuple):
    impl: str
    compile: bool = False
    dtype: str = "float32"

    @property
    def system(self) -> str:
        return system_name(self.impl, self.compile, self.dtype)


_MODELS = (("book", False), ("hf", False), ("book", True), ("hf", True))
# Every configuration a user might pick to train (and classify with); the benchmarks compare jaxcls
# with the fastest of them.
PEER_CONFIGS = tuple(PeerConfig(impl, comp, dtype) for dtype in TRAIN_DTYPES for impl, comp in _MODELS)
# ... and those a user might pick to classify only: the weights cast to bfloat16.
BF16_WEIGHTS_CONFIGS = tuple(PeerConfig(impl, comp, BF16_WEIGHTS) for impl, comp in _MODELS)


def peer_configs(*, compile: bool = True, bf16: bool = True, infer: bool = False) -> list[PeerConfig]:
    """PEER_CONFIGS without the torch.compile ones (``compile=False``) or the bfloat16 ones; with
    ``infer``, followed by BF16_WEIGHTS_CONFIGS (inference only; ``bf16=False`` drops them too)."""
    configs = PEER_CONFIGS + (BF16_WEIGHTS_CONFIGS if infer else ())
    return [c for c in configs if (compile or not c.compile) and (bf16 or c.dtype == "float32")]


def system_name(impl: str, compile: bool = False, dtype: str = "float32") -> str:
    """``pytorch-book-eager``, ``hf-transformers-compile-bf16``, ``hf-transformers-bf16-weights``...:
    float32 names are unsuffixed, ``-bf16`` is autocast, ``-bf16-weights`` the weights in bfloat16."""
    if impl == "book":
        name = "pytorch-book-compile" if compile else "pytorch-book-eager"
    else:
        name = "hf-transformers-compile" if compile else "hf-transformers"
    return name + {"float32": "", "bfloat16": "-bf16", BF16_WEIGHTS: "-bf16-weights"}[dtype]


def autocast(dtype: str):
    """The context a peer computes in: bfloat16 autocast on the CPU for ``bfloat16``; nothing for
    float32, nor for ``bfloat16-weights`` (its model is cast instead: :func:`cast_weights`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def cast_weights(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` with its parameters and buffers in bfloat16 for ``bfloat16-weights`` (in place, as
    ``model.to`` does; before any torch.compile), unchanged for the other dtypes. Both models then
    run in pure bfloat16, masks included (the book reads its causal-mask buffer as booleans;
    transformers builds its masks from the inputs): tests/test_torch_peers.py checks their logits
    against float32's."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    return model.to(torch.bfloat16) if dtype == BF16_WEIGHTS else model


def param_dtype(model: nn.Module) -> str:
    """The dtype the weights are in ("float32", "bfloat16"), as records name it."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def fastest(rows: list[dict], key: str = "step_time_s_median") -> dict | None:
    """The peer row with the least ``key`` among those that ran (None if none did)."""
    ok = [r for r in rows if "error" not in r and r.get(key)]
    return min(ok, key=lambda r: r[key]) if ok else None


def build_model(impl: str, cfg: dict, *, seed: int = 0, weights: str | None = None) -> nn.Module:
    """A fresh randomly initialised peer model (``impl`` in ``book``/``hf``);
    with ``weights``, the GPT-2 backbone is loaded from an OpenAI/HF
    ``model.safetensors`` file (the classification head stays random)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    torch.manual_seed(seed)
    model = BookGPT(cfg) if impl == "book" else hf_model(cfg)
    if weights is not None:
        load_gpt2_weights(model, weights)
    return model


def classify(impl: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the last token, shape (batch, num_classes)."""
    if impl == "book":
        return model(x)[:, -1, :]
    return model(input_ids=x).logits


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
            load_into_book(model, sd)
        else:
            missing, _ = model.transformer.load_state_dict(sd, strict=False)
            missing = [m for m in missing if not m.endswith(".attn.bias") and not m.endswith("masked_bias")]
            if missing:
                raise KeyError(f"checkpoint lacks {missing[:5]}")


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


def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)


def count(params) -> int:
    return int(sum(p.numel() for p in params))


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


def _timed_record(impl: str, cfg: dict, mode: str, prepare, *, batch: int, seq_len: int, steps: int,
                  warmup: int, threads: int, compile: bool, dtype: str, seed: int, **extra: Any) -> dict:
    """The body shared by :func:`measure_train` and :func:`measure_infer`.

    Builds the model and one fixed random batch ``(x, y)``, then ``prepare(model, x, y)`` puts the
    model in its mode (and dtype: it may cast the weights) and returns ``(run, fields)``: ``run(fwd)``
    does one step through ``fwd`` (the model or its ``torch.compile`` wrapper, made after
    ``prepare``) inside the ``dtype``'s autocast context, and ``fields`` go into the record.
    ``warmup`` untimed steps, then ``steps`` timed ones. With ``compile`` or bfloat16 (either
    kind), a failure to compile or run is returned as ``{"system", "error"}`` (a configuration
    this machine cannot run); a float32 eager failure propagates."""
    _check_shape(cfg, batch, seq_len, steps, warmup)
    torch.set_num_threads(threads)
    system = system_name(impl, compile, dtype)
    reset_peak_rss()
    model = build_model(impl, cfg, seed=seed)
    x, y = _random_batch(cfg, batch, seq_len, seed)
    run, fields = prepare(model, x, y)
    fwd = model

    def step() -> float:
        t0 = time.perf_counter()
        with autocast(dtype):
            run(fwd)
        return time.perf_counter() - t0

    try:
        if compile:
            fwd = torch.compile(model)
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warmup_s = time.perf_counter() - t0
        times = [step() for _ in range(steps)]
    except Exception as exc:  # noqa: BLE001
        if not compile and dtype == "float32":
            raise
        return {"system": system, "error": _short(exc)}

    out = _summary(system, times, warmup_s, batch, seq_len)
    out.update(mode=mode, impl=impl, compile=compile, dtype=dtype, **extra)
    out.update(batch=batch, seq_len=seq_len, threads=threads, **fields)
    out["total_params"] = count(model.parameters())
    if impl == "hf":
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return out


def measure_train(impl: str, cfg: dict, *, trainable: str, batch: int, seq_len: int, steps: int, warmup: int,
                  threads: int, compile: bool = False, dtype: str = "float32", seed: int = 0) -> dict:
    """Steady-state throughput of the book's training step on one fixed random batch: median wall
    time of ``steps`` timed steps after ``warmup`` untimed ones (``warmup_s`` includes
    ``torch.compile``'s compilation). With ``dtype="bfloat16"`` the forward pass and loss run under
    CPU autocast (the backward follows its dtypes; parameters and AdamW stay float32).
    ``peak_rss_mb`` is the process's peak RSS since this call started (Linux). ``bfloat16-weights``
    is refused: it is an inference configuration (nobody trains with AdamW on bfloat16 weights)."""
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"training peers run in one of {TRAIN_DTYPES}, not {dtype!r}"
                         + (" (an inference-only configuration)" if dtype == BF16_WEIGHTS else ""))

    def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        model.train()
        params = apply_freezing(impl, model, trainable)
        opt = optimizer(params)

        def run(fwd: nn.Module) -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(classify(impl, fwd, x).float(), y)
            loss.backward()
            opt.step()

        return run, {"trainable_params": count(params)}

    return _timed_record(impl, cfg, "train", prepare, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
                         threads=threads, compile=compile, dtype=dtype, seed=seed, trainable=trainable)


def measure_infer(impl: str, cfg: dict, *, batch: int, seq_len: int, steps: int, warmup: int, threads: int,
                  compile: bool = False, dtype: str = "float32", seed: int = 0) -> dict:
    """Steady-state classification throughput (eval mode, ``inference_mode``, ``dtype`` autocast, or
    for ``bfloat16-weights`` the model cast to bfloat16 before any torch.compile); the record's
    ``param_dtype`` says what the weights were."""

    def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        cast_weights(model, dtype).eval()

        def run(fwd: nn.Module) -> None:
            with torch.inference_mode():
                classify(impl, fwd, x).argmax(dim=-1)

        return run, {"param_dtype": param_dtype(model)}

    return _timed_record(impl, cfg, "infer", prepare, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
                         threads=threads, compile=compile, dtype=dtype, seed=seed)


def finetune_sms(*args, **kw) -> dict:
    """benchmarks.torch_finetune.finetune_sms (kept here, where callers look for the peers)."""
    from benchmarks.torch_finetune import finetune_sms as run

    return run(*args, **kw)


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
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help=f"bfloat16: CPU autocast; {BF16_WEIGHTS}: the weights cast to bfloat16 (infer only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.mode == "info":
        print(json.dumps(torch_info(), indent=2))
        return 0
    if args.mode == "train" and args.dtype not in TRAIN_DTYPES:
        ap.error(f"--dtype {args.dtype} is for --mode infer only")
    cfg = dict(SIZES[args.size])
    seq_len = args.seq_len if args.seq_len is not None else min(120, cfg["n_ctx"])
    common = dict(batch=args.batch, seq_len=seq_len, steps=args.steps, warmup=args.warmup,
                  threads=args.threads, compile=args.compile, dtype=args.dtype, seed=args.seed)
    if args.mode == "train":
        res = measure_train(args.impl, cfg, trainable=args.trainable, **common)
    else:
        res = measure_infer(args.impl, cfg, **common)
    res["size"] = args.size
    print(json.dumps(res, indent=2))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
