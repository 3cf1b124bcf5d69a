"""Training numerics: freezing, the jitted step, accumulation, determinism, the prefix cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.train import freeze
from jaxcls.train import step as train
from jaxcls.task import SingleLabel
from jaxcls.config import GPT2Config, TrainConfig
from jaxcls.data import DataSplits, TextDataset
from jaxcls.errors import ConfigError, TrainingError
from jaxcls.train import fit
from jaxcls.model import GPT2Classifier, path_str

CFG = GPT2Config(n_vocab=200, n_ctx=32, n_embd=16, n_head=2, n_layer=3)


def model(seed=0, **kw):
    return GPT2Classifier(CFG.replace(**kw), 2, pooling="last_real", rngs=nnx.Rngs(seed))


def toy_splits(n=48, seed=0):
    """Texts of digits whose label is whether the text contains '7': learnable, varied lengths."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = [str(rng.integers(0, 7)) for _ in range(rng.integers(2, 20))]
        if i % 2:
            words[rng.integers(0, len(words))] = "7"
        texts.append(" ".join(words))
        labels.append(i % 2)
    ds = lambda a, b, name: TextDataset(tuple(texts[a:b]), np.array(labels[a:b], np.int32), ("no", "yes"), name)
    return DataSplits(ds(0, n - 16, "train"), ds(n - 16, n - 8, "validation"), ds(n - 8, n, "test"), ("no", "yes"))


def encode(text):
    return [int(w) + 1 for w in text.split()]


def run(cfg: TrainConfig, seed=0, splits=None, **model_kw):
    m = model(seed, **model_kw)
    res = fit(m, encode, splits or toy_splits(), cfg, progress=False, log=lambda s: None)
    return res


def flat(state):
    return {path_str(p): v if isinstance(v, str) else np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("preset,expect", [
    ("head", {"head/bias", "head/kernel"}),
    ("last_block", None),
    ("lora", None),
])
def test_presets_select_the_right_paths(preset, expect):
    m = model(lora_rank=4) if preset == "lora" else model()
    _, tr, fr = freeze.split_trainable(m, freeze.trainable_pattern(preset, CFG.n_layer))
    names = set(flat(tr))
    if expect:
        assert names == expect
    elif preset == "last_block":
        assert all(n.startswith(("h/2/", "ln_f/", "head/")) for n in names)
        assert "h/2/attn/c_attn/kernel" in names and "ln_f/scale" in names and "h/1/ln_1/scale" not in names
    else:
        assert all(n.endswith(("lora_a", "lora_b")) or n.startswith("head/") for n in names)
        assert len([n for n in names if n.endswith("lora_a")]) == 4 * CFG.n_layer
    labels = flat(freeze.optax_labels(nnx.state(m, nnx.Param), freeze.trainable_pattern(preset, CFG.n_layer)))
    assert {k for k, v in labels.items() if v == "train"} == names


def test_bad_trainable_values_are_config_errors():
    with pytest.raises(ConfigError, match="K must be"):
        freeze.trainable_pattern("last_k_blocks:9", 3)
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze.split_trainable(model(), freeze.trainable_pattern("nothing/.*", 3))
    with pytest.raises(ConfigError, match="TrainConfig.pooling"):
        TrainConfig(pooling="max")


def one_step(m, preset, spec=None):
    graphdef, tr, fr = freeze.split_trainable(m, freeze.trainable_pattern(preset, CFG.n_layer))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    step = train.make_train_step(graphdef, tx, spec or train.StepSpec(SingleLabel.with_classes(2)))
    rng = np.random.default_rng(0)
    batch = train.Batch(jnp.asarray(rng.integers(0, 200, (1, 4, 12)), jnp.int32), jnp.full((1, 4), 12, jnp.int32),
                        jnp.asarray([[0, 1, 0, 1]], jnp.int32), jnp.ones((1, 4), jnp.float32))
    return step, (tr, fr, tx.init(tr), batch, jax.random.PRNGKey(0))


def test_frozen_leaves_bit_identical_and_trainable_move():
    m = model()
    step, (tr, fr, opt, batch, key) = one_step(m, "last_block")
    fr_before, tr_before = flat(fr), flat(tr)
    new_tr, _, metrics = step(tr, fr, opt, batch, key)
    assert all(np.array_equal(fr_before[k], v) for k, v in flat(fr).items())
    assert any(not np.array_equal(tr_before[k], v) for k, v in flat(new_tr).items())
    assert np.isfinite(float(metrics["loss"]))


def test_no_backward_pass_through_frozen_blocks():
    """XLA's own FLOP count: training only the last block costs about a forward pass plus the
    last block's backward, far below training everything."""
    def flops(preset):
        step, args = one_step(model(), preset)
        return step.lower(*args).compile().cost_analysis()["flops"]

    f_last, f_all, f_head = flops("last_block"), flops("all"), flops("head")
    assert f_head < f_last < 0.75 * f_all


def test_optax_mask_over_full_tree_equals_the_split():
    m = model()
    pattern = freeze.trainable_pattern("last_block", CFG.n_layer)
    step, (tr, fr, opt, batch, key) = one_step(m, "last_block")
    new_tr, _, _ = step(tr, fr, opt, batch, key)
    # The same freeze, stated as optax labels over the whole parameter tree.
    graphdef, params = nnx.split(model(), nnx.Param)
    labels = freeze.optax_labels(params, pattern)
    tx = freeze.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), labels)
    full_step = train.make_train_step(graphdef, tx, train.StepSpec(SingleLabel.with_classes(2)))
    new_params, _, _ = full_step(params, nnx.State({}), tx.init(params), batch, key)
    full, split_new = flat(new_params), flat(new_tr)
    for k, v in split_new.items():
        np.testing.assert_allclose(full[k], v, rtol=1e-6, atol=1e-7)
    untouched = flat(nnx.state(model(), nnx.Param))
    assert all(np.array_equal(full[k], untouched[k]) for k in full if k not in split_new)


