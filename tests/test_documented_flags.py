"""Train flags and task behaviours that README.md and docs/tasks.md promise and no other test held:
each through `jaxcls train` (or `Classifier.load`) on the tiny model, as a user runs it."""

import json
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import FIXTURE, TOKENIZER_DIR, requires_shared, write_sms_csv
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import TINY_SIZES
from jaxcls.model import GPT2Classifier, path_str

RANDOM = ["--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR)]
WORDS = "apple river castle the a of to and in is was for on with".split()


def train(tmp_path, data, *flags, model=RANDOM, out="run"):
    out = tmp_path / out
    rc = main(["train", *model, "--data", str(data), "--epochs", "1", "--batch-size", "4", "--max-steps", "2",
               "--out", str(out), "--quiet", *flags])
    return rc, out


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@requires_shared
def test_save_full_saves_every_weight(tmp_path):
    """`--save-full` over a pretrained checkpoint writes every weight and no base; without it only
    the trained ones and the base. Fails if the flag does not reach the save (planted:
    `clf.save(out, full=False, ...)` in cli/train.py)."""
    data = write_sms_csv(tmp_path / "sms.csv", 40)
    pretrained = ["--checkpoint", str(FIXTURE / "openai")]
    for flags, saved in (((), "delta"), (("--save-full",), "full")):
        rc, out = train(tmp_path, data, *flags, model=pretrained, out=saved)
        assert rc == 0
        meta = json.loads((out / "classifier.json").read_text())
        keys = set(load_file(str(out / "weights.safetensors")))
        assert meta["saved"] == saved and ("wte/embedding" in keys) == (saved == "full"), (meta["saved"], keys)
        assert (meta["base"] is None) == (saved == "full")


def _count(pattern):
    model = GPT2Classifier(TINY_SIZES["tiny"], 2, rngs=nnx.Rngs(0))
    return sum(int(np.size(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if re.fullmatch(pattern, path_str(p)))


@requires_shared
def test_trainable_takes_a_regex_and_the_books_last_layer_name(tmp_path):
    """`--trainable 'h/1/.*|head/.*'` trains exactly the parameters whose paths match; `last_layer`
    (the book's name) trains what `head` does. Fails if a regex is not taken as one (planted:
    freeze.trainable_pattern returning `head/.*` for it) or the alias is lost (planted:
    `last_layer` dropped from the head case)."""
    data = write_sms_csv(tmp_path / "sms.csv", 40)
    counts = {}
    for name in ("h/1/.*|head/.*", "last_layer", "head"):
        rc, out = train(tmp_path, data, "--trainable", name, out=re.sub(r"\W", "_", name))
        assert rc == 0, name
        counts[name] = json.loads((out / "metrics.json").read_text())["trainable_params"]
    assert counts["h/1/.*|head/.*"] == _count(r"h/1/.*|head/.*") > counts["head"]
    assert counts["last_layer"] == counts["head"] == _count(r"head/.*")


@requires_shared
def test_padding_auto_is_longest_for_last_pooling_and_served_the_same_way(tmp_path):
    """`--pooling last --padding auto` pads each batch to its longest text (README), and a saved
    classifier with a fixed pad length is loaded and served with that padding: its probabilities
    are the model's at that padded length. Fails if auto picks buckets for `last` (planted: the
    `last` case removed from the padding choice) or the pad length is not kept (planted:
    `pad_length=None` in Classifier.load)."""
    data = write_sms_csv(tmp_path / "sms.csv", 40)
    rc, out = train(tmp_path, data, "--pooling", "last", "--padding", "auto", out="auto")
    assert rc == 0 and json.loads((out / "metrics.json").read_text())["padding"] == "longest"
    rc, out = train(tmp_path, data, "--pooling", "last", "--padding", "24", out="fixed")
    assert rc == 0
    clf = Classifier.load(out)
    assert clf.pad_length == 24 and clf.pooling == "last"
    text = "Free entry in 2 a wkly comp"
    ids = clf.encode(text)
    padded = jnp.asarray([ids + [50256] * (24 - len(ids))], jnp.int32)
    want = np.asarray(jax.nn.softmax(clf.model(padded, jnp.asarray([len(ids)])).astype(jnp.float32)))[0]
    np.testing.assert_allclose(clf.predict_proba([text])[0], want, rtol=1e-5, atol=1e-6)


@requires_shared
def test_train_quiet_writes_nothing_to_the_terminal(tmp_path, capsys):
    """README: `--quiet` means no progress bars or summaries on stderr, for train too. Fails if
    the summary table is printed anyway (planted: `if not args.quiet` before print_summary
    removed) or the log lines are (planted: the quiet logger made the printing one)."""
    data = write_sms_csv(tmp_path / "sms.csv", 40)
    capsys.readouterr()
    rc, _ = train(tmp_path, data)
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == "" and captured.out == "", captured


def test_thresholds_tune_without_validation_is_one_line(tmp_path, capsys):
    """docs/tasks.md: `--thresholds tune` needs a validation split. With `--split 0.8,0,0.2` there
    is none: exit 2 and one line saying so (planted: the check removed from fit: tuning on no
    split fails later with a traceback or tunes nothing)."""
    rng = random.Random(0)
    data = jsonl(tmp_path / "ml.jsonl", [{"text": sentence(rng, 5), "label": rng.sample(["x", "y"], rng.randint(0, 2))}
                                         for _ in range(40)])
    capsys.readouterr()
    rc, _ = train(tmp_path, data, "--task", "multilabel", "--thresholds", "tune", "--split", "0.8,0,0.2")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "--thresholds tune picks each label's threshold on the validation split, and there is none" in err


def test_metrics_jsonl_names_each_tasks_primary_metric(tmp_path):
    """docs/tasks.md: each evaluation in metrics.jsonl has `train_acc`/`val_acc` for accuracy
    tasks, else `train_<metric>`/`val_<metric>` (`val_micro_f1`, `val_mse`). Regression with two
    targets also names them label_0, label_1. Fails if the keys are the accuracy ones for every
    task (planted: the metric name fixed to `acc` in the loop's evaluation entry)."""
    rng = random.Random(1)
    cases = {
        "single": ([{"text": sentence(rng, 5), "label": rng.choice(["a", "b"])} for _ in range(40)], "acc"),
        "multilabel": ([{"text": sentence(rng, 5), "label": rng.sample(["x", "y"], rng.randint(0, 2))}
                        for _ in range(40)], "micro_f1"),
        "regression": ([{"text": sentence(rng, 5), "label": [rng.random(), rng.random()]} for _ in range(40)], "mse"),
    }
    for task, (rows, metric) in cases.items():
        rc, out = train(tmp_path, jsonl(tmp_path / f"{task}.jsonl", rows), "--task", task, "--max-steps", "100",
                        "--eval-iter", "1", out=task)
        assert rc == 0, task
        entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [e for e in entries if "val_loss_full" in e]  # the epoch's end
        assert len(epochs) == 1 and f"train_{metric}" in epochs[0] and f"val_{metric}" in epochs[0], (task, epochs)
        if task == "regression":
            assert json.loads((out / "classifier.json").read_text())["label_names"] == ["label_0", "label_1"]


@pytest.mark.parametrize("label, message", [
    ([1.0, 2.0, 3.0], "bad.jsonl: line 21: 3 regression targets in column 'label', where the training data has 2"),
    ("NaN", "bad.jsonl: line 21: column 'label': regression target 'NaN' is not finite"),
])
def test_bad_multi_target_regression_rows_are_named(tmp_path, capsys, label, message):
    """docs/tasks.md: a regression target that is not a finite number, or a row with another number
    of targets, is an error naming the file, line and column (planted: the count check removed
    from labels.targets; isfinite not checked)."""
    rows = [{"text": f"one two {i}", "label": [0.5, 1.5 + i]} for i in range(20)]
    data = jsonl(tmp_path / "bad.jsonl", rows + [{"text": "three", "label": label}])
    capsys.readouterr()
    rc, _ = train(tmp_path, data, "--task", "regression")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_choice_column_flags_name_the_fields(tmp_path, capsys):
    """`--context-column`, `--question-column`, `--choices-column` read a choice file whose columns
    have other names, and a wrong name is one line naming the column and the flag; `jaxcls eval`
    reads the training file with the columns training recorded, and another file with its flags. Fails
    if a flag does not reach the reader (planted: `context_column` dropped where splits.py builds
    the names)."""
    rng = random.Random(2)
    rows = [{"story": sentence(rng, 4), "ask": "which?", "opts": ["apple", "river", "castle"][:rng.randint(2, 3)],
             "answer": 0} for _ in range(24)]
    data = jsonl(tmp_path / "choice.jsonl", rows)
    flags = ["--task", "choice", "--context-column", "story", "--question-column", "ask",
             "--choices-column", "opts", "--label-column", "answer"]
    rc, out = train(tmp_path, data, *flags)
    assert rc == 0 and json.loads((out / "metrics.json").read_text())["splits"]["train"]["n"] > 0
    capsys.readouterr()
    rc, _ = train(tmp_path, data, *flags[:2], "--context-column", "nope", *flags[4:], out="bad")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no column 'nope'" in err and "--context-column" in err, err
    # eval reads the training file with the columns training recorded; another file takes flags
    assert main(["eval", "--model", str(out), "--data", str(data), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    renamed = jsonl(tmp_path / "renamed.jsonl", [{"c": r["story"], "q": r["ask"], "o": r["opts"], "answer": r["answer"]}
                                                 for r in rows])
    assert main(["eval", "--model", str(out), "--data", str(renamed), "--context-column", "c",
                 "--question-column", "q", "--choices-column", "o", "--label-column", "answer", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == want["n"] == len(rows) and got["accuracy"] == want["accuracy"]


def test_pair_cuts_are_logged_and_counted_and_too_short_a_length_is_refused(tmp_path, capsys):
    """docs/tasks.md: the training log says how many examples were cut and which part, and
    metrics.json has each split's `truncated` count; a length below the delimiter plus 2 tokens is
    a ConfigError (one line, exit 2). Fails if the log line is dropped (planted: the `log` call in
    batches.encode_split removed) or the count is not reported; the padding step's own line says
    examples, not texts, for a pair (planted: the noun fixed to texts, as it was)."""
    rng = random.Random(3)
    rows = [{"text": sentence(rng, 30 if i % 2 else 3), "text_pair": sentence(rng, 30 if i % 3 == 0 else 3),
             "label": rng.choice(["yes", "no"])} for i in range(24)]
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    capsys.readouterr()
    rc = main(["train", *RANDOM, "--data", str(data), "--task", "pair", "--padding", "16", "--split", "1,0,0",
               "--epochs", "1", "--batch-size", "4", "--max-steps", "1", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr()
    logs = printed.out + printed.err
    assert rc == 0
    cut_first = sum(1 for i in range(24) if i % 2)
    cut_second = sum(1 for i in range(24) if i % 3 == 0)
    cut_any = sum(1 for i in range(24) if i % 2 or i % 3 == 0)
    line = (f"pairs.jsonl:train of 1.0,0.0,0.0: {cut_any} of 24 examples cut to 16 tokens (text cut in "
            f"{cut_first} rows, text_pair in {cut_second})")
    assert line in logs and f"train: {cut_any} of 24 examples truncated to 16 tokens" in logs, logs
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["splits"]["train"]["truncated"] == cut_any
    rc = main(["train", *RANDOM, "--data", str(data), "--task", "pair", "--padding", "2", "--out",
               str(tmp_path / "short"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "max_length 2 leaves no room for two parts" in err, err
