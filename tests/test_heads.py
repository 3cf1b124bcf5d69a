"""The MLP head of the feature-extraction recipe (--head mlp:HIDDEN): its layers and parameter
paths, dropout in training only, the frozen-prefix cache of its pooled features, every task's
width, saving and loading, the export refusal, and the CLI flags. docs/lora.md has the recipes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.ckpt.folder import META
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import GPT2Config, ModelSpec, TrainConfig
from jaxcls.errors import ConfigError
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.task import SingleLabel, make_task
from jaxcls.train import fit
from jaxcls.train import step as train_step

CFG = GPT2Config(n_vocab=200, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
LABELS = ("ham", "spam")
TEXTS = ["free prize, call now", "see you at six", "URGENT! you won", "ok thanks"]


def mlp_model(hidden=8, rate=0.1, seed=0, classes=2):
    return GPT2Classifier(CFG.replace(head=f"mlp:{hidden}", head_dropout=rate), classes, rngs=nnx.Rngs(seed))


def params(model) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def ids_and_lengths():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (4, 10)), jnp.int32)
    return ids, jnp.asarray([10, 7, 3, 1], jnp.int32)


def test_mlp_head_is_linear_relu_linear_under_head_and_the_linear_head_keeps_its_paths():
    """The MLP head's logits are relu(f W1 + b1) W2 + b2 of the pooled features (NumPy), its
    parameters at head/hidden/* and head/out/*; today's head stays head/kernel, head/bias (old
    folders load). Fails without the ReLU (planted: jax.nn.relu removed in MLPHead.__call__)."""
    model = mlp_model()
    heads = {k: v for k, v in params(model).items() if k.startswith("head/")}
    assert {k: v.shape for k, v in heads.items()} == {
        "head/hidden/kernel": (16, 8), "head/hidden/bias": (8,), "head/out/kernel": (8, 2), "head/out/bias": (2,)}
    ids, lengths = ids_and_lengths()
    f = np.asarray(nnx.jit(lambda m: m.features(ids, lengths))(model), np.float64)
    hidden = np.maximum(f @ heads["head/hidden/kernel"] + heads["head/hidden/bias"], 0)
    assert (hidden == 0).any() and (hidden > 0).any()  # the ReLU cuts something here
    want = hidden @ heads["head/out/kernel"] + heads["head/out/bias"]
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m: m(ids, lengths))(model)), want, rtol=1e-5, atol=1e-6)
    linear = GPT2Classifier(CFG, 2, rngs=nnx.Rngs(0))
    assert sorted(k for k in params(linear) if k.startswith("head/")) == ["head/bias", "head/kernel"]


def test_head_dropout_runs_in_training_only_with_the_steps_key():
    """Without a key (evaluation, prediction) the MLP head is deterministic; the train step's
    forward with a key drops units (the same key, the same mask; another key, another), and rate
    0 with a key changes nothing. Fails if training never drops (planted: head_fn returns
    self.head whatever the key)."""
    model = mlp_model(rate=0.5)
    ids, lengths = ids_and_lengths()
    spec = train_step.StepSpec(SingleLabel(LABELS))
    forward = nnx.jit(lambda m, key: train_step.forward(m, ids, lengths, spec, key))
    plain = np.asarray(forward(model, None))
    np.testing.assert_array_equal(plain, np.asarray(nnx.jit(lambda m: m(ids, lengths))(model)))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a = np.asarray(forward(model, k1))
    assert np.abs(a - plain).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(forward(model, k1)), a)
    assert np.abs(np.asarray(forward(model, k2)) - a).max() > 1e-4
    no_drop = mlp_model(rate=0.0)
    np.testing.assert_array_equal(np.asarray(forward(no_drop, k1)), np.asarray(forward(no_drop, None)))


def toy_splits(n=40):
    from jaxcls.data import DataSplits, TextDataset

    rng = np.random.default_rng(0)
    texts = [" ".join(str(rng.integers(0, 7)) for _ in range(rng.integers(2, 14))) + (" 7" * (i % 2))
             for i in range(n)]
    labels = np.array([i % 2 for i in range(n)], np.int32)
    ds = lambda a, b, name: TextDataset(tuple(texts[a:b]), labels[a:b], ("no", "yes"), name)
    return DataSplits(ds(0, n - 16, "train"), ds(n - 16, n - 8, "validation"), ds(n - 8, n, "test"), ("no", "yes"))


def test_mlp_head_trains_on_cached_pooled_features_exactly():
    """--trainable head with an MLP head (dropout 0.1 on) caches the pooled features once, and the
    cached run's losses and weights equal the uncached run's. Fails if the cached path loses the
    head's dropout (planted: step.forward passes model.head, without the step's key, when the
    batch holds pooled features) or pools other features (planted: ln_f skipped in
    step.frozen_features)."""
    cfg = TrainConfig(trainable="head", epochs=2, batch_size=4, lr=1e-2, eval_freq=1000, eval_iter=1,
                      cache=False)
    runs = {}
    for cache in (False, True):
        logs = []
        runs[cache] = fit(mlp_model(), lambda t: [int(w) + 1 for w in t.split()], toy_splits(),
                          cfg.replace(cache=cache), progress=False, log=logs.append)
        assert runs[cache].report["cached_prefix"] is cache
        assert any("frozen prefix cached (pooled features" in line for line in logs) is cache
    losses = [{s: r["loss"] for s, r in runs[c].report["splits"].items()} for c in (False, True)]
    for split, loss in losses[0].items():
        np.testing.assert_allclose(losses[1][split], loss, rtol=1e-5, err_msg=split)
    got, want = (params(nnx.merge(r.graphdef, r.trainable, r.frozen)) for r in (runs[True], runs[False]))
    init = params(mlp_model())
    for k in ("head/hidden/kernel", "head/out/kernel"):
        assert np.abs(got[k] - init[k]).max() > 1e-3  # trained
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_every_task_sets_the_mlp_heads_width_and_the_folder_reloads_it(tmp_path):
    """The MLP head's output width is the task's head width; classifier.json records the head and
    its dropout, and a saved choice classifier (one score per option, through the shared-prefix
    predictor) reloads with the same logits. Fails if the head's width is not the task's (planted:
    MLPHead's out = nnx.Linear(hidden, 2)) or the head is not recorded (planted: 'head' dropped
    from the config Classifier.save writes; the reload would then refuse head/hidden/*)."""
    for task, labels, width in (("single", ("a", "b", "c"), 3), ("multilabel", ("x", "y"), 2),
                                ("regression", ("score",), 1), ("choice", ("0", "1", "2"), 1)):
        t = make_task(task, labels, num_choices=len(labels) if task == "choice" else None)
        clf = Classifier.from_pretrained("tiny", task=t, weights="random", head="mlp:6", head_dropout=0.2,
                                         trainable="head", tokenizer=TOKENIZER_DIR)
        assert clf.model.head.out.kernel.shape == (6, width), task
    examples = [{"context": "pick one", "choices": ["a b", "c", "d e f"]}] * 2
    want = clf.predictor().logits(examples)
    folder = clf.save(tmp_path / "c")
    config = json.loads((folder / META).read_text())["config"]
    assert (config["head"], config["head_dropout"], config["adapter_size"]) == ("mlp:6", 0.2, 0)
    back = Classifier.load(folder)
    assert back.model.config.head == "mlp:6"
    np.testing.assert_array_equal(back.predictor().logits(examples), want)


def test_a_folder_saved_before_heads_existed_loads_with_a_linear_head(tmp_path):
    """classifier.json written before the head/adapter fields: a linear head, no adapters, same
    logits. Fails if a new field's default is not today's model (planted: GPT2Config.head defaults
    to 'mlp:8': the folder's head/kernel is then refused)."""
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", tokenizer=TOKENIZER_DIR)
    want = clf.predictor().logits(TEXTS)
    folder = clf.save(tmp_path / "old")
    meta = json.loads((folder / META).read_text())
    for key in ("head", "head_dropout", "adapter_size"):
        del meta["config"][key]
    (folder / META).write_text(json.dumps(meta))
    back = Classifier.load(folder)
    assert (back.model.config.head, back.model.config.adapter_size) == ("linear", 0)
    np.testing.assert_array_equal(back.predictor().logits(TEXTS), want)


def test_export_refuses_an_mlp_head(tmp_path):
    """Fails if an MLP head is exported as transformers' one-layer score (planted: the head check
    in ckpt/export.refusal deleted: export then dies on a KeyError for head/kernel)."""
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", head="mlp:4",
                                     tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConfigError, match=r"^cannot export to transformers: the head is an MLP \(mlp:4\); "):
        clf.export_hf(tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()


def test_bad_head_settings_are_named_errors():
    """Fails if a malformed --head, an out-of-range --head-dropout or an MLP head under the book's
    LoRA (which freezes and adapts a linear head) is accepted (planted: the book-style check
    removed from GPT2Config.__post_init__)."""
    for bad in ("mlp", "mlp:0", "mlp:x", "MLP:8", "conv:8"):
        with pytest.raises(ConfigError, match=rf"^ModelSpec.head: {bad!r} is not a head; choose linear or mlp"):
            ModelSpec(head=bad)
    with pytest.raises(ConfigError, match="ModelSpec.head_dropout: must be in"):
        ModelSpec(head_dropout=1.0)
    with pytest.raises(ConfigError, match="with the book's LoRA style"):
        Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", trainable="lora", head="mlp:4",
                                   tokenizer=TOKENIZER_DIR)
    clf = Classifier.from_pretrained("tiny", label_names=LABELS, weights="random", trainable="lora",
                                     lora_style="peft", lora_rank=2, head="mlp:4", tokenizer=TOKENIZER_DIR)
    assert clf.model.head.hidden.kernel.shape == (16, 4)


def test_cli_refuses_a_malformed_head_in_one_line(tmp_path, capsys):
    """Fails if a malformed --head reaches the model or writes the run folder (planted: the
    head_hidden call removed from ModelSpec.__post_init__: GPT2Config refuses it only after the run
    folder is made).
    The flags' success path is tests/test_adapters.py::test_cli_trains_adapters_under_an_mlp_head."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{LABELS[i % 2]}\n"
                                             for i, t in enumerate(TEXTS * 5)), encoding="utf-8")
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(data), "--quiet",
                 "--head", "mlp:-3", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err == "jaxcls: error: ModelSpec.head: 'mlp:-3' is not a head; choose linear or mlp:HIDDEN (e.g. mlp:256)\n"
    assert not (tmp_path / "r2").exists()
