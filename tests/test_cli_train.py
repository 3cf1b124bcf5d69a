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

from conftest import FIXTURE, SMS, TOKENIZER_DIR, requires_shared
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
    Fails if a row's setting is dropped on its way to fit (planted: causal=cfg.causal removed
    from run_row's from_pretrained call: row 17 keeps the causal mask)."""
    import jaxcls.fit
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
    monkeypatch.setattr(jaxcls.fit, "fit", fit)
    pretrained_wte = None
    for row, (size, weights, pooling, trainable, padding, batch, accum, causal, lora) in BOOK_TABLE.items():
        seen.clear()
        with pytest.raises(Reached):
            book.run_row(row, args, splits)
        model, cfg = seen["model"], seen["cfg"]
        got = dict(checkpoint=seen["checkpoint"], weights=seen["weights"], pooling=model.pooling,
                   trainable=cfg.trainable, padding=cfg.resolved_padding(), batch=cfg.batch_size,
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


def _small_csv(tmp_path, n=60):
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][:n]
    path = tmp_path / "sms.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    return path


def test_data_parallel_training_equals_single_device(tmp_path):
    """`--data-parallel` over 2 forced host devices ends with the single-device weights."""
    import subprocess

    data = _small_csv(tmp_path)
    outs = {}
    for name, flags, env in (("single", [], {}),
                             ("dp", ["--data-parallel"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "jaxcls", "train", "--checkpoint", str(FIXTURE / "openai"), "--data", str(data),
               "--epochs", "2", "--eval-freq", "5", "--lr", "1e-3", "--out", str(out), "--quiet", *flags]
        r = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[name] = load_file(str(out / "weights.safetensors"))
    for k, v in outs["single"].items():
        got = outs["dp"][k]
        if k.endswith("attn/c_attn/bias"):
            # The key bias has an exactly zero gradient (it shifts every score of a query by the
            # same q.b); Adam turns the float noise it gets into steps of up to lr, in any order.
            n = v.shape[0] // 3
            np.testing.assert_allclose(np.abs(got[n:2 * n] - v[n:2 * n]).max(), 0, atol=3e-2)
            got, v = np.delete(got, np.s_[n:2 * n]), np.delete(v, np.s_[n:2 * n])
        np.testing.assert_allclose(got, v, atol=1e-5, err_msg=k)


def test_distributed_flag_joins_the_detected_job(tmp_path):
    """--distributed reaches jax.distributed.initialize() with no arguments; with no cluster to
    detect here it stops with a message saying what to pass instead."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "jaxcls", "train", "--distributed", "--checkpoint", "tiny",
                        "--weights", "random", "--data", str(_small_csv(tmp_path)), "--out", str(tmp_path / "o")],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pass --coordinator HOST:PORT" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "o").exists()
