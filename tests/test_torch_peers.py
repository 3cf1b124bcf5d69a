"""Smoke tests for the PyTorch benchmark peers (skipped where torch is absent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_peers as tp  # noqa: E402

TINY = tp.SIZES["tiny"]
TIMING_KEYS = {"system", "examples_per_s", "tokens_per_s", "step_time_s_median", "step_times_s", "warmup_s", "peak_rss_mb", "total_params"}


def _check_timing(res: dict, steps: int) -> None:
    assert "error" not in res, res
    assert TIMING_KEYS <= res.keys()
    assert len(res["step_times_s"]) == steps
    assert all(t > 0 for t in res["step_times_s"])
    assert res["examples_per_s"] > 0 and res["tokens_per_s"] > 0
    assert res["total_params"] > 0
    json.dumps(res)  # plain, serialisable


def test_torch_info_is_json():
    info = tp.torch_info()
    assert info["torch_version"] == torch.__version__
    json.dumps(info)


@pytest.mark.parametrize("impl,system", [("book", "pytorch-book-eager"), ("hf", "hf-transformers")])
def test_measure_train_tiny(impl, system):
    if impl == "hf":
        pytest.importorskip("transformers")
    res = tp.measure_train(impl, TINY, trainable="last_block", batch=2, seq_len=16, steps=2, warmup=1, threads=1)
    _check_timing(res, 2)
    assert res["system"] == system
    assert 0 < res["trainable_params"] < res["total_params"]


@pytest.mark.parametrize("impl", ["book", "hf"])
def test_measure_infer_tiny(impl):
    if impl == "hf":
        pytest.importorskip("transformers")
    res = tp.measure_infer(impl, TINY, batch=2, seq_len=16, steps=2, warmup=1, threads=1)
    _check_timing(res, 2)


def test_freezing_presets_book():
    model = tp.BookGPT(TINY)
    counts = {t: sum(p.numel() for p in tp.apply_freezing("book", model, t)) for t in tp.TRAINABLE_PRESETS}
    emb = TINY["n_embd"]
    assert counts["head"] == emb * 2 + 2
    assert counts["head"] < counts["last_block"] < counts["all"]
    assert counts["all"] == sum(p.numel() for p in model.parameters())


def test_book_matches_hf_with_shared_weights(tmp_path):
    """Loading the same GPT-2 backbone into both peers gives the same logits."""
    pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    hf = tp.build_model("hf", TINY, seed=1).eval()
    state = {k: v.contiguous() for k, v in hf.transformer.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(path))
    book = tp.build_model("book", TINY, seed=2, weights=str(path)).eval()
    with torch.no_grad():
        book.out_head.weight.copy_(hf.score.weight)
        book.out_head.bias.zero_()
        x = torch.randint(0, 50000, (2, 12))
        a = tp.classify("book", book, x)
        b = tp.classify("hf", hf, x)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # the loader also fills a fresh HF model with the same backbone
    hf2 = tp.build_model("hf", TINY, seed=3, weights=str(path)).eval()
    with torch.no_grad():
        hf2.score.weight.copy_(hf.score.weight)
        c = tp.classify("hf", hf2, x)
    np.testing.assert_allclose(c.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_finetune_sms_tiny_runs():
    rng = np.random.default_rng(0)

    def split(n):
        return rng.integers(0, 50256, (n, 12)), rng.integers(0, 2, n)

    (tx, ty), (vx, vy), (sx, sy) = split(20), split(6), split(6)
    res = tp.finetune_sms(
        "book", TINY, train_ids=tx, train_labels=ty, val_ids=vx, val_labels=vy, test_ids=sx, test_labels=sy,
        epochs=1, batch=4, trainable="last_block", eval_freq=2, eval_iter=1, threads=1,
    )
    assert res["train_steps"] == 5 and res["examples_seen"] == 20
    assert res["history"]["step"] == [0, 2, 4]
    for key, n in (("train_accuracy", 20), ("val_accuracy", 6), ("test_accuracy", 6)):
        assert 0.0 <= res[key] <= 1.0 and res[key] * n == pytest.approx(round(res[key] * n))  # k of n right
    json.dumps(res)


def test_peers_share_the_rss_helpers_and_import_without_jax():
    """torch_peers measures peak RSS with benchmarks.system's helpers, not a copy, and importing
    it loads no jax. Fails if torch_peers keeps its own copy (planted: a local `def peak_rss_mb`
    in torch_peers) or if system.py imports jax at module level (planted: `import jax` there)."""
    from benchmarks import system

    assert tp.peak_rss_mb is system.peak_rss_mb and tp.reset_peak_rss is system.reset_peak_rss
    code = "import sys, benchmarks.torch_peers; assert 'jax' not in sys.modules, 'jax imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def _logits(impl: str, model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's class logits: the book reads the last position (rows unpadded), transformers the
    last real token of right-padded rows under their attention mask."""
    if impl == "book":
        return model(x)[:, -1, :]
    return model(input_ids=x, attention_mask=mask).logits


