"""The port is GPT-2: parity with transformers' outputs and with a NumPy forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE
from jaxcls import cpu_gemm, load_pretrained
from jaxcls.config import GPT2Config
from jaxcls.model import GPT2, GPT2Classifier, path_str, pool

EXPECTED = json.loads((FIXTURE / "expected.json").read_text()) if FIXTURE.is_dir() else None


def test_parity_with_transformers(fixture_dir):
    model = load_pretrained(fixture_dir)
    ids = jnp.asarray(EXPECTED["token_ids"], jnp.int32)
    hidden = model(ids)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(EXPECTED["final_hidden"]), atol=1e-5, rtol=0)
    for b, n in enumerate(EXPECTED["lengths"]):
        logits = np.asarray(model.lm_logits(hidden[b, n - 1]))
        assert list(np.argsort(-logits)[:5]) == EXPECTED["last_real_logits_top5"][b]
        np.testing.assert_allclose(logits[:16], EXPECTED["last_real_logits_first16"][b], atol=1e-4)
        lse = float(jax.scipy.special.logsumexp(logits))
        assert abs(lse - EXPECTED["last_real_logsumexp"][b]) < 1e-4


def test_parameter_paths_mirror_checkpoint_names():
    model = GPT2(GPT2Config(n_vocab=10, n_ctx=8, n_embd=8, n_head=2, n_layer=2), rngs=nnx.Rngs(0))
    paths = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "h/1/attn/c_attn/kernel" in paths and "wte/embedding" in paths and "ln_f/scale" in paths
    assert "h/0/mlp/c_fc/bias" in paths and "h/0/ln_2/scale" in paths and "wpe/embedding" in paths
    assert len(paths) == 2 + 2 * 12 + 2


# ---- a NumPy GPT-2, written from the paper's equations, float64 ----

def np_layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(p, ids, n_head, causal=True, lengths=None):
    B, T = ids.shape
    x = p["wte/embedding"][ids] + p["wpe/embedding"][np.arange(T)]
    n_layer = len({k.split("/")[1] for k in p if k.startswith("h/")})
    allowed = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    allowed = np.broadcast_to(allowed, (B, T, T)).copy()
    if lengths is not None:
        allowed &= (np.arange(T)[None, None, :] < np.asarray(lengths)[:, None, None])
    for i in range(n_layer):
        q = lambda name: p[f"h/{i}/{name}"]
        h = np_layer_norm(x, q("ln_1/scale"), q("ln_1/bias"))
        qkv = h @ q("attn/c_attn/kernel") + q("attn/c_attn/bias")
        C = x.shape[-1]
        hd = C // n_head
        qs, ks, vs = (qkv[..., j * C:(j + 1) * C].reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)
                      for j in range(3))
        att = qs @ ks.transpose(0, 1, 3, 2) / np.sqrt(hd)
        att = np.where(allowed[:, None], att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ vs).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ q("attn/c_proj/kernel") + q("attn/c_proj/bias")
        h = np_layer_norm(x, q("ln_2/scale"), q("ln_2/bias"))
        x = x + np_gelu(h @ q("mlp/c_fc/kernel") + q("mlp/c_fc/bias")) @ q("mlp/c_proj/kernel") + q("mlp/c_proj/bias")
    return np_layer_norm(x, p["ln_f/scale"], p["ln_f/bias"])


def params_np(model):
    return {path_str(p): np.asarray(v.get_value(), np.float64)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("causal", [True, False])
def test_random_config_matches_numpy_reference(causal):
    cfg = GPT2Config(n_vocab=97, n_ctx=24, n_embd=32, n_head=4, n_layer=3, causal=causal)
    model = GPT2(cfg, rngs=nnx.Rngs(7))
    # random init has tiny LayerNorm gains; perturb them so the test would see a wrong norm
    for blk in model.h:
        blk.ln_1.scale.set_value(blk.ln_1.scale.get_value() + 0.3)
    ids = np.random.default_rng(0).integers(0, 97, (3, 17))
    lengths = np.array([17, 9, 4])
    mask = (np.arange(17)[None] < lengths[:, None]).astype(np.int32)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = np_forward(params_np(model), ids, 4, causal=causal, lengths=lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=2e-5)
    got_nomask = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(got_nomask, np_forward(params_np(model), ids, 4, causal=causal), atol=2e-5)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    cfg = GPT2Config(n_vocab=50, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    m32 = GPT2(cfg, rngs=nnx.Rngs(1))
    m16 = GPT2(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(1))
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param)))
    ids = jnp.arange(12)[None] % 50
    out16 = m16(ids)
    # bfloat16 throughout, or on MKL's path bfloat16 matmul operands around float32 activations
    assert out16.dtype == (jnp.float32 if cpu_gemm.fast_path_available() else jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(m32(ids)), atol=0.1)


def test_pooling_reads_true_lengths_not_padding_ids():
    hidden = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
    lengths = jnp.array([2, 4])
    assert pool(hidden, lengths, "last_real")[:, 0].tolist() == [1.0, 7.0]
    assert pool(hidden, lengths, "last")[:, 0].tolist() == [3.0, 7.0]
    assert pool(hidden, lengths, "first")[:, 0].tolist() == [0.0, 4.0]
    assert pool(hidden, lengths, "mean")[:, 0].tolist() == [0.5, 5.5]


def test_last_pooling_runs_unmasked_over_the_padding_as_the_book():
    """`--pooling last` reads the last position of the padded row and, as the book's model does,
    lets every position attend to the padding tokens before it: the float64 reference without a
    padding mask, which the masked one differs from here. Fails if `last` masks the padding
    (planted: uses_padding_mask returning True)."""
    cfg = GPT2Config(n_vocab=60, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
    clf = GPT2Classifier(cfg, 3, pooling="last", rngs=nnx.Rngs(3))
    ids = np.array([[5, 9, 50, 7, 59, 59, 59], [8, 3, 12, 40, 41, 2, 59]])
    lengths = np.array([4, 6])
    got = np.asarray(clf(jnp.asarray(ids), jnp.asarray(lengths)))
    p = params_np(clf)
    head = lambda h: h[:, -1] @ p["head/kernel"] + p["head/bias"]  # noqa: E731
    np.testing.assert_allclose(got, head(np_forward(p, ids, 2)), atol=2e-5)
    assert np.abs(head(np_forward(p, ids, 2, lengths=lengths)) - got).max() > 1e-3


def test_classifier_last_real_is_padding_invariant():
    cfg = GPT2Config(n_vocab=60, n_ctx=128, n_embd=16, n_head=2, n_layer=2, causal=False)
    clf = GPT2Classifier(cfg, 3, pooling="last_real", rngs=nnx.Rngs(0))
    text = jnp.array([5, 9, 50, 7, 11])
    for pad in (10, 100):
        ids = jnp.concatenate([text, jnp.full((pad,), 59)])[None]
        logits = clf(ids, jnp.array([5]))
        if pad == 10:
            first = logits
    np.testing.assert_allclose(np.asarray(logits), np.asarray(first), atol=1e-5)


@pytest.mark.parametrize("pooling,causal", [("last_real", True), ("last", True), ("first", False),
                                            ("last_real", False)])
def test_last_block_at_the_pooled_position_equals_the_full_block(pooling, causal):
    """The classifier runs its last block only at the pooled token; logits and gradients must be
    those of running it everywhere and pooling afterwards."""
    cfg = GPT2Config(n_vocab=90, n_ctx=20, n_embd=16, n_head=2, n_layer=3, causal=causal, lora_rank=2)
    clf = GPT2Classifier(cfg, 3, pooling=pooling, rngs=nnx.Rngs(3))
    for blk in clf.h:  # LoRA B starts at zero; make the adapter path count (the book's A is
        # U(+-1/sqrt(rank)), 0.71 at rank 2: a B of 0.035 keeps the update A B of the earlier 0.25 x 0.1)
        blk.attn.c_attn.lora_b.set_value(0.035 * jax.random.normal(jax.random.PRNGKey(1), blk.attn.c_attn.lora_b.shape))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 90, (4, 15)))
    lengths = jnp.asarray([15, 9, 3, 1])
    graphdef, state = nnx.split(clf)

    def full(state):
        m = nnx.merge(graphdef, state)
        x = m.prefix(ids, lengths, cfg.n_layer)
        return m.head(pool(m.ln_f(x), lengths, pooling)).sum()

    def fast(state):
        return nnx.merge(graphdef, state)(ids, lengths).sum()

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(full))(state), jax.jit(jax.value_and_grad(fast))(state)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for (p, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
        want, got = np.asarray(x.get_value()), np.asarray(y.get_value())
        scale = max(np.abs(want).max(), 1e-3)  # float32 noise is relative to the tensor's magnitude
        np.testing.assert_allclose(got, want, atol=2e-6 * scale, err_msg=path_str(p))
