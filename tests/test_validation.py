"""Input validation of saved classifiers and of texts: a delta save whose base checkpoint changed,
a folder missing one of its files, and a text that spells GPT-2's special token."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE, requires_shared
from jaxcls.ckpt.folder import META, WEIGHTS, base_weight_files
from jaxcls.fileio import sha256_files
from jaxcls.classifier import Classifier
from jaxcls.errors import CheckpointError
from jaxcls.tokenizer import PAD_ID

pytestmark = requires_shared

TEXTS = ["Free entry in a weekly comp to win cup final tickets", "Are we still on for lunch?",
         "WINNER!! claim your prize now", "see you at 6", "URGENT call now to claim", "ok thanks"] * 2
LABELS = ["spam", "ham", "spam", "ham", "spam", "ham"] * 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A classifier trained 2 steps on a writable copy of the tiny fixture, saved as a delta."""
    root = tmp_path_factory.mktemp("validation")
    base = root / "base"
    shutil.copytree(FIXTURE / "openai", base)
    for f in base.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IWUSR)
    clf = Classifier.from_pretrained(base, label_names=["ham", "spam"])
    clf.fit((TEXTS, LABELS), epochs=1, max_steps=2, batch_size=4, lr=1e-3, log=lambda s: None)
    out = clf.save(root / "clf")
    return {"root": root, "base": base, "clf": clf, "dir": out}


def copy_of(saved, name: str) -> Path:
    dest = saved["root"] / name
    shutil.copytree(saved["dir"], dest)
    return dest


def test_delta_save_reloads_with_an_intact_base(saved):
    loaded = Classifier.load(saved["dir"])
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS[:4]), saved["clf"].predict_proba(TEXTS[:4]))


def test_changed_base_checkpoint_names_both_hashes(saved, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(saved["base"], base)
    for f in base.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IWUSR)
    data = base / "model.ckpt.data-00000-of-00001"
    buf = bytearray(data.read_bytes())
    buf[len(buf) // 2] ^= 0x01
    data.write_bytes(bytes(buf))
    recorded = sha256_files(base_weight_files(saved["base"], "openai"))
    now = sha256_files(base_weight_files(base, "openai"))
    assert recorded != now
    with pytest.raises(CheckpointError) as e:
        Classifier.load(saved["dir"], base=base)
    msg = str(e.value)
    assert recorded[:16] in msg and now[:16] in msg, msg
    assert str(base) in msg and "different base checkpoint" in msg


def test_changed_base_at_its_recorded_path_is_refused(saved):
    """The same, through the absolute path classifier.json records (no base= override)."""
    data = saved["base"] / "model.ckpt.data-00000-of-00001"
    original = data.read_bytes()
    try:
        data.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))
        with pytest.raises(CheckpointError, match="sha256"):
            Classifier.load(saved["dir"])
    finally:
        data.write_bytes(original)


def test_missing_base_checkpoint_says_where_it_was_expected(saved, tmp_path):
    """The message names the folder looked in and both ways to point elsewhere. Fails if it names
    only the Python argument (planted: the old "pass base=..." message)."""
    with pytest.raises(CheckpointError, match=r"needs its base checkpoint .*not at") as e:
        Classifier.load(saved["dir"], base=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "--base DIR" in msg and "base=DIR" in msg


def test_cli_base_finds_a_moved_base_checkpoint(saved, tmp_path, capsys):
    """classify and eval load a delta classifier whose base checkpoint moved, given --base; without
    it the error names --base. Fails if --base is not passed to Classifier.load (planted:
    `Classifier.load(args.model)` in jaxcls.cli.common.load_classifier)."""
    from jaxcls.cli import main

    folder = copy_of(saved, "moved-base")
    meta = json.loads((folder / META).read_text())
    meta["base"]["path"] = str(tmp_path / "moved-away")
    (folder / META).write_text(json.dumps(meta))
    assert main(["classify", "--model", str(folder), *TEXTS[:2]]) == 2
    err = capsys.readouterr().err
    assert "moved-away" in err and "--base DIR" in err and err.count("\n") == 1

    out = tmp_path / "pred.jsonl"
    assert main(["classify", "--model", str(folder), "--base", str(saved["base"]), "--output", str(out),
                 "--quiet", *TEXTS[:4]]) == 0
    probs = [list(json.loads(line)["probs"].values()) for line in out.read_text().splitlines()]
    np.testing.assert_allclose(probs, saved["clf"].predict_proba(TEXTS[:4]), atol=1e-5)

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(TEXTS, LABELS)))
    assert main(["eval", "--model", str(folder), "--base", str(saved["base"]), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == len(TEXTS)
    expected = saved["clf"].predict(TEXTS)
    assert report["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(expected, LABELS)]))


@pytest.mark.parametrize("missing", [WEIGHTS, META])
def test_saved_folder_missing_a_file(saved, missing):
    folder = copy_of(saved, f"without-{missing}")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")) as e:
        Classifier.load(folder)
    assert "not found" in str(e.value)


def test_saved_weights_truncated_or_not_a_classifier(saved):
    folder = copy_of(saved, "truncated")
    (folder / WEIGHTS).write_bytes((saved["dir"] / WEIGHTS).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=WEIGHTS):
        Classifier.load(folder)
    (folder / META).write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a jaxcls classifier"):
        Classifier.load(folder)


def test_the_text_endoftext_is_ordinary_text_not_padding(saved):
    clf = saved["clf"]
    ids = clf.encode("<|endoftext|>")
    assert PAD_ID not in ids and len(ids) > 1  # spelled out in ordinary tokens
    assert clf.tokenizer.decode(ids) == "<|endoftext|>"
    only = clf.predict_proba(["<|endoftext|>"])
    mixed = clf.predict_proba(["<|endoftext|>" * 3, "<|endoftext|>", "hello"])
    assert only.shape == (1, 2) and np.all(np.isfinite(only)) and np.allclose(only.sum(-1), 1, atol=1e-6)
    np.testing.assert_allclose(mixed[1], only[0], atol=1e-6)
    assert not np.allclose(mixed[0], only[0])  # a different text, not collapsed to "all padding"
    assert clf.predict(["<|endoftext|>"])[0] in ("ham", "spam")
