"""Bucketed inference: same numbers as one text at a time, a bounded number of compiles."""

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.config import TINY_SIZES
from jaxcls.data import pad_batch
from jaxcls.errors import ConfigError
from jaxcls.compile_cache import enable_compilation_cache
from jaxcls.infer.predictor import Predictor, predict_step, rows_step
from jaxcls.chunks import CPU_CHUNK_TOKENS, over_row_chunks, row_chunks
from jaxcls.model import GPT2Classifier, path_str
from jaxcls.task import SingleLabel, softmax
from jaxcls.tokenizer import PAD_ID, encode, encoding_from_files

CFG = TINY_SIZES["tiny"]  # n_ctx 64
WORDS = ["free", "win", "cash", "now", "call", "hello", "lunch", "tomorrow", "ok", "lol", "the",
         "café", "naïve", "日本語", "🎉", "😀👍", "Ünïcödé", "42", "£1000", "!!!", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tok():
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    return lambda text: encode(enc, text)


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(0)
    out = [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(196)]
    out += ["", " ".join(rng.choice(WORDS, 200)), "x", "🎉" * 40]  # empty, long, 1 token, long emoji
    return out


def model_of(pooling, seed=0, num_classes=5):  # 5 classes: shapes no other test compiles
    return GPT2Classifier(CFG, num_classes, pooling=pooling, rngs=nnx.Rngs(seed))


# ---- a NumPy classifier, float64, one text at its exact length ------------------------------

def _ln(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def np_params(model):
    return {path_str(k): np.asarray(v.get_value(), np.float64)
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def np_classify(model, ids, p=None):
    """Logits of one unpadded sequence."""
    p = np_params(model) if p is None else p
    T, H = len(ids), model.config.n_head
    x = p["wte/embedding"][ids] + p["wpe/embedding"][:T]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(model.config.n_layer):
        q = lambda n: p[f"h/{i}/{n}"]
        h = _ln(x, q("ln_1/scale"), q("ln_1/bias")) @ q("attn/c_attn/kernel") + q("attn/c_attn/bias")
        C = x.shape[-1]
        qs, ks, vs = (h[:, j * C:(j + 1) * C].reshape(T, H, C // H).transpose(1, 0, 2) for j in range(3))
        att = np.where(causal, qs @ ks.transpose(0, 2, 1) / np.sqrt(C // H), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = ((att / att.sum(-1, keepdims=True)) @ vs).transpose(1, 0, 2).reshape(T, C)
        x = x + y @ q("attn/c_proj/kernel") + q("attn/c_proj/bias")
        h = _ln(x, q("ln_2/scale"), q("ln_2/bias")) @ q("mlp/c_fc/kernel") + q("mlp/c_fc/bias")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ q("mlp/c_proj/kernel") + q("mlp/c_proj/bias")
    x = _ln(x, p["ln_f/scale"], p["ln_f/bias"])
    pooled = {"last_real": x[-1], "first": x[0], "mean": x.mean(0)}[model.pooling]
    return pooled @ p["head/kernel"] + p["head/bias"]


def reference_ids(tok, text, L=CFG.n_ctx):
    ids = tok(text)
    return np.array(ids[:L] if ids else [PAD_ID])


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last_real", "mean", "first"])
def test_bucketed_equals_one_text_at_a_time(tok, texts, pooling):
    model = model_of(pooling)
    buckets = (16, 64)
    pred = Predictor(model, tok, batch_size=7, bucket_lengths=buckets)  # batch 7: shapes unique to this test
    got = pred.logits(texts)
    assert got.shape == (len(texts), 5) and got.dtype == np.float32
    params = np_params(model)
    want = np.stack([np_classify(model, reference_ids(tok, t), params) for t in texts])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert got.std(axis=0).min() > 1e-2  # texts really differ, so a mixed-up order would show
    # unique sequences, sorted, cut into batches of 7 from the long end; each batch runs at the
    # bucket of its longest text
    lengths = sorted(len(s) for s in {reference_ids(tok, t).tobytes(): reference_ids(tok, t) for t in texts}.values())
    cuts = list(range(len(lengths), 0, -7))[::-1]
    used = {min(b for b in buckets if b >= lengths[hi - 1]) for hi in cuts}
    assert pred.num_compiles == len(used) == 2
    assert pred.stats.batches == len(cuts)
    assert pred.stats.truncated == sum(len(tok(t)) > 64 for t in texts) >= 2
    assert pred.stats.empty == 1 and pred.stats.texts == len(texts)
    # a shuffled call gives the same rows, shuffled, and compiles nothing new
    perm = np.random.default_rng(1).permutation(len(texts))
    np.testing.assert_array_equal(pred.logits([texts[i] for i in perm]), got[perm])
    assert pred.num_compiles == 2


def test_row_chunks_split_large_cpu_batches_evenly():
    """Planted: row_chunks returning B (no chunking) or rounding the piece count down -> fails."""
    assert CPU_CHUNK_TOKENS == 2048
    assert row_chunks(64, 120, "cpu") == 16 and row_chunks(8, 120, "cpu") == 8
    assert row_chunks(100, 120, "cpu") == 17 and row_chunks(17, 120, "cpu") == 17 and row_chunks(18, 120, "cpu") == 9
    assert row_chunks(64, 120, "gpu") == row_chunks(64, 120, "tpu") == 64
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    seen = []

    def rowwise(a, b):
        seen.append(a.shape[0])
        return a * 2 + b[:, None]

    for rows in (4, 5, 10, 99):  # whole chunks and a remainder; whole chunks only; one call
        seen.clear()
        got = jax.jit(lambda a, b, r=rows: over_row_chunks(rowwise, a, b, rows=r))(x, np.arange(10.0))
        np.testing.assert_array_equal(got, x * 2 + np.arange(10.0)[:, None])
        assert seen == {4: [4, 2], 5: [5], 10: [10], 99: [10]}[rows]


@pytest.mark.parametrize("batch,bucket", [(40, 64), (45, 64)])
def test_large_batches_run_in_row_chunks_with_the_same_numbers(tok, texts, batch, bucket):
    """A batch of more than CPU_CHUNK_TOKENS tokens runs as a loop over row chunks inside one
    program (2 x 20 rows; 23 rows and a remainder of 22) and gives each text its own logits.
    Planted: over_row_chunks reshaping rows column-first (rows of different chunks swapped) -> the
    numbers fail; row_chunks always B -> the `while` check fails."""
    model = model_of("last_real", seed=2)
    graphdef, state = nnx.split(model)
    ids = np.zeros((batch, bucket), np.int32)
    lengths = np.full(batch, 3, np.int32)
    for step in (lambda: predict_step.lower(graphdef, state, ids, lengths),
                 lambda: rows_step.lower(graphdef, SingleLabel(tuple("abcde")), state, ids, lengths)):
        assert "stablehlo.while" in step().as_text()
    pred = Predictor(model, tok, batch_size=batch, bucket_lengths=(bucket,))
    got = pred.logits(texts[:batch])
    params = np_params(model)
    want = np.stack([np_classify(model, reference_ids(tok, t), params) for t in texts[:batch]])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert got.std(axis=0).min() > 1e-2


def test_predict_warmup_and_compile_bound(tok, texts):
    model = model_of("last_real", seed=1)
    pred = Predictor(model, tok, batch_size=6, bucket_lengths=(64,), row_buckets=(1, 6))
    assert pred.shapes() == [(1, 64), (6, 64)]
    assert pred.warmup() == 2 and pred.warmup() == 0
    ids, probs = pred.predict(texts[:50])
    ids1, probs1 = pred.predict(texts[7:8])  # a single text runs a one-row batch
    assert pred.num_compiles == 2
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(ids, probs.argmax(-1))
    np.testing.assert_allclose(probs1[0], probs[7], atol=1e-6)
    np.testing.assert_allclose(probs, softmax(pred.logits(texts[:50])), atol=1e-7)


def test_empty_input_and_empty_strings(tok):
    model = model_of("mean", seed=2)
    pred = Predictor(model, tok, batch_size=4, bucket_lengths=(64,))  # shapes shared with the next test
    logits = pred.logits([])
    ids, probs = pred.predict([])
    assert logits.shape == (0, 5) and ids.shape == (0,) and probs.shape == (0, 5)
    assert pred.num_compiles == 0
    # "" is classified as a lone padding token, not an error
    got = pred.logits(["", "hello", ""])
    np.testing.assert_allclose(got[0], np_classify(model, np.array([PAD_ID])), atol=2e-4)
    np.testing.assert_array_equal(got[0], got[2])
    assert pred.stats.empty == 2
    with pytest.raises(TypeError):
        pred.logits("a single string")


def test_long_texts_truncate_and_sliding(tok):
    model = model_of("mean", seed=3)
    text = " ".join(["word"] * 149)  # 149 tokens
    ids = np.array(tok(text))
    assert len(ids) == 149
    trunc = Predictor(model, tok, batch_size=4, bucket_lengths=(64,))
    np.testing.assert_allclose(trunc.logits([text])[0], np_classify(model, ids[:64]), atol=2e-4)
    assert trunc.stats.truncated == 1 and trunc.stats.windows == 0

    slide = Predictor(model, tok, batch_size=4, bucket_lengths=(64,), long="sliding")
    got = slide.logits(["short text", text])
    starts = [0, 32, 64, 85]  # stride 32; the last window ends at the text's end
    params = np_params(model)
    want = np.mean([np_classify(model, ids[s:s + 64], params) for s in starts], axis=0)
    np.testing.assert_allclose(got[1], want, atol=2e-4)
    np.testing.assert_allclose(got[0], np_classify(model, np.array(tok("short text"))), atol=2e-4)
    assert slide.stats.windows == 4 and slide.stats.truncated == 0 and slide.stats.long_texts == 1
    slide50 = Predictor(model, tok, batch_size=4, bucket_lengths=(64,), long="sliding", window_stride=50)
    slide50.logits([text])
    assert slide50.stats.windows == 3  # 0, 50, 85


def test_fixed_pad_length_reproduces_training_padding(tok, texts):
    """`last` pooling reads the final padded position: served with the training pad length, the
    predictor gives exactly what the model gave on the training batch."""
    model = model_of("last", seed=4)
    pad = 20
    pred = Predictor(model, tok, pad_length=pad, batch_size=8)
    assert pred.bucket_lengths == (pad,) and pred.max_length == pad
    sample = [t for t in texts[:40] if t]
    got = pred.logits(sample)
    ids, lengths = pad_batch([np.array(tok(t)[:pad]) for t in sample], pad)
    graphdef, state = nnx.split(model)
    want = jax.jit(lambda s, i, n: nnx.merge(graphdef, s)(i, n))(state, ids, lengths)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    assert pred.num_compiles == 1
    assert pred.stats.truncated == sum(len(tok(t)) > pad for t in sample) > 0
    with pytest.warns(UserWarning, match="pad_length"):
        Predictor(model, tok)


def test_bad_options(tok):
    model = model_of("last_real")
    with pytest.raises(ConfigError, match="long"):
        Predictor(model, tok, long="wrap")
    with pytest.raises(ConfigError, match="pad_length"):
        Predictor(model, tok, pad_length=20, bucket_lengths=(16, 32))
    with pytest.raises(ConfigError, match="pad_length"):
        Predictor(model, tok, pad_length=65)
    with pytest.raises(ConfigError, match="bucket_lengths"):
        Predictor(model, tok, bucket_lengths=(32, 128))
    with pytest.raises(ConfigError, match="batch_size"):
        Predictor(model, tok, batch_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Predictor(model, tok).bucket_lengths == (16, 24, 32, 48, 64)  # the default buckets


def test_compilation_cache_writes_entries(tok, tmp_path):
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    try:
        folder = enable_compilation_cache(tmp_path / "xla")
        pred = Predictor(model_of("first", seed=5), tok, batch_size=3, bucket_lengths=(24,))
        pred.logits(["a text"])
        assert pred.num_compiles == 1
        assert any(folder.iterdir())
    finally:
        from jax.experimental.compilation_cache import compilation_cache

        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def test_small_vocabulary_pads_inside_the_table():
    """GPT-2's pad id 50256 lies past a smaller embedding table (a gather there is NaN): the
    Predictor pads with the table's last id by default, as training does."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxcls.config import GPT2Config
    from jaxcls.model import GPT2Classifier
    from jaxcls.infer.predictor import Predictor

    model = GPT2Classifier(GPT2Config(n_vocab=50, n_ctx=16, n_embd=8, n_head=2, n_layer=1), 2, rngs=nnx.Rngs(0))
    pred = Predictor(model, lambda t: [len(w) % 50 for w in t.split()], batch_size=2, bucket_lengths=(16,))
    assert pred.pad_id == 49
    logits = pred.logits(["a bb ccc", "dddd"])
    assert np.isfinite(logits).all()
    alone = np.asarray(model(jnp.asarray([[1, 2, 3]]), jnp.asarray([3])))
    np.testing.assert_allclose(logits[0], alone[0], atol=1e-5)


def test_duplicates_run_once_and_the_partial_batch_is_the_shortest(tok):
    model = model_of("last_real", seed=4)
    pred = Predictor(model, tok, batch_size=4, bucket_lengths=(16, 64))  # shapes shared with other tests
    seen = []
    run = pred._run
    pred._run = lambda ids, lens: (seen.append((ids.shape, lens.copy())), run(ids, lens))[1]
    short, long_ = "ok", " ".join(["cash now"] * 10)
    texts = [long_, short, long_, "win", short, "call me", long_ + " !", "hello there", short]
    got = pred.logits(texts)
    assert pred.stats.duplicates == 3 and pred.stats.texts == 9
    assert pred.stats.tokens == sum(len(tok(t)) for t in set(texts)) and pred.stats.tokens_run == 4 * 16 + 4 * 64
    assert len(seen) == 2  # 6 unique texts, batch 4: a partial batch of 2, then a full one
    (shape0, lens0), (shape1, lens1) = seen
    assert shape0 == (4, 16) and lens0[:2].tolist() == [len(tok("ok")), len(tok("win"))]  # the shortest two
    assert shape1 == (4, 64) and max(lens1) == len(tok(long_ + " !"))
    for i, t in enumerate(texts):
        np.testing.assert_allclose(got[i], np_classify(model, reference_ids(tok, t)), atol=2e-4)
    np.testing.assert_array_equal(got[0], got[2])


def test_unknown_pooling_label_and_dtype_are_named_errors():
    """Fails if these raise a bare ValueError (planted: GPT2Classifier raises ValueError for an
    unknown pooling; check_backend returns at once, so float16 fails only when jitted)."""
    from jaxcls.classifier import Classifier
    from jaxcls.errors import DataError
    from jaxcls.model import pool

    with pytest.raises(ConfigError, match=r"unknown pooling 'max'; choose from \('last_real', 'last'"):
        GPT2Classifier(CFG, 2, pooling="max", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        pool(np.zeros((1, 2, 3), np.float32), None, "max")
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match="float16.*CPU.*bfloat16 or float32"):
            GPT2Classifier(CFG.replace(dtype="float16"), 2, rngs=nnx.Rngs(0))
    clf = Classifier.from_pretrained("tiny", label_names=["ham", "spam"], weights="random",
                                     tokenizer=TOKENIZER_DIR)
    with pytest.raises(DataError, match=r"<train>: row 2: label 'eggs' .*\['ham', 'spam'\]"):
        clf.fit((["a text", "another"], ["ham", "eggs"]), epochs=1, max_steps=1, log=lambda s: None)
