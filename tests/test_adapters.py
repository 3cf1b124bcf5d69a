"""Bottleneck adapters (--trainable adapters --adapter-size N): the model starts as the pretrained
one, only adapters and the head train, delta saves keep them, merging and export are refused; and
the trainable counts of the three recipes at gpt2-small that docs/lora.md quotes."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE, TOKENIZER_DIR
from jaxcls.ckpt.folder import META, WEIGHTS
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import GPT2Config, preset
from jaxcls.errors import ConfigError
from jaxcls.model import Bottleneck, GPT2Classifier, path_str
from jaxcls.train import freeze

LABELS = ("ham", "spam")
TEXTS = ["free prize, call now", "see you at six", "URGENT! you won", "ok thanks", "lunch?"]
CFG = GPT2Config(n_vocab=200, n_ctx=32, n_embd=16, n_head=2, n_layer=2)


def flat(model) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def adapter_paths(n_layer: int) -> set[str]:
    return {f"h/{i}/{m}/c_proj/adapter/{lin}/{leaf}" for i in range(n_layer) for m in ("attn", "mlp")
            for lin in ("down", "up") for leaf in ("kernel", "bias")}


def base_of(adapted: GPT2Classifier) -> GPT2Classifier:
    """The same classifier without adapters, holding the adapted one's other parameters."""
    config = adapted.config.replace(adapter_size=0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT2Classifier(config, 2, rngs=nnx.Rngs(0))))
    params = flat(adapted)
    leaves = [(p, v.replace(jnp.asarray(params[path_str(p)]))) for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def test_adapters_start_exactly_at_the_base_model():
    """Before training, adapted logits equal the base model's (up-projections start at zero), on
    the full pass and on the last block's single-position pass the classifier uses; once an up
    weight moves, they differ (the adapters are in the path). Fails if `up` starts random
    (planted: kernel_init removed in Bottleneck) or the adapter is skipped (planted: Linear returns
    y without self.adapter: the moved-weight check fails)."""
    model = GPT2Classifier(CFG.replace(adapter_size=4), 2, rngs=nnx.Rngs(0))
    base = base_of(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (3, 9)), jnp.int32)
    lengths = jnp.asarray([9, 5, 2], jnp.int32)
    params = flat(model)
    assert not params["h/0/attn/c_proj/adapter/up/kernel"].any()
    assert np.abs(params["h/0/attn/c_proj/adapter/down/kernel"]).max() > 0.1
    logits = nnx.jit(lambda m: m(ids, lengths))
    for pooling in ("last_real", "mean"):
        model.pooling = base.pooling = pooling
        got, want = np.asarray(logits(model)), np.asarray(logits(base))
        assert np.abs(got - want).max() <= 1e-6, pooling
    for m in ("attn", "mlp"):
        up = getattr(model.h[1], m).c_proj.adapter.up.kernel
        up.set_value(jnp.asarray(np.random.default_rng(3).normal(0, 0.5, up.shape), jnp.float32))
        assert np.abs(np.asarray(logits(model)) - want).max() > 1e-3, m
        up.set_value(jnp.zeros(up.shape))


def test_bottleneck_is_h_plus_up_gelu_down_of_h():
    """Adapter(h) = h + up(gelu(down(h))) (Houlsby), GPT-2's tanh GELU, in NumPy. Fails without the
    residual (planted: `h +` removed in Bottleneck.__call__)."""
    ad = Bottleneck(8, 3, config=CFG, rngs=nnx.Rngs(1))
    ad.up.kernel.set_value(jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (3, 8)), jnp.float32))
    h = np.random.default_rng(2).normal(0, 1, (4, 8))
    z = h @ np.asarray(ad.down.kernel[...], np.float64) + np.asarray(ad.down.bias[...])
    gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    want = h + gelu @ np.asarray(ad.up.kernel[...], np.float64) + np.asarray(ad.up.bias[...])
    np.testing.assert_allclose(np.asarray(ad(jnp.asarray(h, jnp.float32))), want, rtol=1e-5, atol=1e-5)


def test_only_adapters_and_the_head_train():
    """The 'adapters' preset selects exactly the adapters' down/up kernels and biases and the head.
    Fails if the head is left frozen (planted: '|head/.*' dropped from the preset's pattern) or a
    base weight trains."""
    abstract = nnx.eval_shape(lambda: GPT2Classifier(CFG.replace(adapter_size=4), 2, rngs=nnx.Rngs(0)))
    _, tr, fr = freeze.split_trainable(abstract, freeze.trainable_pattern("adapters", CFG.n_layer))
    assert {path_str(p) for p, _ in nnx.to_flat_state(tr)} == adapter_paths(2) | {"head/kernel", "head/bias"}
    assert not [p for p, _ in nnx.to_flat_state(fr) if "adapter" in p or p[0] == "head"]


