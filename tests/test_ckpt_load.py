"""jaxcls.ckpt: a released size is never downloaded when download=False, a delta classifier's base
checkpoint is hashed once per version of its files, and the saved-classifier folder goes through the
same strict tensor matcher as the checkpoints (every error names the file and the tensor)."""

from __future__ import annotations

import os
import shutil
import stat
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import jaxcls
import jaxcls.download
from conftest import FIXTURE, requires_shared
from jaxcls.ckpt import download as ckpt_download
from jaxcls.ckpt import folder as saved_folder
from jaxcls.ckpt.folder import HASH_CACHE, META, WEIGHTS
from jaxcls.ckpt.load import read_checkpoint, resolve_checkpoint_dir
from jaxcls.ckpt.openai import OPENAI_FILES
from jaxcls.classifier import Classifier
from jaxcls.errors import CheckpointError
from jaxcls.tokenizer import tokenizer_from_folder

LABELS = ["ham", "spam"]
TEXTS = ["Free entry in a weekly comp", "see you at 6", "WINNER!! claim now"]
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty cache home, and a failed test for any attempt to download."""
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "home"))

    def refuse(*args, **kwargs):
        pytest.fail(f"a download was attempted: {args}")

    monkeypatch.setattr(jaxcls.download, "download_file", refuse)
    monkeypatch.setattr(ckpt_download, "download_checkpoint", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path / "home" / "models" / "124M"


def test_download_false_names_what_is_missing_without_the_network(no_network):
    """Fails if download=False is ignored (planted: the old `from jaxcls.ckpt import download`
    inside resolve_checkpoint_dir, shadowing the parameter)."""
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint_dir("gpt2-small", download=False)
    msg = str(e.value)
    assert str(no_network) in msg and "jaxcls download gpt2-small" in msg
    assert all(f in msg for f in OPENAI_FILES), msg

    no_network.mkdir(parents=True)
    (no_network / "hparams.json").write_text("{}")
    for attempt in (lambda: read_checkpoint("124M", download=False),
                    lambda: jaxcls.load_tokenizer("gpt2-small", download=False)):
        with pytest.raises(CheckpointError, match="not downloaded") as e:
            attempt()
        missing = str(e.value).split("(missing ")[1]
        assert "model.ckpt.index" in missing and "hparams.json" not in missing, e.value


@requires_shared
def test_tokenizer_from_folder_never_resolves_a_size(no_network):
    """A size name is not a folder to the tokenizer: it is refused, not downloaded. Fails if a
    non-folder falls through to tiktoken's download (planted: `if False:` for the is_dir check)."""
    with pytest.raises(CheckpointError, match="gpt2-small: no such folder"):
        tokenizer_from_folder("gpt2-small")
    assert tokenizer_from_folder(FIXTURE / "openai").encode("Every effort moves you") == [6109, 3626, 6100, 345]


def _writable_copy(src: Path, dest: Path, mtime_ns: int) -> Path:
    shutil.copytree(src, dest)
    for f in dest.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IWUSR)
        os.utime(f, ns=(mtime_ns, mtime_ns))
    return dest


@pytest.fixture
def delta_saved(tmp_path, monkeypatch):
    """A classifier saved as a delta over a copy of the tiny fixture, with an empty hash cache
    and a count of every full hash of the base."""
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "home"))
    base = _writable_copy(FIXTURE / "openai", tmp_path / "base", HOUR_AGO_NS)
    clf = Classifier.from_pretrained(base, label_names=LABELS)
    out = clf.save(tmp_path / "clf")
    (tmp_path / "home" / HASH_CACHE).unlink()
    calls = []
    real = saved_folder.sha256_files
    monkeypatch.setattr(saved_folder, "sha256_files", lambda paths: calls.append(paths) or real(paths))
    return {"dir": out, "base": base, "calls": calls, "clf": clf, "home": tmp_path / "home"}


