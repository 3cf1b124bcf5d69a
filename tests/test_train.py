"""Training numerics: freezing, the jitted step, accumulation, determinism, the prefix cache."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.classifier import Classifier
from jaxcls.task import SingleLabel, class_weights
from jaxcls.train import freeze
from jaxcls.train import state as trainstate
from jaxcls.train import step as train
from jaxcls.config import GPT2Config, ModelSpec, TrainConfig
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


def run(cfg: TrainConfig, seed=0, splits=None, *, on_step=None, log=None, out=None, **model_kw):
    m = model(seed, **model_kw)
    return fit(m, encode, splits or toy_splits(), cfg, progress=False, log=log or (lambda s: None),
               on_step=on_step, out=out)


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
        # the book's style: adapters on the four linears of every block and on the frozen head
        assert all(n.endswith(("lora_a", "lora_b")) for n in names) and "head/kernel" not in names
        assert len([n for n in names if n.endswith("lora_a")]) == 4 * CFG.n_layer + 1
    labels = flat(freeze.optax_labels(nnx.state(m, nnx.Param), freeze.trainable_pattern(preset, CFG.n_layer)))
    assert {k for k, v in labels.items() if v == "train"} == names


def test_bad_trainable_values_are_config_errors():
    with pytest.raises(ConfigError, match="K must be"):
        freeze.trainable_pattern("last_k_blocks:9", 3)
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze.split_trainable(model(), freeze.trainable_pattern("nothing/.*", 3))
    with pytest.raises(ConfigError, match="ModelSpec.pooling"):
        ModelSpec(pooling="max")


def one_step(m, preset, spec=None):
    graphdef, tr, fr = freeze.split_trainable(m, freeze.trainable_pattern(preset, CFG.n_layer))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    step = train.make_train_step(graphdef, tx, spec or train.StepSpec(SingleLabel.with_classes(2)))
    rng = np.random.default_rng(0)
    batch = train.Batch(jnp.asarray(rng.integers(0, 200, (1, 4, 12)), jnp.int32), jnp.full((1, 4), 12, jnp.int32),
                        jnp.asarray([[0, 1, 0, 1]], jnp.int32), jnp.ones((1, 4), jnp.float32))
    return step, (tr, fr, tx.init(tr), batch, jax.random.PRNGKey(0))


@pytest.mark.parametrize("preset", ["last_block", "lora"])
def test_classifier_fit_leaves_frozen_weights_bit_identical_and_moves_the_trained_ones(preset):
    """Through the path users run (Classifier.fit -> fit, prefix cache on where it applies): every
    parameter outside the preset's own paths is bit-identical afterwards, every one inside moved.
    The expected paths are spelled out here, not taken from freeze.py.
    Fails if frozen weights decay (planted: self.frozen = jax.tree.map(lambda p: p * 0.999,
    self.frozen) after each step in Program.step) or the preset widens (planted: last_k_blocks
    starts one block earlier)."""
    clf = Classifier.from_pretrained("tiny", label_names=("no", "yes"), trainable=preset, weights="random",
                                     lora_rank=2, tokenizer=TOKENIZER_DIR, seed=0)
    before = flat(nnx.state(clf.model, nnx.Param))
    splits = toy_splits()
    report = clf.fit(splits, epochs=1, batch_size=8, lr=1e-2, eval_freq=100, max_steps=2, log=lambda s: None)
    assert report["cached_prefix"] is (preset == "last_block")  # LoRA never caches: every block trains
    after = flat(nnx.state(clf.model, nnx.Param))
    assert after.keys() == before.keys()
    trains = (lambda k: k.startswith(("h/1/", "ln_f/", "head/"))) if preset == "last_block" else \
        (lambda k: k.endswith(("lora_a", "lora_b")))  # the book's style: the head is frozen and adapted
    trained = sorted(k for k in before if trains(k))
    assert trained and len(trained) < len(before)
    for k in before:
        if trains(k):
            assert not np.array_equal(after[k], before[k]), f"{k} did not move"
        else:
            assert np.array_equal(after[k], before[k]), f"frozen {k} changed"


def test_no_backward_pass_through_frozen_blocks():
    """The compiled last_block step's matmuls, counted from XLA's optimized HLO, are exactly the
    analytical count of a forward pass through all three blocks plus the backward pass of the last
    block and the head (tests/test_benchmark.py checks that model), up to the pooled row's two
    attention products XLA may turn into multiply-reduce. Back-propagating through the two frozen
    blocks would add about one forward pass of each (+40% here).
    Fails if the step differentiates the frozen tree too (planted: value_and_grad over (trainable,
    frozen), the frozen gradients masked by a zero factor before joining the update)."""
    from benchmarks.flops import train_step_flops
    from benchmarks.measure import xla_dot_flops

    step, args = one_step(model(), "last_block")
    dots = xla_dot_flops(step.lower(*args).compile())
    batch, seq = args[3].inputs.shape[1:]
    ours = train_step_flops(CFG, batch, seq, "last_block")
    assert ours - dots in (0, 2 * (2 * batch * seq * CFG.n_embd)), (dots, ours)


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
    res = run(BASE.replace(epochs=6, trainable="all", lr=3e-3, cache=True))
    assert res.report["cached_prefix"] is False  # 'all' has no frozen prefix to cache
    losses = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert losses[-1] < losses[0]
    rep = res.report
    assert set(rep["splits"]) == {"train", "validation", "test"}
    assert rep["splits"]["train"]["n"] == 32 and rep["trainable_params"] == rep["total_params"]
    assert len(rep["splits"]["test"]["confusion_matrix"]) == 2


def test_label_smoothing_and_class_weights_change_the_loss():
    """Each term by hand: plain cross-entropy, weights normalised by their sum, smoothing toward
    the uniform distribution, (1 - a) one-hot + a / K (planted: smoothing applied as a / (K - 1)
    off the true class: a different loss)."""
    logits = jnp.array([[2.0, -1.0], [0.5, 0.2]])
    labels = jnp.array([0, 1])
    w = jnp.ones(2)
    plain = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2)))
    smooth = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2, label_smoothing=0.2)))
    weighted = train.loss_terms(logits, labels, w, train.StepSpec(SingleLabel.with_classes(2, class_weights=(1.0, 3.0))))
    ce = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    np.testing.assert_allclose(plain[0], ce.sum(), rtol=1e-6)
    np.testing.assert_allclose(weighted[0] / weighted[1], (ce[0] + 3 * ce[1]) / 4, rtol=1e-6)
    smoothed = jax.nn.one_hot(labels, 2) * 0.8 + 0.2 / 2  # (1 - a) one-hot + a / K
    np.testing.assert_allclose(smooth[0], -(smoothed * jax.nn.log_softmax(logits)).sum(), rtol=1e-6)


def test_label_smoothing_reaches_the_task_fit_trains():
    """`--label-smoothing` (TrainConfig.label_smoothing) is the smoothing of the loss fit trains
    (planted: `label_smoothing=0.0` in task_for)."""
    from jaxcls.train.loop import task_for

    assert task_for(toy_splits(), BASE.replace(label_smoothing=0.3)).label_smoothing == 0.3


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
    fixed padding without the cache, so losses and weights agree: accuracy cannot drift. The steps
    fit reports (on_step) mix lengths, each padded to its longest text's bucket.
    Fails if fit draws bucket batches under 'global' (planted: mixed = False in train/program.py)."""
    splits = long_toy_splits()
    cfg = BASE.replace(epochs=3, trainable="last_block", padding="auto", cache=True)
    steps = []
    fast = run(cfg, splits=splits, n_ctx=64, on_step=steps.append)
    sizes = np.array([len(encode(t)) for t in splits.train.texts])
    assert all(s["group"] is None for s in steps)
    assert all(s["length"] == (32 if sizes[s["indices"]].max() <= 32 else 64) for s in steps)
    assert any(sizes[s["indices"]].min() <= 32 < sizes[s["indices"]].max() for s in steps)  # mixed lengths
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
    """The planner, and the steps fit ran (on_step), not the config echoed in the report.
    Fails if fit shuffles globally whatever --batching says (planted: mixed = True in train/program.py)."""
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
    steps = []
    res = run(BASE.replace(trainable="last_block", cache=True, batching="buckets"), splits=splits, n_ctx=64,
              on_step=steps.append)
    assert res.report["batching"] == "buckets" and res.report["cached_prefix"]
    # what ran: every batch from one bucket, at that bucket's length, and both buckets used
    assert len(steps) == res.report["steps"] and {s["group"] for s in steps} == {0, 1}
    for s in steps:
        group = d.groups[s["group"]]
        assert s["length"] == group.length and 1 <= len(s["indices"]) <= 8
        real = group.lengths[s["indices"]]
        assert real.max() <= group.length and (s["group"] == 0 or real.min() > d.groups[0].length)


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