BASE = TrainConfig(epochs=2, batch_size=8, lr=1e-3, eval_freq=3, eval_iter=2, padding="buckets",
                   cache=False, drop_last=True)


def test_gradient_accumulation_equals_the_larger_batch():
    """One SGD step (the update is the gradient itself) on 8 rows, whole or as 2 x 4 micro-batches,
    with uneven filler weights so that a per-micro-batch mean would differ."""
    graphdef, tr, fr = freeze.split_trainable(model(), freeze.trainable_pattern("last_block", 3))
    tx = optax.sgd(1.0)
    step = train.make_train_step(graphdef, tx, train.StepSpec(SingleLabel.with_classes(2, class_weights=(1.0, 2.5))))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 200, (8, 12)), jnp.int32)
    lengths = jnp.asarray(rng.integers(3, 13, 8), jnp.int32)
    labels = jnp.asarray([0, 1, 1, 1, 0, 1, 0, 0], jnp.int32)
    weights = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1], jnp.float32)
    whole = train.Batch(ids[None], lengths[None], labels[None], weights[None])
    split = train.Batch(*(x.reshape(2, 4, *x.shape[1:]) for x in (ids, lengths, labels, weights)))
    key = jax.random.PRNGKey(0)
    a, _, ma = step(jax.tree.map(jnp.copy, tr), fr, tx.init(tr), whole, key)
    b, _, mb = step(jax.tree.map(jnp.copy, tr), fr, tx.init(tr), split, key)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    for k, v in flat(a).items():
        np.testing.assert_allclose(flat(b)[k], v, rtol=1e-5, atol=1e-7)