@pytest.mark.parametrize("recipe,want", [
    (dict(trainable="head"), 1_538),  # 768 x 2 + 2
    (dict(trainable="head", head="mlp:256"), 197_378),  # 768 x 256 + 256 + 256 x 2 + 2
    (dict(trainable="all"), 124_441_346),  # GPT-2 small's 124,439,808 and the head
    (dict(trainable="adapters", adapter_size=64), 2_380_802),  # 24 x (768 x 64 + 64 + 64 x 768 + 768), head
])
def test_trainable_counts_of_the_three_recipes_at_gpt2_small(recipe, want):
    """The counts docs/lora.md gives, from shapes only (nnx.eval_shape) through the split training
    uses. Fails if one adapter per block is built (planted: adapter=True dropped from MLP.c_proj:
    1,191,170)."""
    trainable = recipe.pop("trainable")
    cfg = preset("gpt2-small").replace(**recipe)
    abstract = nnx.eval_shape(lambda: GPT2Classifier(cfg, 2, rngs=nnx.Rngs(0)))
    _, tr, _ = freeze.split_trainable(abstract, freeze.trainable_pattern(trainable, cfg.n_layer))
    assert freeze.count_params(tr) == want


def test_merging_and_export_are_refused_with_the_reason(tmp_path, capsys):
    """Adapters cannot be folded into the weights: save(merge_lora=True), export_hf and
    `jaxcls train --merge-lora --trainable adapters` each refuse in one line, writing nothing; fit
    refuses 'adapters' on a model built without them. Fails if export goes ahead (planted: the
    adapter check in ckpt/export.refusal removed: the folder is written)."""
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", trainable="adapters",
                                     adapter_size=4, tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConfigError, match=r"has bottleneck adapters, which cannot be merged into the weights"):
        clf.save(tmp_path / "m", merge_lora=True)
    with pytest.raises(ConfigError, match=r"^cannot export to transformers: the model has bottleneck adapters "
                                          r"\(adapter_size 4\)"):
        clf.export_hf(tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()
    plain = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConfigError, match="trainable='adapters' needs bottleneck adapters"):
        plain.fit((TEXTS, [0, 1, 0, 1, 0]), trainable="adapters")

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{LABELS[i % 2]}\n"
                                             for i, t in enumerate(TEXTS * 4)), encoding="utf-8")
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(data), "--quiet",
                 "--trainable", "adapters", "--merge-lora", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: --merge-lora: bottleneck adapters cannot be folded") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_cli_trains_adapters_under_an_mlp_head_and_saves_only_them(tmp_path):
    """`jaxcls train --checkpoint <pretrained tiny> --trainable adapters --adapter-size 4 --head
    mlp:8 --head-dropout 0.2` (two steps): nothing is cached (every block holds a trainable
    adapter), the delta save holds exactly the adapters (trained: their up-projections left zero)
    and the MLP head, classifier.json records both, and the folder reloads over its base to the
    same logits. Fails if adapters count as checkpoint tensors (planted: the 'adapter' test removed
    from ckpt/names.in_checkpoint: loading the checkpoint then asks it for adapter tensors) or a
    flag does not reach the model (planted: adapter_size left out of from_pretrained's overrides)."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{LABELS[i % 2]}\n"
                                             for i, t in enumerate(TEXTS * 4)), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--checkpoint", str(FIXTURE / "hf"), "--data", str(data), "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--quiet", "--trainable", "adapters",
                 "--adapter-size", "4", "--head", "mlp:8", "--head-dropout", "0.2", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["cached_prefix"] is False
    meta = json.loads((out / META).read_text())
    assert (meta["config"]["adapter_size"], meta["config"]["head"], meta["config"]["head_dropout"]) == (4, "mlp:8", 0.2)
    from safetensors.numpy import load_file

    saved = load_file(str(out / WEIGHTS))
    head = {f"head/{lin}/{leaf}" for lin in ("hidden", "out") for leaf in ("kernel", "bias")}
    assert meta["saved"] == "delta" and set(saved) == adapter_paths(2) | head
    assert all(saved[p].any() for p in saved if "/up/kernel" in p)
    back = Classifier.load(out)
    assert back.model.h[0].mlp.c_proj.adapter.down.kernel.shape == (16, 4)
    params = flat(back.model)
    assert all(np.array_equal(params[p], saved[p]) for p in saved)
