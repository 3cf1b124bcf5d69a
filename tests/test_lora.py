"""LoRA: the book's (appendix E) and PEFT's styles, checked against a NumPy copy of the book's
LoRALayer / LinearWithLoRA, the book's trainable count, merging, and folders saved before the
styles existed. docs/lora.md describes what is checked here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.ckpt.folder import META, WEIGHTS
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import GPT2Config, ModelSpec, preset
from jaxcls.errors import CheckpointError, ConfigError
from jaxcls.model import GPT2Classifier, Linear, path_str
from jaxcls.train import freeze

LABELS = ("ham", "spam")
TEXTS = ["free prize, call now", "see you at six", "URGENT! you won", "ok thanks", "lunch?"]


class BookLoRALayer:
    """The book's LoRALayer in NumPy: A (in, rank), B (rank, out) zero, alpha * (x @ A @ B)."""

    def __init__(self, A, B, alpha):
        self.A, self.B, self.alpha = np.array(A, np.float64), np.array(B, np.float64), alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class BookLinearWithLoRA:
    """The book's LinearWithLoRA: torch.nn.Linear (weight (out, in), bias) plus its LoRALayer."""

    def __init__(self, weight, bias, lora: BookLoRALayer):
        self.weight, self.bias, self.lora = np.array(weight, np.float64), np.array(bias, np.float64), lora

    def forward(self, x):
        return x @ self.weight.T + self.bias + self.lora.forward(x)

    def adamw_step(self, x, target, lr, weight_decay):
        """One step of torch.optim.AdamW (decoupled decay; at step 1 the bias-corrected moments
        are g and g^2) on loss = sum((y - target)^2) / 2, only A and B trainable."""
        g = self.forward(x) - target
        lo = self.lora
        grads = {"A": lo.alpha * x.T @ (g @ lo.B.T), "B": lo.alpha * (x @ lo.A).T @ g}
        for name, grad in grads.items():
            p = getattr(lo, name) * (1 - lr * weight_decay)
            setattr(lo, name, p - lr * grad / (np.sqrt(grad ** 2) + 1e-8))


def lora_config(style="book", rank=4, alpha=3.0, **kw) -> GPT2Config:
    return GPT2Config(n_vocab=64, n_ctx=16, n_embd=16, n_head=2, n_layer=2, lora_rank=rank, lora_alpha=alpha,
                      lora_style=style, **kw)


