"""jaxcls's train step and predictor, timed on random weights. The train step is the one users
run: `jaxcls.train.prepare_data` and `build_program` (frozen split, prefix cache, optimizer, jit)
on synthetic texts whose encoding is fixed random token ids of one length, padded to exactly that
length, so every batch is batch x seq_len. XLA's cost analysis and dot count come from lowering
that Program's own step."""

from __future__ import annotations

import math
import re
import statistics
import time

import jax
import numpy as np

from benchmarks.flops import forward_flops, train_step_flops
from benchmarks.system import device_memory, peak_rss_mb, reset_peak_rss


def _xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")


def xla_dot_flops(compiled) -> float | None:
    """2 * prod(output) * prod(contracted dims) summed over the `dot` instructions of the
    optimized HLO: XLA's matmul work alone, without the elementwise ops its cost analysis also
    counts. None where the backend lowers dots to library calls (e.g. cuBLAS custom calls) or the
    text is not parseable. Dots inside loops are counted once (the train step's scan runs once
    per micro-batch; benchmarks use one)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    shapes, dots = {}, []
    for line in text.splitlines():
        m = _HLO_DEF.match(line)
        if m:
            shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
            if " dot(" in line:
                dots.append((m.group(1), line))
    total = 0
    for name, line in dots:
        lhs = re.search(r"dot\(%([\w.\-]+)", line)
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if not lhs or not contract or lhs.group(1) not in shapes:
            return None
        k = math.prod(shapes[lhs.group(1)][int(d)] for d in contract.group(1).split(",") if d)
        total += 2 * math.prod(shapes[name]) * k
    return float(total) if dots else None


def _timed_steps(call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return times

def model_config(size: str, dtype: str = "float32"):
    from jaxcls.config import preset

    return preset(size).replace(dtype=dtype)


def synthetic_splits(n: int, seq_len: int, n_vocab: int, seed: int = 0):
    """(DataSplits of `n` texts with random labels, an encode mapping text i to its own fixed
    random ids of exactly `seq_len` tokens, never the pad id)."""
    from jaxcls.data import DataSplits, TextDataset

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(n_vocab - 1, 50256), (n, seq_len))
    names = ("class 0", "class 1")
    train = TextDataset(tuple(str(i) for i in range(n)), rng.integers(0, 2, n), names, "synthetic")
    return DataSplits(train, None, None, names), lambda text: ids[int(text)].tolist()


def train_program(cfg, trainable: str, batch: int, seq_len: int, *, cached_prefix: bool = False,
                  seed: int = 0):
    """-> (Program, LoopState, its training SplitData) for one epoch of one batch, built as fit
    builds it. `cached_prefix`: the frozen prefix's output is cached and the step runs only the
    trainable suffix (fit's default where that is exact); otherwise the cache is off."""
    from flax import nnx

    from jaxcls.config import TrainConfig
    from jaxcls.model import GPT2Classifier
    from jaxcls.train import build_program, prepare_data, task_for

    model = GPT2Classifier(cfg, 2, pooling="last_real", rngs=nnx.Rngs(seed))
    splits, encode = synthetic_splits(batch, seq_len, cfg.n_vocab, seed)
    tc = TrainConfig(trainable=trainable, padding=str(seq_len), batch_size=batch, epochs=1, seed=seed,
                     cache=cached_prefix)
    quiet = lambda s: None  # noqa: E731
    data = prepare_data(model, encode, splits, tc, quiet)
    prog, state = build_program(model, data, task_for(splits, tc), tc, quiet)
    if cached_prefix and not prog.cached:
        raise ValueError(f"trainable={trainable!r} has no frozen prefix to cache")
    return prog, state, data.splits["train"]


def compile_train_step(cfg, trainable: str, batch: int, seq_len: int, *, cached_prefix: bool = False,
                       seed: int = 0):
    """(Program, LoopState, training split, compile seconds, XLA's flop counts) of the Program's
    train step lowered on its first planned batch."""
    from jaxcls.train.batches import make_batch

    prog, state, split = train_program(cfg, trainable, batch, seq_len, cached_prefix=cached_prefix, seed=seed)
    group, idx = prog.plan(split, 0)[0]
    b = make_batch(split, group, idx, prog.rows, prog.cfg.accumulation, prog.cached)
    t0 = time.perf_counter()
    compiled = prog.train_step.lower(state.trainable, prog.operands, state.opt_state, b,
                                     jax.random.PRNGKey(seed)).compile()
    return prog, state, split, time.perf_counter() - t0, {"total": _xla_flops(compiled),
                                                         "dots": xla_dot_flops(compiled)}


def measure_train(cfg, *, trainable: str = "last_block", batch: int = 8, seq_len: int = 120,
                  steps: int = 10, warmup: int = 2, cached_prefix: bool = False, seed: int = 0,
                  peak_flops: float | None = None) -> dict:
    """Compile time (lower + compile), first-call time, and the median of `steps` steady-state
    calls of `Program.step` on one planned batch after `warmup`, each timed with
    block_until_ready before the clock is read. A step includes what fit's step does besides
    the jitted call: gathering the batch's rows on the host and copying them to the device."""
    if trainable == "lora" and not cfg.lora_rank:
        cfg = cfg.replace(lora_rank=16)
    reset_peak_rss()
    prog, state, split, compile_s, xla_flops = compile_train_step(
        cfg, trainable, batch, seq_len, cached_prefix=cached_prefix, seed=seed)
    group, idx = prog.plan(split, 0)[0]
    key = jax.random.PRNGKey(seed)

    def one():
        metrics = prog.step(state, split, group, idx, key)
        return state.trainable, metrics

    first_s = _timed_steps(one, 1)[0]
    _timed_steps(one, warmup)
    times = _timed_steps(one, steps)
    med = statistics.median(times)
    flops = train_step_flops(cfg, batch, seq_len, trainable, cached_prefix=cached_prefix)
    out = {
        "system": "jaxcls (cached prefix)" if cached_prefix else "jaxcls",
        "mode": "train", "trainable": trainable, "batch": batch, "seq_len": seq_len,
        "dtype": cfg.dtype, "cached_prefix": cached_prefix,
        "compile_s": compile_s, "first_step_s": first_s,
        "step_time_s_median": med, "step_times_s": times,
        "examples_per_s": batch / med, "tokens_per_s": batch * seq_len / med,
        "flops_per_step": flops, "xla_flops_per_step": xla_flops["total"],
        "xla_dot_flops_per_step": xla_flops["dots"],
        "achieved_flops_per_s": flops / med,
        "peak_rss_mb": peak_rss_mb(), "device_memory": device_memory(),
    }
    if peak_flops:
        out["mfu"] = out["achieved_flops_per_s"] / peak_flops
    return out


def measure_infer(cfg, *, batch: int, seq_len: int = 120, steps: int = 5, warmup: int = 1,
                  seed: int = 0, peak_flops: float | None = None) -> dict:
    """The predictor's jitted step (`predict_step`, on the state `precision.inference_state` prepares)
    at one batch size."""
    from flax import nnx

    from jaxcls.infer.predictor import predict_step
    from jaxcls.model import GPT2Classifier
    from jaxcls.precision import inference_state

    reset_peak_rss()
    graphdef, state = inference_state(GPT2Classifier(cfg, 2, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(cfg.n_vocab - 1, 50256), (batch, seq_len), dtype=np.int32)
    lengths = np.full(batch, seq_len, np.int32)
    args = jax.device_put((state, ids, lengths), jax.devices()[0])
    t0 = time.perf_counter()
    compiled = predict_step.lower(graphdef, *args).compile()
    compile_s = time.perf_counter() - t0
    call = lambda: compiled(*args)  # noqa: E731
    first_s = _timed_steps(call, 1)[0]
    _timed_steps(call, warmup)
    times = _timed_steps(call, steps)
    med = statistics.median(times)
    flops = forward_flops(cfg, batch, seq_len)
    out = {"system": "jaxcls", "mode": "infer", "batch": batch, "seq_len": seq_len, "dtype": cfg.dtype,
           "compile_s": compile_s, "first_step_s": first_s, "step_time_s_median": med,
           "step_times_s": times, "examples_per_s": batch / med, "tokens_per_s": batch * seq_len / med,
           "flops_per_step": flops, "xla_flops_per_step": _xla_flops(compiled),
           "xla_dot_flops_per_step": xla_dot_flops(compiled),
           "achieved_flops_per_s": flops / med, "peak_rss_mb": peak_rss_mb(),
           "device_memory": device_memory()}
    if peak_flops:
        out["mfu"] = out["achieved_flops_per_s"] / peak_flops
    return out

