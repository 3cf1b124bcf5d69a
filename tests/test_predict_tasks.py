"""Prediction for every task type on tiny random-init classifiers (no training: consistency only).
The Predictor's logits equal train/step.py's `forward` on the same rows; Classifier.predict decides
as the task says; `jaxcls classify` on a table and a saved-and-loaded folder give the same answers."""

import csv
import functools
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR, requires_shared
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import TINY_SIZES
from jaxcls.data.examples import ExampleEncoder
from jaxcls.errors import ConfigError
from jaxcls.infer.predictor import Predictor
from jaxcls.model import GPT2Classifier
from jaxcls.task import make_task
from jaxcls.tokenizer import PAD_ID, encode, encoding_from_files
from jaxcls.train.step import StepSpec, forward

pytestmark = requires_shared
CFG = TINY_SIZES["tiny"]  # n_ctx 64
WORDS = ["free", "win", "cash", "now", "call", "hello", "lunch", "ok", "café", "🎉", "42", "the", "cat"]
NAMES = ("a", "b", "c")
TASKS = {
    "single": lambda: make_task("single", NAMES),
    "multilabel": lambda: make_task("multilabel", NAMES, thresholds=(0.3, 0.5, 0.7)),
    "regression": lambda: make_task("regression", ("x", "y"), target_mean=(10.0, -2.0), target_std=(4.0, 0.5)),
    "pair": lambda: make_task("pair-multilabel", NAMES, delimiter=" || "),
    "similarity": lambda: make_task("similarity", NAMES),
    "choice": lambda: make_task("choice", num_choices=3),
}


@pytest.fixture(scope="module")
def enc():
    return encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")


def phrase(rng, n):
    return " ".join(rng.choice(WORDS, n))


def examples_for(task, n=9, seed=0):
    """n examples of the task's layout; long parts (cut) and a choice example missing options."""
    rng = np.random.default_rng(seed)
    kind = task.inputs.kind
    out = []
    for i in range(n):
        size = 70 if i == 1 else int(rng.integers(1, 12))  # example 1 is over n_ctx: truncated
        if kind == "text":
            out.append(phrase(rng, size))
        elif kind in ("pair", "similarity"):
            out.append((phrase(rng, size), phrase(rng, int(rng.integers(1, 9)))))
        else:
            k = 2 if i % 3 == 0 else 3  # every third example lacks its third option
            ex = {"context": phrase(rng, size), "choices": [phrase(rng, int(rng.integers(1, 5))) for _ in range(k)]}
            if i % 2:
                ex["question"] = "which one?"
            out.append(ex)
    return out


def forward_logits(model, task, tok, examples, T=64):
    """The reference: every example's rows from the data encoder, one padded batch through
    train/step.py's forward."""
    if task.inputs.kind == "text":
        rows = [[np.asarray(tok(e)[:T], np.int32)] for e in examples]
    else:
        fields = [e if isinstance(e, dict) else {"text": e[0], "text_pair": e[1]} for e in examples]
        encoder = ExampleEncoder(task, tok, T)
        rows = [encoder.rows(f) for f in fields]
    flat = [r for ex in rows for r in ex]
    ids = np.full((len(flat), T), PAD_ID, np.int32)
    for j, r in enumerate(flat):
        ids[j, :len(r)] = r
    lengths = np.array([len(r) for r in flat], np.int32)
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, StepSpec(task), state, ids, lengths))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, spec, state, ids, lengths):
    return forward(nnx.merge(graphdef, state), ids, lengths, spec)


