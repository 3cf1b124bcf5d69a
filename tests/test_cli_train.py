"""End to end: `jaxcls train` on the tiny fixture and the SMS data; saving and loading; the book's rows."""

import csv
import importlib.util
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURE, SMS, TOKENIZER_DIR, requires_shared, write_sms_csv
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.data import load_sms_spam

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

pytestmark = requires_shared


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--checkpoint", str(FIXTURE / "openai"), "--data", "sms-spam", "--data-path", str(SMS),
               "--epochs", "2", "--eval-freq", "10", "--lr", "2e-3", "--trainable", "last_block",
               "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_train_writes_everything_and_loss_falls(trained):
    for name in ("classifier.json", "weights.safetensors", "metrics.json", "metrics.jsonl", "encoder.json", "vocab.bpe"):
        assert (trained / name).is_file(), name
    rows = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) >= 5 and np.mean(losses[-3:]) < np.mean(losses[:3])
    m = json.loads((trained / "metrics.json").read_text())
    assert {k: v["n"] for k, v in m["splits"].items()} == {"train": 1045, "validation": 149, "test": 300}
    assert m["trainable_params"] < m["total_params"] and m["wall_time_s"] > 0
    assert np.array(m["splits"]["test"]["confusion_matrix"]).sum() == 300
    assert set(m["splits"]["test"]["per_class"]) == {"ham", "spam"}


