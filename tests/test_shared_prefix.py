"""The shared-prefix form of choice rows (jaxcls/shared_prefix.py): the context run once per example
gives the flattened rows' features, logits and gradients on a tiny random GPT-2 (float32, jitted),
and `split_rows` cuts rows into that form without losing a token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcls import cpu_gemm
from jaxcls.config import GPT2Config
from jaxcls.errors import ConfigError, DataError
from jaxcls.model import GPT2Classifier
from jaxcls.shared_prefix import SharedRows, shared_prefix_features, shared_prefix_logits, split_rows
from jaxcls.task import Choice
from jaxcls.train import step as train

CFG = GPT2Config(n_vocab=64, n_ctx=32, n_embd=16, n_head=2, n_layer=3, dropout=0.0)
R, T, DELIM = 4, 24, 63


def choice_rows(seed=0):
    """Flattened rows `context DELIM option` of 5 examples, R=4 each: contexts of 1..10 tokens, one
    example lacking two options, one with none, one whose rows kept different lengths of the
    context (two-part truncation), two whose options start alike (in example 1 one present row is
    the start of the other)."""
    rng = np.random.default_rng(seed)
    rows = []
    tok = lambda n: list(rng.integers(0, DELIM, n))  # noqa: E731
    ctx = tok(10)
    rows.append([ctx + [DELIM] + tok(n) for n in (3, 1, 6, 2)])
    short, opt = tok(1), tok(2)
    rows.append([short + [DELIM] + opt, short + [DELIM] + opt + tok(3), [], []])
    rows.append([[], [], [], []])
    rows.append([ctx[:k] + [DELIM] + tok(n) for k, n in ((10, 2), (7, 5), (9, 3), (4, 8))])
    opt = tok(4)
    rows.append([ctx[:6] + [DELIM] + o for o in (opt, opt[:2], tok(3), opt + tok(1))])
    flat = [r for ex in rows for r in ex]
    ids = np.full((len(flat), T), 50 % CFG.n_vocab, np.int32)
    for i, r in enumerate(flat):
        ids[i, :len(r)] = r
    return ids, np.array([len(r) for r in flat], np.int32)


@pytest.fixture(scope="module")
def model():
    return GPT2Classifier(CFG, 1, rngs=nnx.Rngs(3))


def flat_logits(model, ids, lengths, task):
    return train.forward(model, jnp.asarray(ids), jnp.asarray(lengths), train.StepSpec(task))


def test_split_rows_rebuilds_every_row_and_shares_the_longest_common_start():
    """Prefix + option gives each present row back; the prefix is the longest start all present
    rows share, each present option keeps >= 1 token, missing rows have length 0. Fails if an
    option may be empty (planted: `lens - 1` -> `lens` in the cap of prefix_len)."""
    ids, lengths = choice_rows()
    s = split_rows(ids, lengths, R)
    assert s.prefix_len.tolist() == [11, 3, 0, 4, 7]  # 10 + DELIM; a whole row but 1; none; cut contexts
    assert s.option_len.tolist()[2] == [0, 0, 0, 0] and s.option_len.tolist()[1][2:] == [0, 0]
    for n, (row, length) in enumerate(zip(ids, lengths)):
        b, r = divmod(n, R)
        assert (s.option_len[b, r] >= 1) == (length > 0)
        rebuilt = np.concatenate([s.prefix_ids[b, :s.prefix_len[b]], s.option_ids[b, r, :s.option_len[b, r]]])
        assert length == 0 or rebuilt.tolist() == row[:length].tolist()
    assert s.prefix_ids.shape == (5, 11) and s.option_ids.shape == (5, R, int(s.option_len.max()))
    fixed = split_rows(ids, lengths, R, prefix_width=16, option_width=20)
    assert fixed.prefix_ids.shape == (5, 16) and fixed.option_ids.shape == (5, R, 20)
    with pytest.raises(ConfigError, match="prefix_width=4 is too small"):
        split_rows(ids, lengths, R, prefix_width=4)
    with pytest.raises(DataError, match="not B\\*R rows of R=3"):
        split_rows(ids, lengths, 3)


def test_features_and_logits_equal_the_flattened_rows_under_jit(model):
    """Pooled features of every present row within 1e-5 of `model.features`, and the Choice logits
    (-inf for missing options) of `train.forward`. Fails if options start at position 0 (planted:
    `prefix_len[:, None, None] +` dropped from `pos`), see the prefix's padding keys (planted:
    mask_p all True), or see later option tokens (planted: `causal` all True)."""
    ids, lengths = choice_rows()
    task = Choice(R)
    s = split_rows(ids, lengths, R, prefix_width=13, option_width=9)  # extra padding on both
    shared = jax.jit(shared_prefix_features)(model, *s)
    flat = jax.jit(lambda m, i, l: m.features(i, jnp.maximum(l, 1)))(model, ids, lengths)
    present = lengths > 0
    np.testing.assert_allclose(np.asarray(shared)[present], np.asarray(flat)[present], atol=1e-5, rtol=1e-5)
    a = np.asarray(jax.jit(functools.partial(shared_prefix_logits, task=task))(model, rows=s))
    b = np.asarray(jax.jit(functools.partial(flat_logits, task=task))(model, ids, lengths))
    assert np.array_equal(np.isinf(a), ~present.reshape(-1, R)) and np.array_equal(np.isinf(a), np.isinf(b))
    np.testing.assert_allclose(a[present.reshape(-1, R)], b[present.reshape(-1, R)], atol=1e-5, rtol=1e-5)


def test_choice_loss_gradient_equals_the_flattened_rows(model):
    """d(Choice loss)/d(every parameter), shared-prefix vs flattened, within 1e-5 of the largest
    gradient entry (the head's bias has gradient 0 up to rounding: softmax ignores a shift).
    Fails if the prefix's keys and values are cut off from the gradient (planted:
    jax.lax.stop_gradient on kp, vp in shared_prefix_features)."""
    ids, lengths = choice_rows(1)
    task = Choice(R)
    labels = jnp.asarray([2, 1, 0, 3, 0])
    weights = jnp.asarray([1.0, 0.5, 1.0, 2.0, 1.0])
    s = split_rows(ids, lengths, R)
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=1)
    def grads(params, shared: bool):
        def loss(p):
            m = nnx.merge(graphdef, p)
            logits = shared_prefix_logits(m, task, s) if shared else flat_logits(m, ids, lengths, task)
            total, weight = task.loss_terms(logits, labels, weights)
            return total / weight
        return jax.value_and_grad(loss)(params)

    (la, ga), (lb, gb) = grads(params, True), grads(params, False)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    leaves_a, leaves_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
    assert len(leaves_a) == len(leaves_b) > 10
    scale = max(float(np.abs(y).max()) for y in leaves_b)
    assert scale > 1e-3  # the gradient is not trivially 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x) / scale, np.asarray(y) / scale, atol=1e-5)


def test_dropout_runs_under_grad_and_unsupported_models_are_refused(model):
    """With dropout on, the shared path trains (finite gradients, the key changes the result); a
    pooling other than last_real, or a non-causal model, is a one-line ConfigError. Fails if the
    check is skipped (planted: `check_supported` returns at once)."""
    ids, lengths = choice_rows(2)
    s = SharedRows(*split_rows(ids, lengths, R))
    noisy = GPT2Classifier(CFG.replace(dropout=0.3, n_layer=2), 1, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(noisy)
    total = jax.jit(jax.value_and_grad(
        lambda p, k: shared_prefix_features(nnx.merge(graphdef, p), *s, dropout_key=k).sum()))
    (a, grads), (b, _) = total(params, jax.random.PRNGKey(0)), total(params, jax.random.PRNGKey(1))
    assert np.isfinite(float(a)) and float(a) != float(b)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    for pooling in ("mean", "last", "first"):
        other = GPT2Classifier(CFG, 1, pooling=pooling, rngs=nnx.Rngs(0))
        with pytest.raises(ConfigError, match=f"pooling 'last_real' on a causal model, got pooling '{pooling}'"):
            shared_prefix_features(other, *s)
    with pytest.raises(ConfigError, match="causal=False"):
        shared_prefix_features(GPT2Classifier(CFG.replace(causal=False), 1, rngs=nnx.Rngs(0)), *s)


@pytest.mark.skipif(cpu_gemm.load_mkl() is None, reason="MKL (pip install 'jaxcls[amx]') is absent")
def test_on_mkl_the_shared_prefix_equals_the_flattened_rows(monkeypatch):
    """On MKL's path (bfloat16 matmul operands, float32 activations) the shared form, whose option
    rows attend over the prefix's keys on XLA, gives the flattened rows' features, whose attention
    runs on MKL's batch GEMM. Fails if a head product reads the wrong part of c_attn's output
    (planted: `Attention.split_heads` returning `[(heads, 0)] * n`)."""
    monkeypatch.setattr(cpu_gemm, "host_flags", lambda: frozenset({"amx_bf16"}))
    model = GPT2Classifier(CFG.replace(dtype="bfloat16"), 1, rngs=nnx.Rngs(3))
    ids, lengths = choice_rows()
    s = split_rows(ids, lengths, R, prefix_width=13, option_width=9)
    shared = np.asarray(jax.jit(shared_prefix_features)(model, *s))
    flat = np.asarray(jax.jit(lambda m, i, n: m.features(i, jnp.maximum(n, 1)))(model, ids, lengths))
    present = lengths > 0
    np.testing.assert_allclose(shared[present], flat[present], atol=1e-5, rtol=1e-5)
