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


# ---------------------------------------------------------------------------------------------
# model.safetensors: the header is checked against the model before any tensor data is read
# ---------------------------------------------------------------------------------------------

EXTRA_GIB = 1
# Loads each folder given in argv, printing one JSON line per folder: the outcome and how much
# the peak RSS grew. The process's own peak is reached importing jax first, so growth is the load's.
_RSS_PROBE = """
import json, resource, sys
from jaxcls.ckpt.load import read_checkpoint
from jaxcls.errors import CheckpointError
for folder in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        ckpt = read_checkpoint(folder)
        outcome = "loaded %d tensors" % len(ckpt.tensors)
    except CheckpointError as e:
        outcome = str(e)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"outcome": outcome, "grew_mib": grew / 1024}))
"""


def _hf_with_extra(folder: Path, name: str, nbytes: int, **extra_entries) -> Path:
    """The tiny HF fixture with one more F32 tensor of `nbytes` declared at the end of the data
    section; the file is extended with a hole, so the bytes exist but use neither disk nor memory."""
    import json
    import struct

    folder.mkdir(parents=True)
    shutil.copy(FIXTURE / "hf" / "config.json", folder / "config.json")
    data = (FIXTURE / "hf" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    header[name] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [len(body), len(body) + nbytes]}
    header.update(extra_entries)
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)
        f.truncate(8 + len(raw) + len(body) + nbytes)
    return folder / "model.safetensors"


@requires_shared
def test_an_extra_huge_tensor_is_refused_and_an_ignored_one_skipped_without_reading_them(tmp_path):
    """A header declaring one extra 1 GiB tensor is refused by name from the header alone, and a
    1 GiB `lm_head.weight` (which the matcher ignores) is never read; the peak RSS grows by well
    under the tensor's size in both. Fails if data is read before names are matched (planted: the
    old `read_safetensors(file)` of every tensor at the top of read_hf: +2 GiB, then the error)."""
    import json
    import subprocess
    import sys

    size = EXTRA_GIB << 30
    extra = _hf_with_extra(tmp_path / "extra", "transformer.h.0.mlp.c_big.weight", size)
    ignored = _hf_with_extra(tmp_path / "ignored", "lm_head.weight", size)
    run = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(extra.parent), str(ignored.parent)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-2000:]
    refused, loaded = (json.loads(line) for line in run.stdout.splitlines())
    assert refused["outcome"].startswith(f"{extra}: tensor 'h.0.mlp.c_big.weight' is not a parameter"), refused
    assert loaded["outcome"] == "loaded 28 tensors", loaded
    assert refused["grew_mib"] < 128 and loaded["grew_mib"] < 128, (refused, loaded)


def _zero_size_tensors(path: Path, count: int) -> Path:
    import json
    import struct

    raw = json.dumps({f"z{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@requires_shared
def test_an_oversized_header_is_refused_unparsed_and_too_many_tensors_by_count(tmp_path, monkeypatch):
    """200,000 zero-size tensors (an 11 MB header) are refused by the header's length before it is
    parsed; 12,000 (660 KB) by their count before any is checked. Fails if either bound goes
    (planted: the MAX_HEADER_BYTES test removed from _load_json: json.loads runs; the MAX_TENSORS
    test removed: every entry is checked, and the file refused later for holding no values)."""
    from jaxcls.ckpt import hf

    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(FIXTURE / "hf" / "config.json", folder / "config.json")
    file = _zero_size_tensors(folder / "model.safetensors", 200_000)
    real_loads = hf.json.loads

    def loads(text, *a, **k):
        if len(text) > hf.MAX_HEADER_BYTES:
            pytest.fail("an oversized header was parsed")
        return real_loads(text, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(hf.json, "loads", loads)
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(folder)
    n = file.stat().st_size - 8
    assert str(e.value) == (f"{file}: header of {n:,} bytes is over the limit of {hf.MAX_HEADER_BYTES:,} "
                            "(a GPT-2 checkpoint's is under 100 KB)")
    _zero_size_tensors(file, 12_000)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(folder)
    assert str(e.value) == f"{file}: header declares 12,000 tensors, over the limit of {hf.MAX_TENSORS:,}"