def randomize_adapters(model, seed=0):
    """B starts at zero; give every B (and A) values so the adapters change the output."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("lora_a", "lora_b"):
            var.set_value(jnp.asarray(rng.normal(0, 0.2, var.get_value().shape), jnp.float32))


def trainable_names(model, style) -> set[str]:
    _, tr, _ = freeze.split_trainable(model, freeze.trainable_pattern("lora", model.config.n_layer, style))
    return {path_str(p) for p, _ in nnx.to_flat_state(tr)}


@pytest.mark.parametrize("style, want", [("book", 2_666_528), ("peft", 591_362)])
def test_trainable_count_at_gpt2_small_rank_16(style, want):
    """The book counts 2,666,528 trainable parameters (appendix E, gpt2-small, rank 16, 2 classes):
    per block q, k, v 3 x (768x16 + 16x768), out_proj 768x16 + 16x768, fc 768x16 + 16x3072,
    proj 3072x16 + 16x768; the head 768x16 + 16x2. PEFT adapts c_attn only (12 x (768x16 +
    16x2304)) and trains the head (768x2 + 2). From shapes only (nnx.eval_shape), through the
    split training uses. Fails if the book's head trains fully again or loses its adapter, or if
    q, k, v share one adapter (planted: LORA_TARGETS['book']['attn.c_attn'] = 1: 2,371,616)."""
    cfg = preset("gpt2-small").replace(lora_rank=16, lora_style=style)
    abstract = nnx.eval_shape(lambda: GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)))
    _, tr, _ = freeze.split_trainable(abstract, freeze.trainable_pattern("lora", cfg.n_layer, style))
    assert freeze.count_params(tr) == want


def test_which_parameters_train_in_each_style():
    """book: every adapter (stacked q/k/v on c_attn, c_proj, c_fc, mlp c_proj, the head), nothing
    else, the head's kernel frozen; peft: c_attn's adapter and the whole head. Fails if the book's
    head kernel trains (planted: trainable_pattern always adds '|head/.*')."""
    book = nnx.eval_shape(lambda: GPT2Classifier(lora_config("book"), 2, rngs=nnx.Rngs(0)))
    want = {f"h/{i}/{m}/{leaf}" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
            for leaf in ("lora_a", "lora_b")} | {"head/lora_a", "head/lora_b"}
    assert trainable_names(book, "book") == want
    assert book.h[0].attn.c_attn.lora_a.shape == (3, 16, 4) and book.h[0].attn.c_attn.lora_b.shape == (3, 4, 16)
    peft = nnx.eval_shape(lambda: GPT2Classifier(lora_config("peft"), 2, rngs=nnx.Rngs(0)))
    assert trainable_names(peft, "peft") == {"h/0/attn/c_attn/lora_a", "h/0/attn/c_attn/lora_b",
                                             "h/1/attn/c_attn/lora_a", "h/1/attn/c_attn/lora_b",
                                             "head/kernel", "head/bias"}
    assert peft.h[0].attn.c_attn.lora_b.shape == (4, 48)


def test_a_is_initialised_as_each_style_says():
    """book: U(+-1/sqrt(rank)) (kaiming_uniform_(a=sqrt(5)) on an (in, rank) tensor); peft:
    U(+-1/sqrt(in)) (the same on nn.Linear(in, rank).weight); B zero. Fails with the old bound
    1/sqrt(in) for the book (planted in lora.lora_bound)."""
    n_in, rank = 256, 4
    for style, bound in (("book", 1 / math.sqrt(rank)), ("peft", 1 / math.sqrt(n_in))):
        lin = Linear(n_in, 48, config=lora_config(style, rank=rank), rngs=nnx.Rngs(1))
        a = np.asarray(lin.lora_a[...])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound, style
        assert 0.5 * bound < 2 * np.abs(a).mean() < 1.5 * bound, style  # uniform: mean |a| = bound / 2
        assert not np.asarray(lin.lora_b[...]).any()


@pytest.mark.parametrize("pairs", [1, 3])
def test_book_linear_matches_the_numpy_reference_forward_and_one_adamw_step(pairs):
    """One adapted linear against the book's LinearWithLoRA in NumPy: the forward pass and the
    A and B after one AdamW step, through jaxcls's trainable split and optax. pairs=3 is c_attn:
    three NumPy linears (W_query, W_key, W_value) side by side, each with its own A and B; the
    query-only and key/value-only column slices the last block reads are checked too. Fails if
    the update is scaled by alpha / rank (planted in lora.lora_scale) or a block reads another
    block's adapter (planted: adapter_update uses a[0] for every block)."""
    n_in, width, rank, alpha = 8, 6, 2, 3.0
    lin = Linear(n_in, pairs * width, config=lora_config(rank=rank, alpha=alpha), rngs=nnx.Rngs(2),
                 lora_pairs=pairs)
    randomize_adapters(lin, seed=pairs)
    kernel, bias = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    a = np.asarray(lin.lora_a[...]).reshape(pairs, n_in, rank)
    b = np.asarray(lin.lora_b[...]).reshape(pairs, rank, width)
    cols = [slice(p * width, (p + 1) * width) for p in range(pairs)]
    ref = [BookLinearWithLoRA(kernel[:, c].T, bias[c], BookLoRALayer(a[p], b[p], alpha)) for p, c in enumerate(cols)]
    rng = np.random.default_rng(5)
    x, target = rng.normal(size=(5, n_in)), rng.normal(size=(5, pairs * width))

    want = np.concatenate([r.forward(x) for r in ref], axis=1)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x, jnp.float32))), want, rtol=1e-5, atol=1e-5)
    if pairs == 3:
        np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x, jnp.float32), slice(width, 3 * width))),
                                   want[:, width:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x, jnp.float32), slice(0, width))),
                                   want[:, :width], rtol=1e-5, atol=1e-5)

    lr, wd = 1e-2, 0.1
    graphdef, tr, fr = freeze.split_trainable(lin, freeze.trainable_pattern("lora", 1, "book"))
    tx = optax.adamw(lr, weight_decay=wd)

    def loss(tr):
        y = nnx.merge(graphdef, tr, fr)(jnp.asarray(x, jnp.float32))
        return 0.5 * jnp.sum((y - jnp.asarray(target, jnp.float32)) ** 2)

    updates, _ = tx.update(jax.grad(loss)(tr), tx.init(tr), tr)
    stepped = nnx.merge(graphdef, optax.apply_updates(tr, updates), fr)
    for p, r in enumerate(ref):
        r.adamw_step(x, target[:, cols[p]], lr, wd)
    got_a = np.asarray(stepped.lora_a[...]).reshape(pairs, n_in, rank)
    got_b = np.asarray(stepped.lora_b[...]).reshape(pairs, rank, width)
    assert not np.allclose(got_a, a)  # the step moved A
    for p, r in enumerate(ref):
        np.testing.assert_allclose(got_a[p], r.lora.A, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_b[p], r.lora.B, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stepped.kernel[...]), kernel)