def test_curves_are_drawn_and_a_run_too_short_to_evaluate_warns_nothing(trained, tmp_path):
    """`train --out` draws loss.png and accuracy.png (matplotlib is in the bench extra CI installs);
    a run whose metrics hold only training losses draws both without matplotlib's "no artists with
    labels" warning. Fails if the curves are not written (planted: `plot_curves` returning None
    first) and if the empty legend is still asked for (planted: the `if` before ax.legend removed)."""
    import warnings

    from jaxcls.cli.train import plot_curves

    pytest.importorskip("matplotlib")
    for name in ("loss.png", "accuracy.png"):
        assert (trained / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "examples_seen": 8 * i, "train_loss": 1.0 / i}) + "\n" for i in (1, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(tmp_path) == tmp_path / "loss.png"
    assert {p.name for p in tmp_path.glob("*.png")} == {"loss.png", "accuracy.png"}


def test_saved_delta_holds_only_trained_weights_and_reloads(trained):
    keys = set(load_file(str(trained / "weights.safetensors")))
    assert keys and all(k.startswith(("h/1/", "ln_f/", "head/")) for k in keys)
    meta = json.loads((trained / "classifier.json").read_text())
    assert meta["saved"] == "delta" and len(meta["base"]["sha256"]) == 64
    clf = Classifier.load(trained)
    m = json.loads((trained / "metrics.json").read_text())
    test = load_sms_spam(SMS, progress=False).test
    report = clf.evaluate(test)
    assert report["accuracy"] == pytest.approx(m["splits"]["test"]["accuracy"])
    assert report["confusion_matrix"] == m["splits"]["test"]["confusion_matrix"]


def test_classifier_api_save_load_reproduces_logits(tmp_path):
    splits = load_sms_spam(SMS, progress=False)
    small = splits.__class__(splits.train.__class__(splits.train.texts[:64], splits.train.labels[:64],
                                                    splits.label_names, "train"),
                             None, None, splits.label_names)
    clf = Classifier.from_pretrained(FIXTURE / "hf", label_names=("ham", "spam"), trainable="last_two_blocks")
    clf.fit(small, epochs=1, eval_freq=4, eval_iter=1, lr=1e-3, progress=False, log=lambda s: None)
    for full in (False, True):
        clf.save(tmp_path / str(full), full=full)
        again = Classifier.load(tmp_path / str(full))
        ids = jnp.asarray([[31373, 995, 11, 428, 318, 257], [40, 716, 407, 50256, 50256, 50256]])
        lengths = jnp.asarray([6, 3])
        np.testing.assert_array_equal(np.asarray(again.model(ids, lengths)), np.asarray(clf.model(ids, lengths)))
        assert again.label_names == ("ham", "spam")


def test_random_init_saves_full_weights(tmp_path):
    clf = Classifier.from_pretrained("tiny", label_names=("a", "b"), weights="random", tokenizer=TOKENIZER_DIR)
    clf.save(tmp_path)
    assert json.loads((tmp_path / "classifier.json").read_text())["saved"] == "full"
    assert "wte/embedding" in load_file(str(tmp_path / "weights.safetensors"))


def _book_script():
    spec = importlib.util.spec_from_file_location("reproduce_book", ROOT / "scripts" / "reproduce_book.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _book_csv(tmp_path, n=40):
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][:n]
    data = tmp_path / "sms.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    return data


# The book's table (rasbt/LLMs-from-scratch, ch06/02_bonus_additional-experiments), one row each:
# model, weights, pooled token, trainable layers, padding, batch size x accumulation, causal mask,
# LoRA (rank, alpha). Written from the book, not from the script, so that the script is checked.
BOOK_TABLE = {
    1: ("gpt2-small", "pretrained", "last", "last_block", "longest", 8, 1, True, None),
    2: ("gpt2-small", "pretrained", "first", "last_block", "longest", 8, 1, True, None),
    3: ("gpt2-small", "pretrained", "last", "head", "longest", 8, 1, True, None),
    4: ("gpt2-small", "pretrained", "last", "last_two_blocks", "longest", 8, 1, True, None),
    5: ("gpt2-small", "pretrained", "last", "all", "longest", 8, 1, True, None),
    6: ("gpt2-medium", "pretrained", "last", "last_block", "longest", 8, 1, True, None),
    7: ("gpt2-large", "pretrained", "last", "last_block", "longest", 8, 1, True, None),
    8: ("gpt2-xl", "pretrained", "last", "last_block", "longest", 8, 1, True, None),
    9: ("gpt2-xl", "pretrained", "last", "all", "longest", 8, 1, True, None),
    10: ("gpt2-small", "random", "last", "all", "longest", 8, 1, True, None),
    11: ("gpt2-small", "pretrained", "last", "lora", "longest", 8, 1, True, (16, 16.0)),
    12: ("gpt2-xl", "pretrained", "last", "lora", "longest", 8, 1, True, (16, 8.0)),
    13: ("gpt2-small", "pretrained", "last", "last_block", "context", 8, 1, True, None),
    14: ("gpt2-small", "pretrained", "last", "last_block", "none", 1, 1, True, None),
    15: ("gpt2-small", "pretrained", "last", "last_block", "none", 1, 8, True, None),
    16: ("gpt2-small", "pretrained", "last_real", "last_block", "longest", 8, 1, True, None),
    17: ("gpt2-small", "pretrained", "last", "last_block", "longest", 8, 1, False, None),
    18: ("gpt2-small", "pretrained", "last", "last_block", "longest", 8, 1, True, None),  # ignore_index: = row 1
    19: ("gpt2-small", "pretrained", "mean", "last_block", "longest", 8, 1, True, None),
}


def test_every_book_row_reaches_fit_with_the_books_settings(tmp_path, monkeypatch):
    """Each of the 19 rows, with the script's own defaults, reaches `fit` with the book's settings
    (nothing is trained: fit is replaced by a recorder; every size maps to the tiny fixture).
    Fails if a row's setting is lost on its way to fit (planted: row_config's overrides merged
    as {**ROWS[row][1], **BOOK}: row 2 pools the last token, not the first)."""
    import jaxcls.train
    from jaxcls.data import encode_texts, load_data, resolve_pad_length

    book = _book_script()
    assert sorted(book.ROWS) == sorted(BOOK_TABLE)
    args = book.parse_args(["--data", str(_book_csv(tmp_path))])
    splits = load_data(args.data, progress=False)
    real_from_pretrained = Classifier.from_pretrained.__func__
    seen = {}

    def from_pretrained(cls, path_or_name, *a, **kw):
        seen["checkpoint"], seen["weights"] = str(path_or_name), kw.get("weights", "pretrained")
        return real_from_pretrained(cls, FIXTURE / "openai", *a, **kw)

    class Reached(Exception):
        pass

    def fit(model, encode, splits, cfg, **kw):
        seen["model"], seen["encode"], seen["cfg"] = model, encode, cfg
        raise Reached

    monkeypatch.setattr(Classifier, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(jaxcls.train, "fit", fit)
    pretrained_wte = None
    for row, (size, weights, pooling, trainable, padding, batch, accum, causal, lora) in BOOK_TABLE.items():
        seen.clear()
        with pytest.raises(Reached):
            book.run_row(row, args, splits)
        model, cfg = seen["model"], seen["cfg"]
        got = dict(checkpoint=seen["checkpoint"], weights=seen["weights"], pooling=model.pooling,
                   trainable=cfg.trainable, padding=cfg.resolved_padding(model.pooling), batch=cfg.batch_size,
                   accumulation=cfg.accumulation, causal=model.config.causal,
                   lora=(model.config.lora_rank, model.config.lora_alpha) if model.config.lora_rank else None)
        want = dict(checkpoint=size, weights=weights, pooling=pooling, trainable=trainable, padding=padding,
                    batch=batch, accumulation=accum, causal=causal, lora=lora)
        assert got == want, f"row {row}"
        # the chapter's run otherwise: 5 epochs, AdamW 5e-5 / 0.1, evaluation every 50 steps on 5
        # batches, the last partial batch dropped, seed 123, no dropout, float32, no step limit
        assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.eval_freq, cfg.eval_iter, cfg.drop_last, cfg.seed,
                cfg.max_steps) == (5, 5e-5, 0.1, 50, 5, True, 123, None), f"row {row}"
        assert (model.config.dropout, model.config.dtype) == (0.0, "float32"), f"row {row}"
        # the context length each row pads to: the longest training text, or the model's context
        n_ctx = model.config.n_ctx
        seqs = encode_texts(seen["encode"], splits.train.texts, n_ctx)[0]
        pad = resolve_pad_length(padding, seqs, n_ctx) if padding != "none" else None
        assert pad == {"longest": max(map(len, seqs)), "context": n_ctx, "none": None}[padding], f"row {row}"
        wte = np.asarray(model.wte.embedding[...])
        if pretrained_wte is None:
            pretrained_wte = wte
        assert np.array_equal(wte, pretrained_wte) == (weights == "pretrained"), f"row {row}: weights"


def test_book_rows_only_the_script_trains_run_on_the_tiny_fixture(tmp_path, capsys):
    """Trains (2 steps) the rows whose fit path no other test trains: the book's literal last-token
    pooling at fixed padding (1), random weights from a checkpoint folder (10), padding to the
    context length (13), and no padding at batch 1, with and without accumulation (14, 15). The
    other rows differ from these only in settings the test above checks reach fit. Each printed
    accuracy is k/n of its split's size n: computed, not copied. Fails if a row reports anything
    but the accuracy (planted: 100 * (1 - loss) in run_row) or padding 'none' keeps pooling 'last'
    (planted: the switch to last_real in fit skipped)."""
    from jaxcls.data import load_data

    rows = "1,10,13-15"

    data = _book_csv(tmp_path)
    n = {name: len(getattr(load_data(str(data), progress=False), name)) for name in ("train", "validation", "test")}
    book = _book_script()
    out = tmp_path / "table.md"
    assert book.main(["--rows", rows, "--checkpoint", str(FIXTURE / "openai"), "--data", str(data),
                      "--epochs", "1", "--max-steps", "2", "--out", str(out)]) == 0
    printed = re.findall(r"^row +(\d+): train (\S+)%  val (\S+)%  test (\S+)%", capsys.readouterr().out, re.M)
    assert [int(r[0]) for r in printed] == book.parse_rows(rows)
    table = out.read_text()
    for row, *accs in printed:
        for split, acc in zip(("train", "validation", "test"), accs):
            assert any(f"{100 * k / n[split]:.2f}" == acc for k in range(n[split] + 1)), (row, split, acc, n)
        assert f"| {row} | {book.ROWS[int(row)][0]} | {accs[0]}% / {accs[1]}% / {accs[2]}% |" in table


def test_distributed_flag_joins_the_detected_job(tmp_path):
    """--distributed reaches jax.distributed.initialize() with no arguments; with no cluster to
    detect here it stops with a message saying what to pass instead."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "jaxcls", "train", "--distributed", "--checkpoint", "tiny",
                        "--weights", "random", "--data", str(write_sms_csv(tmp_path / "sms.csv", 60)), "--out", str(tmp_path / "o")],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pass --coordinator HOST:PORT" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "o").exists()


def test_coordinator_flags_reach_the_distributed_start(tmp_path, monkeypatch):
    """`--coordinator HOST:PORT --num-processes N --process-id I` (README's multi-host command) join
    the job with exactly those, before any data is read. Fails if a flag is dropped (planted:
    `distributed.initialize(args.coordinator, args.num_processes, None)`)."""
    from jaxcls.train import distributed

    class Joined(Exception):
        pass

    def initialize(*args):
        raise Joined(args)

    monkeypatch.setattr(distributed, "initialize", initialize)
    with pytest.raises(Joined) as e:
        main(["train", "--checkpoint", "tiny", "--weights", "random", "--data", str(tmp_path / "none.csv"),
              "--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "2",
              "--out", str(tmp_path / "o")])
    assert e.value.args[0] == ("10.0.0.1:1234", 4, 2)


def test_only_process_0_writes_the_classifier_and_metrics(tmp_path, monkeypatch):
    """docs/scaling.md: process 0 writes --out. A process that is not process 0 trains and exits
    0 without clearing, or writing the classifier, weights or metrics.json into, the folder.
    Fails if the CLI's guard goes (planted: `if not is_main_process(): return 0` removed). The
    loop's own guards (metrics.jsonl, the log) need a real second process and are not covered."""
    from jaxcls.train import distributed

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # process 0's, from an earlier run: not ours to clear
    assert main(["train", "--checkpoint", "tiny", "--weights", "random", "--tokenizer", str(TOKENIZER_DIR),
                 "--data", str(write_sms_csv(tmp_path / "sms.csv", 40)), "--max-steps", "1",
                 "--batch-size", "4", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "metrics.json").read_text() == "{}"
    assert not (out / "classifier.json").exists() and not (out / "weights.safetensors").exists()


def _subcommands():
    import argparse

    from jaxcls.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_has_help_text_and_its_default(capsys):
    """`COMMAND --help` describes every option and shows each set default. Fails if a TrainConfig
    field has no help (planted: "epochs" dropped from GROUPS) or defaults are not appended
    (planted: HelpFormatter returning the bare help)."""
    import argparse

    from jaxcls.cli.common import HelpFormatter

    parser, commands = _subcommands()
    assert set(commands) >= {"download", "generate", "train", "classify", "eval", "serve"}
    for name, p in commands.items():
        formatter = HelpFormatter(name)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            flag = f"{name} {action.option_strings or action.dest}"
            assert action.help, f"{flag} has no help text"
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default is not None and action.default is not False:
                assert "default" in shown.lower(), f"{flag}: its default {action.default!r} is not shown"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model:", "training loop:", "output:"):
        assert f"\n{group}\n" in text, group
    for flag, default in (("--epochs", "5"), ("--batch-size", "8"), ("--lr", "5e-05"), ("--seed", "123")):
        block = text[text.index(f"  {flag} "):]
        assert f"(default: {default})" in " ".join(block[:400].split()), flag


def test_top_level_help_is_for_users(capsys):
    """Fails if `jaxcls --help` prints the module docstring (planted: description=__doc__)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "reads argv" not in text and "jaxcls train" in text and "--model" in text


@pytest.mark.parametrize("argv, hint", [
    (["classify", "--model", "m", "--checkpoint", "gpt2-small", "hi"], "is --model DIR"),
    (["eval", "--checkpoint", "runs/x", "--data", "d.csv"], "is --model DIR"),
    (["serve", "--checkpoint", "runs/x"], "is --model DIR"),
    (["train", "--model", "runs/x"], "is --checkpoint"),
    (["generate", "--model", "runs/x", "hi"], "is --checkpoint"),
    (["train", "--output", "runs/x"], "is --out DIR"),
    (["classify", "--model", "m", "--out", "p.jsonl", "hi"], "--output FILE"),
])
def test_a_flag_of_another_subcommand_gets_a_hint(argv, hint, capsys):
    """--checkpoint (a GPT-2) vs --model (a trained classifier), --out (a run folder) vs --output (a
    predictions file): the wrong one stops with one line naming the right one. Fails without the
    WrongFlag traps (planted: wrong_flag a no-op): argparse then errors generically, or takes
    classify's --out as an abbreviation of --output."""
    from jaxcls.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    wrong = next(a for a in argv if a in ("--checkpoint", "--model", "--output", "--out") and
                 not (a == "--model" and argv[0] in ("classify", "eval", "serve")))
    assert err.count("\n") == 1 and err.startswith(f"jaxcls {argv[0]}: error: {wrong} ") and hint in err, err


def test_abbreviated_flags_are_refused(capsys):
    """`--epoch 3` is not taken for `--epochs 3`: a prefix would change meaning the day another flag
    shares it. Fails with argparse's default allow_abbrev=True (planted)."""
    from jaxcls.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--data", "sms", "--epoch", "3"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


def _documented_commands():
    """Every `jaxcls ...` command line in the fenced blocks of README.md and docs/*.md, and in
    their indented code blocks (four spaces)."""
    import re
    import shlex

    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        fenced, lines = False, []
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced or re.match(r"    (?:\$ )?jaxcls ", line):
                lines.append(line)
            elif lines:
                lines.append("")
        for line in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines():
            m = re.match(r"\s*(?:\$ )?(?:.*\| )?(?:\.venv/bin/)?jaxcls (.*)", line)
            if m:
                words = shlex.split(m.group(1), comments=True)
                cut = min((words.index(s) for s in ("&&", "|", ">", "...") if s in words), default=len(words))
                yield f"{doc.name}: jaxcls {m.group(1)}", words[:cut]


def test_documented_commands_parse():
    """Each command README.md and docs/ show still parses. Fails if a documented flag is renamed
    or removed (planted: eval's --json renamed --as-json), including the commands of indented
    code blocks (planted: only fenced blocks read: README's multi-label command is missed)."""
    from jaxcls.cli import build_parser

    commands = list(_documented_commands())
    assert len(commands) >= 15 and any(w[0] == "eval" for _, w in commands)
    assert any("--thresholds" in w for _, w in commands)  # README's indented multi-label command
    for where, words in commands:
        try:
            build_parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"{where} does not parse")