def model_for(task, seed=0):
    return GPT2Classifier(CFG, task.head_width, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", list(TASKS))
def test_predictor_equals_the_training_forward(enc, name):
    """Every task: the Predictor's logits (shuffled, several calls, several length buckets) equal
    train/step.py's forward on the encoder's rows, missing choice options -inf.
    Planted: rows.py fills rows row-major (ids[r * n + k]) instead of example-major -> the
    similarity case (two examples a call) fails;
    similarity rows_step summing only the first row -> fails."""
    task = TASKS[name]()
    model = model_for(task)
    tok = lambda t: encode(enc, t)  # noqa: E731
    examples = examples_for(task)
    pred = Predictor(model, tok, batch_size=4, task=task)  # the default buckets, shared with the tests below
    got = pred.logits(examples)
    want = forward_logits(model, task, tok, examples)
    assert got.shape == want.shape == (len(examples), task.num_outputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    finite = np.isfinite(want)
    assert want[finite].std() > 1e-3  # the examples really differ
    if name == "choice":
        assert np.isneginf(got[0, 2]) and np.isfinite(got[1]).all()
    assert pred.stats.truncated >= 1 and pred.stats.texts == len(examples)
    assert pred.num_compiles <= len(pred.shapes())
    perm = np.random.default_rng(1).permutation(len(examples))
    np.testing.assert_array_equal(pred.logits([examples[i] for i in perm]), got[perm])


def test_similarity_is_symmetric_and_pairs_take_tuples_or_dicts(enc):
    """Planted: data/examples.py building similarity's second row as text DELIM text_pair again
    -> (a, b) and (b, a) differ -> fails."""
    task = TASKS["similarity"]()
    pred = Predictor(model_for(task, 1), lambda t: encode(enc, t), batch_size=4, task=task)
    pairs = [("the cat sat", "on the mat"), ("free cash", "call now 42")]
    forth = pred.logits(pairs)
    back = pred.logits([{"text": b, "text_pair": a} for a, b in pairs])
    np.testing.assert_allclose(forth, back, atol=1e-5)
    assert np.abs(forth[0] - forth[1]).max() > 1e-4


def test_choice_with_more_options_than_trained(enc):
    """The head scores each option row alone, so 5 options on a 3-option model are the forward of a
    5-option task; the call's width is the most options given. Planted: rows_task returning the
    task unchanged -> the encoder refuses 5 options -> fails."""
    task = TASKS["choice"]()
    model = model_for(task, 2)
    tok = lambda t: encode(enc, t)  # noqa: E731
    pred = Predictor(model, tok, batch_size=4, task=task)
    examples = [{"context": "pick the animal", "choices": ["car", "cat", "cup", "cow", "cab"]},
                {"context": "pick a number", "choices": ["42", "lunch"]}]
    got = pred.logits(examples)
    assert got.shape == (2, 5)
    wide = forward_logits(model, make_task("choice", num_choices=5), tok, examples[:1])
    np.testing.assert_allclose(got[:1], wide, atol=1e-5)
    np.testing.assert_allclose(got[1:, :3], forward_logits(model, task, tok, examples[1:]), atol=1e-5)
    assert np.isneginf(got[1, 2:]).all()
    _, probs = pred.predict(examples)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)
    assert (probs[1, 2:] == 0).all()


def test_shared_prefix_equals_the_flattened_rows(enc):
    """Choice with each example's common start run once (the default) gives the flattened rows'
    logits within 1e-5: missing options, more options than trained, a truncated context, several
    calls and buckets; it runs fewer tokens, its warm-up covers every shape a call needs, and a
    `last`-pooling model falls back. Planted: rows.shared_rows passing prefix_len - 1 (the prefix's
    last token dropped) -> fails; shared_widths leaving out (64, 16) -> 3 shapes, not 4 -> fails."""
    task = TASKS["choice"]()
    model = model_for(task, 4)
    tok = lambda t: encode(enc, t)  # noqa: E731
    examples = examples_for(task, 9, seed=7) + [
        {"context": "pick the animal " * 6, "choices": ["car", "cat", "cup", "cow", "cab"]},
        {"context": "the cat sat on the mat " * 7, "choices": ["cat", "mat"]},  # long context: shared
        {"context": "pick a number", "question": "which?", "choices": ["42", "lunch", "1", "2", "3", "4", "5"]}]
    on = Predictor(model, tok, batch_size=4, task=task, bucket_lengths=(16, 64))
    off = Predictor(model, tok, batch_size=4, task=task, bucket_lengths=(16, 64), shared_prefix=False)
    assert on.shared_prefix and not off.shared_prefix
    assert len(on.shapes()) == 2 + 2  # flat (3, 16|64), shared (3, 16|64, 16)
    assert on.warmup() <= 4 and on.warmup() == 0  # jit caches are per process: earlier tests may have compiled some
    got, want = on.logits(examples), off.logits(examples)
    assert got.shape == want.shape == (len(examples), 7)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    assert np.isneginf(got[0, 2]) and np.isneginf(got[9, 5:]).all() and np.isfinite(got[11]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-5, rtol=1e-5)
    assert on.stats.tokens_run < off.stats.tokens_run  # some calls shared (a call picks the cheaper form)
    compiles = on.num_compiles
    on.logits(examples[:9] + examples[10:11])  # at most the trained 3 options: only warmed shapes
    assert on.num_compiles == compiles
    last = GPT2Classifier(CFG, 1, pooling="last", rngs=nnx.Rngs(4))
    assert not Predictor(last, tok, task=task, pad_length=64).shared_prefix


def test_head_width_and_sliding_are_checked(enc):
    """Planted: the head checked against num_outputs (as before) -> a choice model is refused -> fails."""
    tok = lambda t: encode(enc, t)  # noqa: E731
    choice = TASKS["choice"]()
    Predictor(model_for(choice), tok, task=choice)  # head width 1 for 3 options: fine
    with pytest.raises(ConfigError, match="the multilabel task needs a head of width 3; the model's head has 1"):
        Predictor(model_for(choice), tok, task=TASKS["multilabel"]())
    for name in ("pair", "similarity", "choice"):
        task = TASKS[name]()
        with pytest.raises(ConfigError, match="--long sliding averages windows of one text"):
            Predictor(model_for(task), tok, task=task, long="sliding")


# ---- Classifier.predict, classify and a saved folder --------------------------------------------

def classifier(enc, name, seed=3):
    task = TASKS[name]()
    return Classifier(model_for(task, seed), enc, task.label_names, task=task, tokenizer_dir=TOKENIZER_DIR)


def expected_answers(clf, examples):
    """What each task's answer must be, from the forward logits (not from the predictor)."""
    task, tok = clf.task, clf.encode
    logits = forward_logits(clf.model, task, tok, examples)
    if task.kind == "single":
        return [clf.label_names[i] for i in logits.argmax(-1)]
    if task.kind == "multilabel":
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        return [[n for n, x, t in zip(clf.label_names, row, task.thresholds) if x >= t] for row in p]
    if task.kind == "regression":
        return logits * np.array(task.target_std) + np.array(task.target_mean)
    return [int(np.argmax(row)) for row in logits]


def write_table(path, task, examples):
    kind = task.inputs.kind
    cols = {"text": ["text"], "pair": ["text", "text_pair"], "similarity": ["text", "text_pair"],
            "choice": ["context", "question", "choices"]}[kind]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in examples:
            if kind == "text":
                w.writerow([e])
            elif kind == "choice":
                w.writerow([e["context"], e.get("question", ""), json.dumps(e["choices"])])
            else:
                w.writerow(list(e))
    return path


@pytest.mark.parametrize("name", list(TASKS))
def test_predict_classify_and_saved_folder_per_task(enc, tmp_path, name, capsys):
    """Classifier.predict answers as the task decides (from the forward logits); the saved and
    loaded folder predicts the same; `jaxcls classify --input table.csv` on it writes the same
    answers. Planted: MultiLabel.decide comparing with 0.5 instead of the thresholds -> fails;
    Regression.probabilities returning the logits (standardisation not undone) -> fails;
    PredictionWriter not cutting choice probabilities to the example's options -> fails; the CSV
    and TSV tables hold docs/predict.md's columns (planted: csv_header giving regression
    `target_` columns; multi-label labels joined by commas instead of JSON) -> fails."""
    clf = classifier(enc, name)
    examples = examples_for(clf.task, 6, seed=5)
    want, probs = clf.predict(examples, batch_size=4, return_probs=True)
    expect = expected_answers(clf, examples)
    if name == "regression":
        np.testing.assert_allclose(want, expect, atol=1e-4)
        assert want.shape == (6, 2) and abs(want[:, 0].mean() - 10) < 4  # near the mean, in target units
    else:
        assert want == expect
    if name == "multilabel":
        assert any("a" in g for g in want) and not any("c" in g for g in want)  # thresholds 0.3 and 0.7 bite
    if name == "choice":
        assert probs.shape == (6, 3) and probs[0, 2] == 0 and np.allclose(probs.sum(-1), 1)
    np.testing.assert_array_equal(clf.predict_proba(examples, batch_size=4), probs)
    folder = clf.save(tmp_path / "model")
    loaded = Classifier.load(folder)
    assert loaded.task == clf.task
    again, probs2 = loaded.predict(examples, batch_size=4, return_probs=True)
    np.testing.assert_allclose(probs2, probs, atol=1e-6)
    assert np.allclose(again, want) if name == "regression" else again == want
    table = write_table(tmp_path / "in.csv", clf.task, examples)
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(folder), "--input", str(table), "--output", str(out),
                 "--batch-size", "4", "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(examples)
    for row, w, p, e in zip(rows, want, probs, examples):
        if name == "single":
            assert row["label"] == w and row["probs"] == pytest.approx(dict(zip(NAMES, p.tolist())), abs=1e-5)
        elif name in ("multilabel", "pair"):
            assert row["labels"] == w and list(row["probs"].values()) == pytest.approx(p.tolist(), abs=1e-5)
        elif name == "regression":
            assert list(row["values"].values()) == pytest.approx(w.tolist(), rel=1e-5, abs=1e-4)
        elif name == "similarity":
            assert row["label"] == w and row["text_pair"] == e[1]
        else:
            assert row["index"] == w and row["probs"] == pytest.approx(p[:len(e["choices"])].tolist(), abs=1e-5)
            assert row["choices"] == e["choices"]
    if name != "single":  # single-label text has its own writer, tested in test_cli_predict
        check_task_table(folder, table, tmp_path, clf, rows)


TABLE_COLUMNS = {  # docs/predict.md's "CSV columns after the inputs", for the classifiers of TASKS
    "multilabel": ["labels", "p_a", "p_b", "p_c"], "pair": ["labels", "p_a", "p_b", "p_c"],
    "regression": ["value_x", "value_y"], "similarity": ["label", "probability", "p_a", "p_b", "p_c"],
    "choice": ["index", "probability", "probs"],
}
INPUT_COLUMNS = {"text": ["text"], "pair": ["text", "text_pair"], "similarity": ["text", "text_pair"],
                 "choice": ["context", "question", "choices"]}


def check_task_table(folder, table, tmp_path, clf, jsonl_rows):
    """`classify --output .csv` and `.tsv` for a task: the documented columns, inputs first, and
    the answers the JSONL output gave (lists as JSON)."""
    name = next(k for k, make in TASKS.items() if make() == clf.task)
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        out = tmp_path / f"out{suffix}"
        assert main(["classify", "--model", str(folder), "--input", str(table), "--output", str(out),
                     "--batch-size", "4", "--quiet"]) == 0
        with open(out, newline="", encoding="utf-8") as f:
            header, *rows = list(csv.reader(f, delimiter=delimiter))
        assert header == INPUT_COLUMNS[clf.task.inputs.kind] + TABLE_COLUMNS[name], (suffix, header)
        assert len(rows) == len(jsonl_rows)
        for row, want in zip(rows, jsonl_rows):
            got = dict(zip(header, row))
            if "labels" in got:
                assert json.loads(got["labels"]) == want["labels"]
            if "probs" in got:
                assert json.loads(got["probs"]) == pytest.approx(want["probs"], abs=1e-5)
                assert json.loads(got["choices"]) == want["choices"] and int(got["index"]) == want["index"]
            if "value_x" in got:
                assert [float(got["value_x"]), float(got["value_y"])] == pytest.approx(
                    list(want["values"].values()), rel=1e-5)
            if "p_a" in got:
                assert [float(got[f"p_{n}"]) for n in NAMES] == pytest.approx(list(want["probs"].values()), abs=1e-5)


def test_classify_progress_counts_examples_for_tasks_of_several_fields(enc, tmp_path, capsys, monkeypatch):
    """The progress bar (drawn on stderr, docs/predict.md) and summary of a pair model's `classify
    --input` say "examples", a text model's "texts". Planted: the bar's unit fixed to "texts" (as
    it was) -> fails; the bar disabled (the summary alone held "3 examples") -> fails."""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws the bar as on a terminal
    for name, unit in (("pair", "examples"), ("single", "texts")):
        clf = classifier(enc, name)
        examples = examples_for(clf.task, 3, seed=2)
        folder = clf.save(tmp_path / name)
        table = write_table(tmp_path / f"{name}.csv", clf.task, examples)
        capsys.readouterr()
        assert main(["classify", "--model", str(folder), "--input", str(table), "--output",
                     str(tmp_path / f"{name}.jsonl")]) == 0
        err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err)
        other = "texts" if unit == "examples" else "examples"
        assert f"3 {unit}" in err and f"3 {other}" not in err, err
        assert f"classified 3 {unit} from {table}" in err
        bar = [line for line in err.splitlines() if line.startswith("classifying")]  # on stderr, drawn
        assert bar and "━" in bar[-1] and f"3 {unit}" in bar[-1], err