def test_dropout_never_uses_the_cache():
    """Dropout makes the frozen prefix random, so it is never cached. (LoRA and 'all' never cache
    either: checked in the fits that run them, test_classifier_fit_... and test_loss_falls_....)"""
    res = run(BASE.replace(trainable="last_block", cache=True, max_steps=1), dropout=0.1)
    assert res.report["cached_prefix"] is False


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


def one_sided_splits():
    """toy_splits with every training label 'no' and every validation label 'yes': each epoch
    pushes the model further towards 'no', so validation loss rises and the first epoch is the best."""
    s = toy_splits()
    train_ = TextDataset(s.train.texts, np.zeros(len(s.train.texts), np.int32), s.label_names, "train")
    val = TextDataset(s.validation.texts, np.ones(len(s.validation.texts), np.int32), s.label_names, "validation")
    return DataSplits(train_, val, s.test, s.label_names)


def test_keep_best_returns_the_best_validation_epoch(tmp_path):
    """--keep-best: the weights fit returns (and reports on) are those of the epoch with the lowest
    validation loss, here the first of three, equal to a one-epoch run's and unlike the last
    epoch's (the resumable state saved at the end); the log line names that epoch.
    Fails if the best epoch is saved but not restored (planted: drop
    `trainable = run.load_best()` in train/loop.py)."""
    cfg = BASE.replace(trainable="head", cache=True, epochs=3, lr=1e-2, eval_freq=100)
    logs = []
    kept = run(cfg.replace(keep_best=True), splits=one_sided_splits(), out=tmp_path, log=logs.append)
    val = [h["val_loss_full"] for h in kept.history if "val_loss_full" in h]
    assert len(val) == 3 and val[0] < val[1] < val[2]
    assert f"keeping epoch 1 (lowest validation loss {val[0]:.4f})" in logs
    np.testing.assert_allclose(kept.report["splits"]["validation"]["loss"], val[0], rtol=1e-5)
    one_epoch = run(cfg.replace(epochs=1), splits=one_sided_splits())
    for k, v in flat(one_epoch.trainable).items():
        np.testing.assert_array_equal(flat(kept.trainable)[k], v, err_msg=k)
    store = trainstate.StateStore(tmp_path / "state")  # the last epoch's save
    last = jax.tree.leaves(store.load(store.latest(), {"trainable": kept.trainable})["trainable"])
    store.close()
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(last, jax.tree.leaves(kept.trainable)))