@requires_shared
def test_delta_load_hashes_the_base_once_per_file_version(delta_saved):
    """Fails if the remembered hash is never used (planted: `hit = None` in base_sha256) or if a
    changed mtime does not force a new hash (planted: stamp left out of the cache check)."""
    d = delta_saved
    first = Classifier.load(d["dir"])
    second = Classifier.load(d["dir"])
    assert len(d["calls"]) == 1, d["calls"]
    assert (d["home"] / HASH_CACHE).is_file()
    np.testing.assert_array_equal(first.predict_proba(TEXTS), second.predict_proba(TEXTS))
    np.testing.assert_array_equal(first.predict_proba(TEXTS), d["clf"].predict_proba(TEXTS))

    data = d["base"] / "model.ckpt.data-00000-of-00001"
    os.utime(data, ns=(HOUR_AGO_NS + 10**9, HOUR_AGO_NS + 10**9))  # same bytes, new version
    Classifier.load(d["dir"])
    Classifier.load(d["dir"])
    assert len(d["calls"]) == 2, d["calls"]


@requires_shared
def test_a_just_written_base_is_not_remembered(delta_saved):
    """A file written within the filesystem clock's tick could change again unseen: its hash is
    not kept. Fails if every hash is remembered (planted: settled = True in base_sha256)."""
    d = delta_saved
    now = time.time_ns()
    for f in d["base"].iterdir():
        os.utime(f, ns=(now, now))
    Classifier.load(d["dir"])
    Classifier.load(d["dir"])
    assert len(d["calls"]) == 2


@requires_shared
def test_a_changed_base_is_refused_even_after_its_hash_was_remembered(delta_saved):
    """Same size, new bytes, new mtime: hashed again and refused. Fails if a remembered hash is
    trusted without its stamp (planted: stamp left out of the cache check in base_sha256)."""
    d = delta_saved
    Classifier.load(d["dir"])
    data = d["base"] / "model.ckpt.data-00000-of-00001"
    buf = bytearray(data.read_bytes())
    buf[len(buf) // 2] ^= 0x01
    data.write_bytes(bytes(buf))
    os.utime(data, ns=(HOUR_AGO_NS + 2 * 10**9, HOUR_AGO_NS + 2 * 10**9))
    with pytest.raises(CheckpointError, match="different base checkpoint"):
        Classifier.load(d["dir"])
    assert len(d["calls"]) == 2


@pytest.fixture(scope="module")
def full_saved(tmp_path_factory):
    clf = Classifier.from_pretrained(FIXTURE / "openai", label_names=LABELS)
    return clf.save(tmp_path_factory.mktemp("full") / "clf", full=True)


def _edit_weights(src: Path, dest: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dest / WEIGHTS))
    return dest


@requires_shared
@pytest.mark.parametrize("case, edit, expected", [
    ("unknown", lambda t: t.__setitem__("h/0/attn/extra", np.zeros(3, np.float32)),
     r"tensor 'h/0/attn/extra' is not a parameter of the classifier as classifier\.json describes it"),
    ("shape", lambda t: t.__setitem__("head/kernel", np.zeros((16, 3), np.float32)),
     r"tensor 'head/kernel' has shape \(16, 3\), but classifier\.json \(.*\) implies \(16, 2\)"),
    ("missing", lambda t: t.pop("ln_f/scale"), r"missing tensor\(s\) ln_f/scale"),
    ("dtype", lambda t: t.__setitem__("ln_f/bias", t["ln_f/bias"].astype(np.int32)),
     r"tensor 'ln_f/bias': dtype int32 is not a floating-point type"),
])
def test_saved_folder_tensor_errors_name_the_file_and_tensor(full_saved, tmp_path, case, edit, expected):
    """Fails if the classifier folder skips the strict matcher's checks (planted: `continue` for a
    name not in the table; `required=[]` in load_folder; no dtype check in _to_float32)."""
    folder = _edit_weights(full_saved, tmp_path / case, edit)
    with pytest.raises(CheckpointError, match=expected) as e:
        Classifier.load(folder)
    assert str(e.value).startswith(f"{folder / WEIGHTS}: "), e.value


@requires_shared
def test_saved_folder_missing_the_base_reference_is_named(full_saved, tmp_path):
    """Fails with a bare KeyError if the base reference is not checked (planted: `if False:` for
    the absent-fields check in _read_meta)."""
    import json

    folder = tmp_path / "clf"
    shutil.copytree(full_saved, folder)
    meta = json.loads((folder / META).read_text())
    (folder / META).write_text(json.dumps({**meta, "saved": "delta", "base": {"path": "/x"}}))
    with pytest.raises(CheckpointError, match=r"classifier\.json: missing field\(s\) base\.layout, base\.sha256"):
        Classifier.load(folder)
