"""`jaxcls classify` output checked against the classifier itself, `--long sliding` against windows
built by hand, and the one-line errors of `classify` and `train` for bad flag values."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR, save_tiny_classifier
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.task import softmax

LABELS = ["ham", "spam", "other"]
TEXTS = ["WINNER!! You have won a £1000 prize, call now", "Are we still on for lunch?", "ok 👍",
         "naïve café", "Free entry in 2 a wkly comp to win FA Cup final tkts", "see you at 6",
         "URGENT! Your mobile number has been awarded a bonus", "haha that's so funny"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("clf3"), LABELS, seed=7)


@pytest.fixture(scope="module")
def clf(model_dir):
    return Classifier.load(model_dir)


def table_rows(out: str) -> list[list[str]]:
    """The body rows of a rich table (cells split on the column rule), in printed order."""
    return [[c.strip() for c in line.split("│")] for line in out.splitlines() if "│" in line]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_table_labels_are_the_classifiers_predictions(model_dir, clf, capsys):
    """Fails if the table prints another label than Classifier.predict gives (planted: argmin in
    place of the predicted id in _print_table; or the texts' rows printed reversed)."""
    want, probs = clf.predict(TEXTS, return_probs=True)
    assert len(set(want)) > 1  # a table in the wrong order or with one fixed label would differ
    assert main(["classify", "--model", str(model_dir), *TEXTS]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == len(TEXTS)
    for row, text, label, p in zip(rows, TEXTS, want, probs):
        shown, got_label, got_p = row
        assert text.startswith(shown.rstrip("…"))
        assert got_label == label
        assert got_p == f"{p[LABELS.index(label)]:.4f}"


def sliding_reference(clf, text, stride):
    """Mean logits over windows of n_ctx tokens `stride` apart, the last ending at the text's end
    (docs/predict.md, "Long texts"), run as one unpadded batch through the model; and the window
    count."""
    ids = np.asarray(clf.encode(text), np.int32)
    L = clf.max_length
    starts = list(range(0, len(ids) - L + 1, stride))
    if starts[-1] + L < len(ids):
        starts.append(len(ids) - L)
    windows = np.stack([ids[s:s + L] for s in starts])
    graphdef, state = nnx.split(clf.model)
    logits = jax.jit(lambda st, x, n: nnx.merge(graphdef, st)(x, n))(state, windows, np.full(len(starts), L))
    return softmax(np.asarray(logits).mean(axis=0)[None])[0], len(starts)


@pytest.mark.parametrize("stride", [None, 50])
def test_classify_long_sliding_averages_windows(model_dir, clf, tmp_path, capsys, stride):
    """Fails if the CLI drops --long or --window-stride (planted: _predictor_kw ignores args.long,
    or args.window_stride), or if windows are not averaged (planted: Predictor.logits keeps each
    text's first window)."""
    long_text = " ".join(TEXTS * 3)
    n_tokens = len(clf.encode(long_text))
    assert n_tokens > 2 * clf.max_length == 128
    texts = [TEXTS[1], long_text]
    out = tmp_path / "out.jsonl"
    flags = ["--window-stride", str(stride)] if stride else []
    assert main(["classify", "--model", str(model_dir), "--long", "sliding", *flags, *texts,
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    got = np.array([[r["probs"][n] for n in LABELS] for r in rows])

    want_long, windows = sliding_reference(clf, long_text, stride or clf.max_length // 2)
    assert windows >= 3
    np.testing.assert_allclose(got[1], want_long, rtol=2e-5, atol=2e-6)
    kw = {"long": "sliding", **({"window_stride": stride} if stride else {})}
    api = clf.predictor(**kw).predict(texts)[1]  # the Python API's answer
    np.testing.assert_allclose(got, api, rtol=2e-5, atol=2e-6)
    assert [r["label"] for r in rows] == [LABELS[i] for i in api.argmax(-1)]
    truncated = clf.predict_proba([long_text])[0]
    assert np.abs(truncated - want_long).max() > 1e-3  # sliding really differs from the first window
    assert f"1 of 2 texts had more than 64 tokens; their {windows} windows were classified and averaged" in err


def test_classify_chunk_size_zero_is_a_one_line_error(tmp_path, capsys):
    """Fails if --chunk-size 0 is not checked before loading (planted: cmd_classify's check
    removed: the missing model is reported, and with a model TextReader's ValueError escapes)."""
    src = tmp_path / "in.txt"
    src.write_text("a text\n", encoding="utf-8")
    assert main(["classify", "--model", str(tmp_path / "no-model"), "--input", str(src),
                 "--chunk-size", "0"]) == 2
    assert "--chunk-size must be >= 1, got 0" in one_line_error(capsys)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="float16 is refused on the CPU backend only")
def test_train_float16_on_cpu_is_a_one_line_error(tmp_path, capsys):
    """Fails if float16 reaches XLA:CPU's compiler (planted: check_backend returns at once): its
    "precision 'F16_F16_F32' is not supported" ValueError escapes main."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{LABELS[i % 2]}\n"
                                             for i, t in enumerate(TEXTS * 2)), encoding="utf-8")
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(data),
                 "--tokenizer", str(TOKENIZER_DIR), "--dtype", "float16", "--epochs", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "float16" in err and "bfloat16 or float32" in err
    assert main(["train", "--data", str(data), "--dtype", "float64", "--quiet"]) == 2
    assert "ModelSpec.dtype" in one_line_error(capsys)


def test_dtype_flag_recomputes_in_the_dtype_asked_and_says_so(model_dir, clf, tmp_path, capsys):
    """`--dtype` on classify: the saved dtype by default (no line), bfloat16 when asked (the same
    weights: probabilities within bfloat16's rounding of the float32 ones, not equal to them), and
    `auto` decided for this machine as train decides it (tiny is too narrow for MKL: float32, said
    with the reason). Fails if the flag is parsed but not applied (planted: `clf.model = ...` dropped
    in load_classifier), or if the decision goes unreported (planted: the print removed)."""
    def probs(*flags):
        out = tmp_path / f"out{len(flags)}{flags[-1] if flags else ''}.jsonl"
        assert main(["classify", "--model", str(model_dir), "--output", str(out), *flags, *TEXTS]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return np.array([[r["probs"][k] for k in LABELS] for r in rows]), capsys.readouterr().err

    saved, err = probs()
    assert "dtype:" not in err
    bf16, err = probs("--dtype", "bfloat16")
    assert "dtype: bfloat16 (requested)" in err
    assert not np.array_equal(bf16, saved) and np.abs(bf16 - saved).max() < 0.05
    auto, err = probs("--dtype", "auto")
    assert "dtype: float32 (" in err  # tiny is float32 on any CPU, by the width rule or for want of units
    np.testing.assert_array_equal(auto, saved)