def warmup_cosine(lr, warmup, total):
    """The documented schedule: 0 -> lr linearly over `warmup` steps, then cosine to 0 at `total`."""
    def at(count):
        count = np.asarray(count, np.float64)
        rise = lr * count / max(warmup, 1)
        fall = lr * 0.5 * (1 + np.cos(np.pi * np.clip((count - warmup) / (total - warmup), 0, 1)))
        return np.where(count < warmup, rise, fall)
    return at


def test_learning_rate_formula():
    cfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=3)
    sched, want = train.learning_rate(cfg, 10), warmup_cosine(1e-3, 3, 10)
    np.testing.assert_allclose([float(sched(i)) for i in range(12)], [float(want(i)) for i in range(12)],
                               rtol=1e-5, atol=1e-10)
    warm = train.learning_rate(cfg.replace(schedule="constant"), 10)
    np.testing.assert_allclose([float(warm(i)) for i in range(6)], [0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3],
                               rtol=1e-5)
    assert train.learning_rate(TrainConfig(lr=1e-3), 10) == 1e-3


def imbalanced_splits():
    """toy_splits with half the positive training texts dropped: 16 negatives, 8 positives."""
    s = toy_splits()
    keep = np.flatnonzero((s.train.labels == 0) | (np.arange(len(s.train.labels)) % 4 == 1))
    tr = TextDataset(tuple(s.train.texts[i] for i in keep), s.train.labels[keep], s.label_names, "train")
    return DataSplits(tr, s.validation, s.test, s.label_names)


