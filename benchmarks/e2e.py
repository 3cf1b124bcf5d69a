"""The book's chapter 6 fine-tuning run end to end through `jaxcls.train.fit`, and the same run's
duration estimated from steady-state step times (for peers that are not run end to end)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.measure import model_config
from benchmarks.system import DEFAULT_SMS, DEFAULT_TOKENIZER, peak_rss_mb, reset_peak_rss

# The book's chapter 6 run: 1045 training texts, batch 8, drop_last -> 130 steps per epoch.
BOOK_TRAIN_EXAMPLES, BOOK_EPOCHS, BOOK_EVAL_FREQ, BOOK_EVAL_ITER = 1045, 5, 50, 5
BOOK_VAL_EXAMPLES, BOOK_TEST_EXAMPLES = 149, 300


def run_e2e(size: str, *, dtype: str = "float32", uncached: bool = False, book_pooling: bool = False,
            seed: int = 123,
            max_steps: int | None = None, data_path: Path = DEFAULT_SMS,
            tokenizer_dir: Path = DEFAULT_TOKENIZER, trainable: str = "last_block") -> dict:
    """The book's default run (5 epochs, batch 8, eval_freq 50, eval_iter 5) from random weights.
    Default: jaxcls's defaults (last_real pooling, length buckets, frozen-prefix cache); with
    `uncached`, the book's literal shape: pooling 'last', padding to the longest text, no cache."""
    from flax import nnx

    from jaxcls.config import TrainConfig
    from jaxcls.data import load_sms_spam
    from jaxcls.train import fit
    from jaxcls.model import GPT2Classifier
    from jaxcls.tokenizer import encode, encoding_from_files

    t0 = time.perf_counter()
    reset_peak_rss()
    tc = TrainConfig(epochs=BOOK_EPOCHS, batch_size=8, eval_freq=BOOK_EVAL_FREQ, eval_iter=BOOK_EVAL_ITER,
                     seed=seed, trainable=trainable, max_steps=max_steps)
    if uncached:  # the same model and pooling without the shortcuts: no prefix cache, no buckets
        tc = tc.replace(cache=False, padding="longest")
    pooling = "last" if book_pooling else "last_real"  # the book's literal last position, or jaxcls's
    splits = load_sms_spam(data_path, seed=123, progress=False)
    enc = encoding_from_files(Path(tokenizer_dir) / "vocab.bpe", Path(tokenizer_dir) / "encoder.json")
    model = GPT2Classifier(model_config(size, dtype), 2, pooling=pooling, rngs=nnx.Rngs(seed))
    result = fit(model, lambda t: encode(enc, t), splits, tc, progress=False, log=lambda s: None)
    total = time.perf_counter() - t0
    rep = result.report
    acc = {k: v.get("accuracy") for k, v in rep["splits"].items()}
    variant = (f"default: prefix cache, length buckets, {rep.get('batching')} batching" if not uncached
               else "uncached, padded to longest")
    return {"system": "jaxcls", "variant": f"{variant}, pooling {pooling}",
            "size": size, "dtype": dtype, "trainable": trainable, "seed": seed,
            "pretrained": False, "epochs": BOOK_EPOCHS, "max_steps": max_steps,
            "steps": rep["steps"], "train_loop_s": rep["wall_time_s"], "total_s": total,
            "cached_prefix": rep["cached_prefix"], "padding": rep["padding"], "batching": rep.get("batching"),
            "pad_length": rep["pad_length"], "accuracy": acc, "test_accuracy": acc.get("test"),
            "peak_rss_mb": peak_rss_mb()}


def book_e2e_estimate(train_step_s: float, infer_batch8_s: float | None,
                      final_infer_batch8_s: float | None = None) -> dict:
    """The book's loop timed from steady-state step times: 130 steps/epoch x 5 epochs, plus the
    evaluation batches it runs (eval_iter train+val batches every eval_freq steps from step 0,
    eval_iter train+val batches per epoch for accuracy, and the final full train/val/test pass).
    The final pass runs at `final_infer_batch8_s` per batch when given (the trained model may be
    cast for it), else at `infer_batch8_s`."""
    steps_per_epoch = BOOK_TRAIN_EXAMPLES // 8
    steps = steps_per_epoch * BOOK_EPOCHS
    periodic = len(range(0, steps, BOOK_EVAL_FREQ)) * 2 * BOOK_EVAL_ITER
    per_epoch = BOOK_EPOCHS * 2 * BOOK_EVAL_ITER
    final = sum(-(-n // 8) for n in (BOOK_TRAIN_EXAMPLES, BOOK_VAL_EXAMPLES, BOOK_TEST_EXAMPLES))
    eval_batches = periodic + per_epoch
    est = {"estimate": True, "steps": steps, "eval_batches": eval_batches, "final_eval_batches": final,
           "train_s": steps * train_step_s}
    if infer_batch8_s is not None:
        est["train_loop_s"] = est["train_s"] + eval_batches * infer_batch8_s
        est["final_eval_s"] = final * (infer_batch8_s if final_infer_batch8_s is None else final_infer_batch8_s)
        est["total_s"] = est["train_loop_s"] + est["final_eval_s"]
    return est



def bf16_weights_variant(system: str) -> str:
    """The inference-only peer with the same model and compile setting as the training peer
    `system`, its weights cast to bfloat16 (torch_peers.system_name's `-bf16-weights` suffix)."""
    return system.removesuffix("-bf16") + "-bf16-weights"


def peer_estimates(peers: dict) -> list[dict]:
    """The book's loop estimated for every peer configuration whose train step and batch-8
    inference both ran; the quickest is marked `fastest`. The evaluations during training run
    the model being trained (its own configuration); the final train/val/test pass runs after
    training, so it takes the quicker of that configuration and the same model with its weights
    cast to bfloat16 (`final_eval_system`), as a user after speed would."""
    i8 = {x["system"]: x["step_time_s_median"] for x in peers.get("infer", [])
          if x.get("batch") == 8 and "step_time_s_median" in x}
    out = []
    for r in peers.get("train", []):
        if "step_time_s_median" not in r or r["system"] not in i8:
            continue
        final = min((s for s in (r["system"], bf16_weights_variant(r["system"])) if s in i8), key=i8.get)
        out.append({"system": r["system"], "final_eval_system": final,
                    **book_e2e_estimate(r["step_time_s_median"], i8[r["system"]], i8[final])})
    if out:
        min(out, key=lambda e: e["total_s"])["fastest"] = True
    return out