@pytest.mark.parametrize("impl", ["book", "hf"])
def test_bf16_weights_inference_runs_in_bfloat16_close_to_float32(impl):
    """The inference-only peer dtype: `cast_weights` puts every parameter and floating buffer in
    bfloat16 (the book's causal-mask buffer included) and the model then runs without autocast, its
    causal mask and (transformers) attention mask working in pure bfloat16: bfloat16 logits within
    3% of the logit scale of the float32 model's (bfloat16 keeps 8 bits of mantissa: ~0.5-1% here).
    measure_infer records the cast. Fails if the cast does nothing (planted: `cast_weights`
    returning `model` for every dtype: float32 logits, param_dtype float32) or is coarser than
    bfloat16 (planted: `model.to(torch.float8_e5m2).to(torch.bfloat16)` in cast_weights: ~10% off)."""
    if impl == "hf":
        pytest.importorskip("transformers")
    model = tp.build_model(impl, TINY, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tp.PAD_ID, (3, 12), generator=g)
    mask = torch.ones_like(x)
    if impl == "hf":  # right padding: rows of 12, 7 and 3 real tokens
        for row, n in ((1, 7), (2, 3)):
            x[row, n:], mask[row, n:] = tp.PAD_ID, 0
    with torch.inference_mode():
        want = _logits(impl, model, x, mask).numpy()
        assert tp.cast_weights(model, "float32") is model and next(model.parameters()).dtype == torch.float32
        tp.cast_weights(model, "bfloat16-weights")
        floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        assert floating and {t.dtype for t in floating} == {torch.bfloat16}
        with tp.autocast("bfloat16-weights"):
            got = _logits(impl, model, x, mask)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), want, rtol=0, atol=0.03 * np.abs(want).max())
    res = tp.measure_infer(impl, TINY, batch=2, seq_len=16, steps=2, warmup=1, threads=1, dtype="bfloat16-weights")
    _check_timing(res, 2)
    assert (res["dtype"], res["param_dtype"]) == ("bfloat16-weights", "bfloat16")
    assert res["system"] == tp.system_name(impl, dtype="bfloat16-weights") and res["system"].endswith("-bf16-weights")


def test_measure_train_refuses_bf16_weights():
    """Training with bfloat16 weights is not a configuration anyone picks: measure_train and the
    module's CLI refuse it by name, before building anything. Fails if the refusal is dropped
    (planted: the `if dtype not in TRAIN_DTYPES` check removed from measure_train: it trains a
    float32 model under the bfloat16-weights name)."""
    for impl in ("book", "hf"):
        with pytest.raises(ValueError, match="inference-only"):
            tp.measure_train(impl, TINY, trainable="last_block", batch=2, seq_len=8, steps=1, warmup=0, threads=1,
                             dtype="bfloat16-weights")
    with pytest.raises(SystemExit) as e:
        tp.main(["--mode", "train", "--dtype", "bfloat16-weights"])
    assert e.value.code == 2