HEAD_CFG = BASE.replace(trainable="head", cache=True, padding="longest", epochs=3, lr=5e-2, eval_freq=100,
                        schedule="cosine", warmup_steps=3, clip_norm=0.05, class_weights="balanced")


@pytest.fixture(scope="module")
def head_run():
    """One fit of the head alone (cached pooled features) with a cosine schedule, warmup, clipping
    and balanced class weights, and what a by-hand replay of its steps needs: the batches it ran,
    the head before training, and the pooled features."""
    splits, m = imbalanced_splits(), model(0)
    head0 = {"kernel": np.array(m.head.kernel[...]), "bias": np.array(m.head.bias[...])}  # fit donates them
    steps = []
    res = fit(m, encode, splits, HEAD_CFG, progress=False, log=lambda s: None, on_step=steps.append)
    seqs = [encode(t) for t in splits.train.texts]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, t in enumerate(seqs):
        ids[i, :len(t)] = t
    lengths = np.array([len(t) for t in seqs], np.int32)
    m = nnx.merge(res.graphdef, res.trainable, res.frozen)  # the frozen part is the one it started from
    spec = train.StepSpec(SingleLabel.with_classes(2), pooled=True)
    feats = train.frozen_features(m, jnp.asarray(ids), jnp.asarray(lengths), spec)
    return SimpleNamespace(res=res, steps=steps, head0=head0, feats=np.asarray(feats), labels=splits.train.labels)


def replay(run_, *, lr_at, clip, weights):
    """The head's AdamW steps over fit's own batches, written out: per-example cross-entropy
    weighted by class, gradient clipped to global norm `clip` by hand, learning rate lr_at(count)."""
    feats, y = jnp.asarray(run_.feats), jnp.asarray(run_.labels)
    w = jnp.asarray(weights, jnp.float32)

    def loss(p, idx):
        logits = feats[idx] @ p["kernel"] + p["bias"]
        ce = -jax.nn.log_softmax(logits)[jnp.arange(len(idx)), y[idx]]
        return jnp.sum(w[y[idx]] * ce) / jnp.sum(w[y[idx]])

    tx = optax.adamw(lambda c: lr_at(c), weight_decay=HEAD_CFG.weight_decay)
    p, norms = {k: jnp.asarray(v) for k, v in run_.head0.items()}, []
    state = tx.init(p)
    for s in run_.steps:
        g = jax.grad(loss)(p, jnp.asarray(s["indices"]))
        norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
        norms.append(norm)
        if clip and norm > clip:
            g = jax.tree.map(lambda x: x * (clip / norm), g)
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(v) for k, v in p.items()}, norms