def test_classify_usage_errors_per_task(enc, tmp_path, capsys):
    """One line, exit 2. Planted: the TEXT-argument check removed -> a pair model classifies
    lone texts and the encoder's message names a missing text_pair instead -> fails; records.flag_of
    spelling text_pair's flag --text-pair-column (as it did) -> fails."""
    folder = classifier(enc, "pair").save(tmp_path / "pair")
    cases = [(["a text"], "the pair-multilabel task takes examples of several fields: give --input FILE"),
             (["--input", str(tmp_path / "x.csv"), "--top-k", "2"], "--top-k ranks single-label probabilities"),
             (["--input", str(tmp_path / "x.csv"), "--long", "sliding"], "--long sliding averages windows")]
    (tmp_path / "x.csv").write_text("text,other\nhello,there\n")
    for argv, message in cases:
        assert main(["classify", "--model", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["classify", "--model", str(folder), "--input", str(tmp_path / "x.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "x.csv: line 2: no column 'text_pair'" in err and err.count("\n") == 1, err
    assert "(choose one with --pair-column)" in err, err  # the flag's real name
    assert main(["classify", "--model", str(folder), "--input", str(tmp_path / "x.csv"),
                 "--pair-column", "other", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["text_pair"] == "there"


def test_eval_takes_the_column_flags_and_names_them(enc, tmp_path, capsys):
    """`jaxcls eval` on a pair table whose second text is in column `other`: without a flag one line
    naming --pair-column (exit 2), with `--pair-column other` the report of Classifier.evaluate.
    Planted: eval's _task_columns ignoring the new flags (only --text/--label-column) -> exit 2 -> fails."""
    clf = classifier(enc, "pair")
    folder = clf.save(tmp_path / "pair")
    table = tmp_path / "t.csv"
    table.write_text('text,other,label\nthe cat,sat down,"[""a""]"\nfree cash,call now,"[""b"", ""c""]"\n')
    assert main(["eval", "--model", str(folder), "--data", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no column 'text_pair'" in err and "(choose one with --pair-column)" in err, err
    assert main(["eval", "--model", str(folder), "--data", str(table), "--pair-column", "other", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    data = [{"text": "the cat", "text_pair": "sat down"}, {"text": "free cash", "text_pair": "call now"}]
    from jaxcls.data import TextDataset
    want = clf.evaluate(TextDataset(("the cat", "free cash"), np.array([[1, 0, 0], [0, 1, 1]], np.float32),
                                    clf.label_names, "t", tuple(data)))
    assert got["n"] == 2 and got["micro_f1"] == pytest.approx(want["micro_f1"])