def test_accumulation_in_the_loop_follows_the_larger_batch():
    big = run(BASE.replace(batch_size=8, accumulation=1))
    acc = run(BASE.replace(batch_size=4, accumulation=2))
    # Same batches in the same order; Adam amplifies summation-order noise to ~1e-5, while a
    # different batch composition moves weights by ~lr = 1e-3 per step.
    moved = max(np.abs(v - flat(nnx.state(model(), nnx.Param))[k]).max() for k, v in flat(big.trainable).items())
    assert moved > 1e-3
    for k, v in flat(big.trainable).items():
        np.testing.assert_allclose(flat(acc.trainable)[k], v, atol=1e-4)


def test_deterministic_for_a_seed():
    a, b = run(BASE), run(BASE)
    assert all(np.array_equal(v, flat(b.trainable)[k]) for k, v in flat(a.trainable).items())
    assert [h.get("train_loss") for h in a.history] == [h.get("train_loss") for h in b.history]


def assert_same_weights(got_state, want_state):
    """Trained weights agree, except the attention key bias: its gradient is exactly zero
    (softmax cancels a shift shared by every score of a query), so Adam turns float noise into
    steps of up to lr there, and it never reaches a logit."""
    got_all = flat(got_state)
    for k, want in flat(want_state).items():
        got = got_all[k]
        if k.endswith("attn/c_attn/bias"):
            n = CFG.n_embd
            got, want = np.delete(got, np.s_[n:2 * n]), np.delete(want, np.s_[n:2 * n])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=k)


def test_prefix_cache_is_exact():
    for preset in ("last_block", "head"):
        cfg = BASE.replace(trainable=preset)
        plain, cached = run(cfg), run(cfg.replace(cache=True))
        assert cached.report["cached_prefix"] and not plain.report["cached_prefix"]
        l1 = [h["train_loss"] for h in plain.history if "train_loss" in h]
        l2 = [h["train_loss"] for h in cached.history if "train_loss" in h]
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        assert_same_weights(cached.trainable, plain.trainable)


def test_loss_falls_and_report_is_complete():
    res = run(BASE.replace(epochs=6, trainable="all", lr=3e-3))
    losses = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert losses[-1] < losses[0]
    rep = res.report
    assert set(rep["splits"]) == {"train", "validation", "test"}
    assert rep["splits"]["train"]["n"] == 32 and rep["trainable_params"] == rep["total_params"]
    assert len(rep["splits"]["test"]["confusion_matrix"]) == 2


def test_label_smoothing_and_class_weights_change_the_loss():
    logits = jnp.array([[2.0, -1.0], [0.5, 0.2]])
    labels = jnp.array([0, 1])
    w = jnp.ones(2)
    plain = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2)))
    smooth = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2, label_smoothing=0.2)))
    weighted = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2, class_weights=(1.0, 3.0))))
    ce = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(plain[0], ce.sum(), rtol=1e-6)
    np.testing.assert_allclose(weighted[0] / weighted[1], (ce[0] + 3 * ce[1]) / 4, rtol=1e-6)
    assert not np.isclose(smooth[0], plain[0])


def test_nan_loss_stops_with_step_and_batch_named():
    cfg = BASE.replace(lr=1e30, trainable="all", epochs=3)
    with pytest.raises(TrainingError, match=r"at step \d+ \(epoch \d+, batch \d+"):
        run(cfg)