def replay_gap(run_, **changes):
    """Largest difference between fit's head and the replay with `changes` to the documented recipe."""
    total = run_.res.report["steps"]
    counts = np.bincount(run_.labels)
    recipe = {"lr_at": lambda c: jnp.asarray(warmup_cosine(HEAD_CFG.lr, HEAD_CFG.warmup_steps, total)(c),
                                             jnp.float32),
              "clip": HEAD_CFG.clip_norm, "weights": len(run_.labels) / (2 * counts)}
    want, norms = replay(run_, **{**recipe, **changes})
    got = {"kernel": np.asarray(run_.res.trainable["head"]["kernel"].get_value()),
           "bias": np.asarray(run_.res.trainable["head"]["bias"].get_value())}
    return max(np.abs(got[k] - want[k]).max() for k in want), norms


def test_fit_steps_follow_warmup_then_cosine(head_run):
    """Each step's learning rate in fit is the documented schedule over the steps fit runs (3
    epochs x 3 batches): the head fit returns equals the replay; a constant rate or a cosine over
    the wrong total does not. Fails if fit sizes the schedule by one epoch (planted:
    make_optimizer(cfg, steps_per_epoch) in train/program.py) or drops the warmup (planted:
    warmup 0 in learning_rate)."""
    assert head_run.res.report["steps"] == len(head_run.steps) == 9
    gap, _ = replay_gap(head_run)
    assert gap < 1e-5
    assert replay_gap(head_run, lr_at=lambda c: HEAD_CFG.lr)[0] > 100 * max(gap, 1e-7)
    three = lambda c: jnp.asarray(warmup_cosine(HEAD_CFG.lr, HEAD_CFG.warmup_steps, 3 + 1)(c), jnp.float32)
    assert replay_gap(head_run, lr_at=three)[0] > 100 * max(gap, 1e-7)


def test_clip_norm_scales_each_gradient_to_the_bound(head_run):
    """--clip-norm 0.05: every step's gradient (global norms 0.7-1.5 here) is scaled to norm 0.05
    before AdamW; the replay without clipping ends elsewhere.
    Fails if the clip is dropped (planted: make_optimizer returns adamw alone)."""
    gap, norms = replay_gap(head_run)
    assert gap < 1e-5 and all(n > HEAD_CFG.clip_norm for n in norms)
    assert replay_gap(head_run, clip=None)[0] > 100 * max(gap, 1e-7)


def test_balanced_class_weights_weight_the_training_loss(head_run):
    """--class-weights balanced: weights n / (K * count_k) = (24/32, 24/16) for 16 negatives and 8
    positives, applied per example in the training loss (the replay) and in the reported loss.
    Fails if fit trains unweighted (planted: class_weights=None in train/loop.py task_for) or the
    rule is inverted (planted: count * K / n in task.class_weights)."""
    assert class_weights(HEAD_CFG.class_weights, head_run.labels, 2) == pytest.approx((0.75, 1.5))
    assert class_weights(HEAD_CFG.class_weights, np.array([0, 0, 0, 2]), 3) == pytest.approx((4 / 9, 4 / 3, 4 / 3))
    gap, _ = replay_gap(head_run)
    assert gap < 1e-5
    assert replay_gap(head_run, weights=(1.0, 1.0))[0] > 100 * max(gap, 1e-7)
    res = head_run.res
    m = nnx.merge(res.graphdef, res.trainable, res.frozen)
    logits = m.head(jnp.asarray(head_run.feats))
    ce = -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(head_run.labels)), head_run.labels]
    w = np.array([0.75, 1.5])[head_run.labels]
    np.testing.assert_allclose(res.report["splits"]["train"]["loss"], np.sum(w * ce) / np.sum(w), rtol=1e-5)