def test_peft_scales_by_alpha_over_rank():
    """Fails if PEFT's update is scaled by alpha like the book's (planted in lora.lora_scale)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    lin = Linear(8, 6, config=lora_config("peft", rank=4, alpha=2.0), rngs=nnx.Rngs(0))
    randomize_adapters(lin)
    low = (x @ lin.lora_a[...]) @ lin.lora_b[...]
    np.testing.assert_allclose(lin(x) - (x @ lin.kernel[...] + lin.bias[...]), 0.5 * low, rtol=1e-5, atol=1e-6)


def classifier(style: str, **kw) -> Classifier:
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", trainable="lora",
                                     lora_rank=2, lora_alpha=4.0, lora_style=style, tokenizer=TOKENIZER_DIR, **kw)
    randomize_adapters(clf.model)
    return clf


def saved_tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / WEIGHTS))


@pytest.mark.parametrize("style", ["book", "peft"])
def test_merged_save_has_the_same_logits_and_loads_as_a_plain_classifier(tmp_path, style):
    """save(merge_lora=True) writes no adapters and a config without a LoRA rank, and the loaded
    folder gives the adapted model's logits within 1e-5; an unmerged save reloads with its
    adapters (the stacked q/k/v ones too). Fails if a stacked block is merged into the wrong
    columns (planted: adapter_delta's blocks in reverse order) or the scale is left out of the
    merge (planted in merged_lora_params)."""
    clf = classifier(style)
    want = clf.predictor().logits(TEXTS)
    merged = clf.save(tmp_path / "merged", merge_lora=True)
    kernel = np.asarray(clf.model.h[0].attn.c_attn.kernel[...])
    assert np.abs(saved_tensors(merged)["h/0/attn/c_attn/kernel"] - kernel).max() > 1e-2  # the adapters are in it
    meta = json.loads((merged / META).read_text())
    assert meta["config"]["lora_rank"] == 0 and meta["saved"] == "full"
    assert meta["lora_merged"] == {"rank": 2, "alpha": 4.0, "style": style}
    assert not [k for k in saved_tensors(merged) if "lora" in k]
    back = Classifier.load(merged)
    assert not [p for p, _ in nnx.to_flat_state(nnx.state(back.model, nnx.Param)) if "lora" in path_str(p)]
    np.testing.assert_allclose(back.predictor().logits(TEXTS), want, atol=1e-5)

    adapted = Classifier.load(clf.save(tmp_path / "adapted"))
    assert adapted.model.config.lora_style == style
    np.testing.assert_allclose(adapted.predictor().logits(TEXTS), want, atol=1e-6)


def test_merge_without_adapters_is_refused(tmp_path):
    """Fails if merge_lora=True on a classifier without adapters saves silently."""
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConfigError, match="merge_lora=True, but this classifier has no LoRA adapters"):
        clf.save(tmp_path / "x", merge_lora=True)
    assert not (tmp_path / "x").exists()


def test_a_folder_saved_before_lora_style_loads_in_the_old_fused_style(tmp_path):
    """A classifier.json with a LoRA rank and no lora_style was written by the old jaxcls: one
    adapter per block linear (c_attn fused), the head trained, scale alpha. It loads in that
    style with its logits; PEFT's alpha / rank and c_attn-only adapters would be another model.
    Fails if such a folder is read as the new default style (planted: the LEGACY_LORA default in
    folder._read_meta removed: the stacked c_attn adapter's shape no longer matches)."""
    model = GPT2Classifier(preset("tiny").replace(lora_rank=2, lora_alpha=4.0, lora_style="legacy"), 2,
                           rngs=nnx.Rngs(0))
    randomize_adapters(model)
    from jaxcls.tokenizer import tokenizer_from_folder

    old = Classifier(model, tokenizer_from_folder(TOKENIZER_DIR), LABELS, trainable="lora", tokenizer_dir=TOKENIZER_DIR)
    want = old.predictor().logits(TEXTS)
    folder = old.save(tmp_path / "old")
    meta = json.loads((folder / META).read_text())
    del meta["config"]["lora_style"]
    (folder / META).write_text(json.dumps(meta))
    assert sorted(k for k in saved_tensors(folder) if k.endswith("lora_a")) == [
        f"h/{i}/{m}/lora_a" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]

    back = Classifier.load(folder)
    assert back.model.config.lora_style == "legacy"
    np.testing.assert_allclose(back.predictor().logits(TEXTS), want, atol=1e-6)
    np.testing.assert_allclose(Classifier.load(back.save(tmp_path / "m", merge_lora=True)).predictor().logits(TEXTS),
                               want, atol=1e-5)

    meta["config"]["lora_style"] = "fused"
    (folder / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"classifier.json: GPT2Config.lora_style must be one of"):
        Classifier.load(folder)


def test_unknown_style_is_a_named_error():
    """Fails if a style outside book/peft (the load-only legacy one included) is accepted for training."""
    for style in ("fused", "legacy"):
        with pytest.raises(ConfigError, match="ModelSpec.lora_style"):
            ModelSpec(lora_style=style)
        with pytest.raises(ConfigError, match="ModelSpec.lora_style"):
            Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", trainable="lora",
                                       lora_style=style, tokenizer=TOKENIZER_DIR)


def test_cli_merge_lora_writes_a_plain_classifier_and_refuses_a_model_without_lora(tmp_path, capsys):
    """`jaxcls train --trainable lora --merge-lora` (one step) saves a folder with no adapters
    that loads and predicts; --merge-lora with another preset is a one-line error before
    anything trains. Fails if the flag is not passed to save (planted: merge_lora=False in
    cmd_train)."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{LABELS[i % 2]}\n"
                                             for i, t in enumerate(TEXTS * 4)), encoding="utf-8")
    common = ["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(data), "--tokenizer",
              str(TOKENIZER_DIR), "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--quiet"]
    out = tmp_path / "run"
    assert main([*common, "--trainable", "lora", "--lora-rank", "2", "--merge-lora", "--out", str(out)]) == 0
    meta = json.loads((out / META).read_text())
    assert meta["config"]["lora_rank"] == 0 and meta["lora_merged"]["style"] == "book"
    assert not [k for k in saved_tensors(out) if "lora" in k]
    assert Classifier.load(out).predict(["free prize"])[0] in LABELS
    capsys.readouterr()

    assert main([*common, "--trainable", "last_block", "--merge-lora", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: --merge-lora") and err.count("\n") == 1, err
    assert not (tmp_path / "r2").exists()


def test_the_books_lora_rows_use_the_book_style():
    """reproduce_book.py rows 11 and 12 build the book's LoRA with the book's rank and alpha.
    Fails if a row switches to PEFT's style (planted: lora_style='peft' in row 11)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_book.py"
    spec = importlib.util.spec_from_file_location("reproduce_book", path)
    book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(book)
    args = book.parse_args([])
    for row, alpha in ((11, 16.0), (12, 8.0)):
        model, cfg = book.row_config(row, args)
        assert (cfg.trainable, model.lora_style, model.lora_rank, model.lora_alpha) == ("lora", "book", 16, alpha)