def long_toy_splits(n=64, seed=1):
    """Like toy_splits, but lengths 2..56, so 32-token buckets split the data in two groups,
    and the longer texts are mostly positive: length follows the label, as in SMS spam."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        size = int(rng.integers(20, 57) if (y and rng.random() < 0.8) else rng.integers(2, 33))
        words = [str(rng.integers(0, 7)) for _ in range(size)]
        if y:
            words[rng.integers(0, size)] = "7"
        texts.append(" ".join(words))
        labels.append(y)
    ds = lambda a, b, name: TextDataset(tuple(texts[a:b]), np.array(labels[a:b], np.int32), ("no", "yes"), name)
    return DataSplits(ds(0, n - 16, "train"), ds(n - 16, n - 8, "validation"), ds(n - 8, n, "test"), ("no", "yes"))


def test_global_batching_with_the_cache_follows_the_unbucketed_run():
    """Default settings (buckets + cache -> 'global' batching) take the same batches as the book's
    fixed padding without the cache, so losses and weights agree: accuracy cannot drift."""
    splits = long_toy_splits()
    cfg = BASE.replace(epochs=3, trainable="last_block", padding="auto", cache=True)
    fast = run(cfg, splits=splits, n_ctx=64)
    book = run(cfg.replace(padding="longest", cache=False), splits=splits, n_ctx=64)
    assert fast.report["cached_prefix"] and fast.report["batching"] == "global"
    assert book.report["batching"] == "fixed" and book.report["pad_length"] > 32
    assert fast.report["steps"] == book.report["steps"] == 3 * (48 // 8)
    l1 = [h["train_loss"] for h in fast.history if "train_loss" in h]
    l2 = [h["train_loss"] for h in book.history if "train_loss" in h]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert_same_weights(fast.trainable, book.trainable)
    for split in ("validation", "test"):
        assert fast.report["splits"][split]["accuracy"] == book.report["splits"][split]["accuracy"]


def test_bucket_batching_draws_each_batch_from_one_bucket():
    from jaxcls.train.batches import plan_batches, prepare_split

    splits = long_toy_splits()
    seqs = [np.array(encode(t), np.int32) for t in splits.train.texts]
    d = prepare_split("train", seqs, splits.train.labels, mode="buckets", pad_length=None, n_ctx=64, truncated=0)
    assert [g.length for g in d.groups] == [32, 64]
    per_bucket = plan_batches(d, 8, shuffle=True, seed=3, epoch=0, drop_last=True)
    assert all(g is not None and idx.max() < len(d.groups[g].ids) for g, idx in per_bucket)
    mixed = plan_batches(d, 8, shuffle=True, seed=3, epoch=0, drop_last=True, mixed=True)
    assert all(g is None for g, _ in mixed)
    assert sorted(np.concatenate([i for _, i in mixed]).tolist()) == list(range(48))
    assert any(len({d.order[i][0] for i in idx}) == 2 for _, idx in mixed)  # batches cross buckets
    res = run(BASE.replace(trainable="last_block", cache=True, batching="buckets"), splits=splits, n_ctx=64)
    assert res.report["batching"] == "buckets" and res.report["cached_prefix"]


def test_batching_is_validated():
    with pytest.raises(ConfigError, match="batching"):
        TrainConfig(batching="sorted")


def test_cache_budget_message_and_bfloat16_storage():
    cfg = BASE.replace(trainable="last_block", cache=True)
    logs = []
    over = fit(model(0), encode, toy_splits(), cfg.replace(cache_budget_mb=0), progress=False, log=logs.append)
    assert not over.report["cached_prefix"] and over.report["cache_dtype"] is None
    assert any("over the 0 MiB budget" in line and "bfloat16 would halve it" in line for line in logs), logs
    f32, bf16 = run(cfg), run(cfg.replace(cache_dtype="bfloat16"))
    assert f32.report["cache_dtype"] == "float32" and bf16.report["cache_dtype"] == "bfloat16"
    l1 = [h["train_loss"] for h in f32.history if "train_loss" in h]
    l2 = [h["train_loss"] for h in bf16.history if "train_loss" in h]
    np.testing.assert_allclose(l2, l1, rtol=2e-2)
    assert l1 != l2  # the states really were rounded
    with pytest.raises(ConfigError, match="cache_dtype"):
        TrainConfig(cache_dtype="float16")


def test_cache_in_device_memory_builds_the_same_batches_on_the_device():
    from jaxcls.train.batches import make_batch, plan_batches, prepare_split

    splits = long_toy_splits()
    seqs = [np.array(encode(t), np.int32) for t in splits.train.texts]
    host = prepare_split("train", seqs, splits.train.labels, mode="buckets", pad_length=None, n_ctx=64, truncated=0)
    dev = prepare_split("train", seqs, splits.train.labels, mode="buckets", pad_length=None, n_ctx=64, truncated=0)
    rng = np.random.default_rng(0)
    for gh, gd in zip(host.groups, dev.groups):
        gh.features = rng.normal(size=(len(gh.ids), gh.length, 4)).astype(np.float32)
        gd.features = jax.device_put(gh.features)
    for mixed in (True, False):
        for g, idx in plan_batches(host, 8, shuffle=True, seed=0, epoch=0, drop_last=False, mixed=mixed)[:4]:
            a, b = make_batch(host, g, idx, 8, 2, True), make_batch(dev, g, idx, 8, 2, True)
            assert isinstance(b.inputs, jax.Array) and not isinstance(a.inputs, jax.Array)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(np.asarray(y), x)
    cfg = BASE.replace(trainable="last_block", cache=True, padding="auto", epochs=1)
    on_host, on_device = run(cfg, splits=splits, n_ctx=64), run(cfg.replace(cache_memory="device"), splits=splits, n_ctx=64)
    assert (on_host.report["cache_memory"], on_device.report["cache_memory"]) == ("host", "device")
    assert [h.get("train_loss") for h in on_host.history] == [h.get("train_loss") for h in on_device.history]
    assert on_host.report["splits"]["test"]["accuracy"] == on_device.report["splits"]["test"]["accuracy"]


def test_lora_all_and_dropout_never_use_the_cache():
    for cfg, kw in ((BASE.replace(trainable="all", cache=True), {}),
                    (BASE.replace(trainable="lora", cache=True, lora_rank=2), {"lora_rank": 2}),
                    (BASE.replace(trainable="last_block", cache=True), {"dropout": 0.1})):
        res = run(cfg.replace(max_steps=1), **kw)
        assert res.report["cached_prefix"] is False, (cfg.trainable, kw)
    assert run(BASE.replace(trainable="last_block", cache=True, max_steps=1)).report["cached_prefix"] is True


def test_bfloat16_step_keeps_float32_parameters_state_and_loss():
    step, (tr, fr, opt, batch, key) = one_step(model(0, dtype="bfloat16"), "last_block")
    tr2, opt2, metrics = step(tr, fr, opt, batch, key)
    for leaf in jax.tree.leaves((tr2, opt2)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32
    f32_step, (t, f, o, b, k) = one_step(model(0), "last_block")
    np.testing.assert_allclose(metrics["loss"], f32_step(t, f, o, b, k)[2]["loss"], rtol=3e-2)


def test_train_step_donates_parameters_and_optimizer_state():
    step, (tr, fr, opt, batch, key) = one_step(model(0), "last_block")
    before = jax.tree.leaves((tr, opt))
    step(tr, fr, opt, batch, key)
    assert all(x.is_deleted() for x in before if isinstance(x, jax.Array) and x.size > 1)
    assert not any(x.is_deleted() for x in jax.tree.leaves(fr))


def test_bucket_shuffle_is_a_function_of_seed_and_epoch():
    from jaxcls.train.batches import plan_batches, prepare_split

    splits = long_toy_splits()
    seqs = [np.array(encode(t), np.int32) for t in splits.train.texts]
    d = prepare_split("train", seqs, splits.train.labels, mode="buckets", pad_length=None, n_ctx=64, truncated=0)

    def plan(seed, epoch, mixed):
        return [(g, i.tolist()) for g, i in plan_batches(d, 8, shuffle=True, seed=seed, epoch=epoch,
                                                         drop_last=False, mixed=mixed)]

    for mixed in (False, True):
        assert plan(1, 0, mixed) == plan(1, 0, mixed)
        assert plan(1, 0, mixed) != plan(2, 0, mixed) and plan(1, 0, mixed) != plan(1, 1, mixed)