def test_lora_update_is_scaled_by_alpha_not_alpha_over_rank():
    """README/model.py: the adapter adds alpha * (x @ A) @ B (the book's appendix E), not
    alpha / rank times it. Fails if the scale becomes alpha / rank (planted in model.Linear)."""
    from jaxcls.model import Linear

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    outs = {}
    for alpha in (1.0, 4.0):
        lin = Linear(8, 6, config=CFG.replace(lora_rank=2, lora_alpha=alpha), rngs=nnx.Rngs(0))
        lin.lora_b[...] = jax.random.normal(jax.random.PRNGKey(2), (2, 6))
        base = x @ lin.kernel[...] + lin.bias[...]
        outs[alpha] = lin(x) - base
        np.testing.assert_allclose(outs[alpha], alpha * (x @ lin.lora_a[...]) @ lin.lora_b[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[4.0], 4 * outs[1.0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(outs[1.0]).max()) > 0.1


@pytest.mark.parametrize("padding,train_lengths,want", [("16", (70, 20, 10), [2, 2]), ("longest", (40, 20, 10), [0, 1])])
def test_a_text_cut_twice_is_counted_once(padding, train_lengths, want):
    """`truncated` counts texts, not cuts: a text longer than n_ctx (64; cut there by the encoder)
    and then to a pad length shorter than n_ctx is one truncated text. --padding 16: train's 70 and
    20, test's 90 and 30; longest (40, train's longest): test's 90 only. Planted: `truncated += ...`
    in prepare_split (the old count) -> [3, 3] and [0, 2]."""
    from jaxcls.train.batches import prepare_data

    words = lambda n: " ".join(["w"] * n)  # noqa: E731 - one token per word below
    model = SimpleNamespace(config=SimpleNamespace(n_ctx=64, n_vocab=100), pooling="last_real")
    enc = lambda t: [1] * len(t.split())  # noqa: E731
    train = TextDataset(tuple(map(words, train_lengths)), np.array([0, 1, 0]), ("a", "b"), "train")
    test = TextDataset((words(90), words(30), words(5)), np.array([0, 1, 0]), ("a", "b"), "test")
    d = prepare_data(model, enc, DataSplits(train, None, test, ("a", "b")), TrainConfig(padding=padding),
                     lambda s: None)
    assert [d.splits["train"].truncated, d.splits["test"].truncated] == want


def test_resume_refuses_a_run_with_other_frozen_weights(tmp_path):
    """The trained parameters of a save restored over other frozen weights (another checkpoint,
    --weights or --init-from: none of them in the settings) would be another model: refused
    naming the save; the run's own weights resume it. Saves made before the check (no digest)
    still resume. Planted: fit calling resumable without the frozen parameters -> the resume over seed 1's
    weights goes through -> fails."""
    cfg = BASE.replace(trainable="last_block", max_steps=2, save_every=1, eval_freq=100, epochs=1)
    run(cfg, out=tmp_path)
    saved = trainstate.saved_steps(tmp_path / "state")
    assert saved[-1] == 2
    meta = trainstate.StateStore(tmp_path / "state").meta(2)
    assert len(meta["config"][trainstate.FROZEN_KEY]) == 16
    longer = cfg.replace(max_steps=3)
    with pytest.raises(ConfigError, match=r"step_0+2: saved by a run whose frozen weights differ"):
        fit(model(1), encode, toy_splits(), longer, out=tmp_path, resume=True, progress=False, log=lambda s: None)
    resumed = fit(model(0), encode, toy_splits(), longer, out=tmp_path, resume=True, progress=False,
                  log=lambda s: None)
    assert resumed.report["steps"] == 3
    assert trainstate.frozen_fingerprint({"a": np.ones(3, np.float32)}) != trainstate.frozen_fingerprint(
        {"a": np.full(3, 2, np.float32)})
    # a save without the digest (older jaxcls) resumes under the same settings
    old = {"lr": 1e-3}
    store = trainstate.StateStore(tmp_path / "old")
    try:
        tree = {"trainable": {"w": np.ones(3, np.float32)}, "opt_state": {"count": np.int32(1)}}
        store.save(1, tree, trainstate.LoopState(**tree, step=1).meta(old))
        store.wait()
        got = trainstate.restore(trainstate.LoopState(**tree), store, {**old, trainstate.FROZEN_KEY: "x"})
        assert got[0].step == 1 and got[2] == []
    finally:
        store.close()
