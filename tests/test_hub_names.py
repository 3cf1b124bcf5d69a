"""Checkpoints by Hugging Face Hub name (jaxcls/ckpt/hub.py): found in a Hugging Face cache the
test builds (blobs, refs, snapshots of symlinks, as huggingface_hub lays them out), offline, and
downloaded through huggingface_hub from a local HTTP server that answers as the Hub does."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import http.server
import json
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import jaxcls.download
from jaxcls.ckpt import download as ckpt_download
from jaxcls.ckpt import hub
from jaxcls.ckpt.load import resolve_checkpoint_dir
from jaxcls.ckpt.openai import OPENAI_FILES
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.cli.offline import choose_model
from jaxcls.config import ModelSpec, TrainConfig
from jaxcls.errors import CheckpointError, JaxclsError

from conftest import FIXTURE, requires_shared

pytestmark = requires_shared

HUB_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
MAIN = "1" * 40  # sorts first: a resolver that ignores refs/main and takes the newest-looking snapshot misses it
OTHER = "f" * 40
HF_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")


def blob_id(data: bytes, lfs: bool) -> str:
    """The Hub's ETag of a file: sha256 for LFS files, the git blob sha1 for the rest."""
    return hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo: str, commit: str, *, refs=("main",), files=HUB_FILES) -> Path:
    """A snapshot of the fixture's Hub-layout files under `cache` as huggingface_hub writes it:
    the bytes in blobs/<etag>, the snapshot's files relative symlinks to them, refs/<name> the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in files:
        data = (FIXTURE / "hf-hub" / f).read_bytes()
        blob = root / "blobs" / blob_id(data, f.endswith(".safetensors"))
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """No Hub variable from the outside world; an empty jaxcls cache; HOME in tmp_path."""
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "jaxcls-home"))
    return tmp_path


@pytest.fixture
def offline(monkeypatch, hf_env):
    """Any attempt at the network, at a download, or at importing huggingface_hub fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail(f"the network was used: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hub, "fetch", refuse)
    monkeypatch.setattr(jaxcls.download, "download_file", refuse)
    monkeypatch.setattr(ckpt_download, "download_checkpoint", refuse)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    return hf_env


def test_every_name_form_resolves_from_the_cache_offline(offline, monkeypatch):
    """Fails if $HF_HUB_CACHE is ignored (planted: cache_root() starts at $HF_HOME), if a name
    form is not recognized as the Hub's, or if huggingface_hub is imported for a cached model
    (planted: `import huggingface_hub` at the top of hub.resolve)."""
    cache = offline / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(offline / "elsewhere"))
    snap = add_snapshot(cache, "openai-community/gpt2", MAIN)
    old = add_snapshot(cache, "gpt2-medium", MAIN)  # a cache filled before the Hub's rename
    for name in ("openai-community/gpt2", "hf://openai-community/gpt2", "hf://openai-community/gpt2@main",
                 f"openai-community/gpt2@{MAIN}", "gpt2", "hf://gpt2"):
        assert resolve_checkpoint_dir(name) == snap, name
    assert resolve_checkpoint_dir("gpt2-medium") == old
    assert resolve_checkpoint_dir("hf://openai-community/gpt2-medium") == old


@pytest.mark.parametrize("where", ["hf_home", "xdg", "home"])
def test_hf_home_then_the_home_folder(offline, monkeypatch, where):
    """Without $HF_HUB_CACHE, $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub. Fails if one is skipped (planted: `home = os.path.join(...)` without
    $HF_HOME; the "~/.cache" default replaced)."""
    if where == "hf_home":
        monkeypatch.setenv("HF_HOME", str(offline / "hf-home"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(offline / "xdg"))
        cache = offline / "hf-home" / "hub"
    elif where == "xdg":
        monkeypatch.setenv("XDG_CACHE_HOME", str(offline / "xdg"))
        cache = offline / "xdg" / "huggingface" / "hub"
    else:
        cache = offline / "home" / ".cache" / "huggingface" / "hub"
    snap = add_snapshot(cache, "openai-community/gpt2", MAIN)
    assert resolve_checkpoint_dir("openai-community/gpt2", download=False) == snap


def test_refs_main_and_a_revision_choose_the_snapshot(offline, monkeypatch):
    """refs/main names the default snapshot, @REV a branch's or a commit's. Fails if refs/main is
    ignored (planted: the newest-named folder of snapshots/ is taken instead)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    main_snap = add_snapshot(offline / "c", "openai-community/gpt2", MAIN, refs=("main",))
    other = add_snapshot(offline / "c", "openai-community/gpt2", OTHER, refs=("v2", "refs/pr/1"))
    assert resolve_checkpoint_dir("openai-community/gpt2") == main_snap
    assert resolve_checkpoint_dir("hf://openai-community/gpt2@v2") == other
    assert resolve_checkpoint_dir("hf://openai-community/gpt2@refs/pr/1") == other
    assert resolve_checkpoint_dir(f"openai-community/gpt2@{OTHER}") == other
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint_dir("openai-community/gpt2@nope", download=False)


def test_an_incomplete_snapshot_is_named_in_one_line(offline, monkeypatch):
    """A snapshot without model.safetensors (or whose blob is gone) is refused, naming the
    snapshot and the file, when nothing may be downloaded. Fails if the files are not checked
    (planted: missing_files returns [])."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    snap = add_snapshot(offline / "c", "openai-community/gpt2", MAIN, files=("config.json", "vocab.json"))
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint_dir("openai-community/gpt2", download=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{snap}: ") and "lacks model.safetensors" in msg, msg

    shutil.rmtree(offline / "c")
    snap = add_snapshot(offline / "c", "openai-community/gpt2", MAIN)
    for blob in (offline / "c" / "models--openai-community--gpt2" / "blobs").iterdir():
        if blob.stat().st_size > 2_000_000:
            blob.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=re.escape(f"{snap}: snapshot of openai-community/gpt2 "
                                                        "lacks model.safetensors; HF_HUB_OFFLINE")):
        resolve_checkpoint_dir("openai-community/gpt2")


def test_a_released_size_prefers_jaxcls_cache_then_the_hub_cache(offline, monkeypatch):
    """'gpt2' is both a released size and a Hub id: jaxcls's own cache of OpenAI's files wins,
    as before; the Hub cache comes next; 'gpt2-small' and '124M' never look there. Fails if the
    Hub cache is read first (planted: the old-id branch moved above the jaxcls-cache check)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    snap = add_snapshot(offline / "c", "openai-community/gpt2", MAIN)
    assert resolve_checkpoint_dir("gpt2") == snap
    for size in ("gpt2-small", "124M"):
        with pytest.raises(CheckpointError, match="not downloaded"):
            resolve_checkpoint_dir(size, download=False)
    openai_dir = offline / "jaxcls-home" / "models" / "124M"
    openai_dir.mkdir(parents=True)
    for f in OPENAI_FILES:
        shutil.copy(FIXTURE / "openai" / f, openai_dir / f)
    assert resolve_checkpoint_dir("gpt2") == openai_dir
    shutil.rmtree(offline / "c")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint_dir("openai-community/gpt2", download=False)
    monkeypatch.chdir(offline)
    (offline / "gpt2").mkdir()
    assert resolve_checkpoint_dir("gpt2") == Path("gpt2")  # a local folder of the same name wins


def test_names_that_are_not_the_hubs(offline, monkeypatch):
    """A mistyped local path under an existing folder stays a missing folder (never a download),
    a malformed hf:// name is refused; both in one line. Fails if 'runs/model' is taken for a
    Hub id (planted: the local-folder check in hub.parse removed)."""
    monkeypatch.chdir(offline)
    (offline / "runs").mkdir()
    with pytest.raises(CheckpointError, match="runs/model: no such checkpoint folder, and not a released size"):
        resolve_checkpoint_dir("runs/model")
    for bad in ("hf://", "hf://a/b/c", "hf://org/name@../../x"):
        with pytest.raises(CheckpointError, match=re.escape(bad)):
            resolve_checkpoint_dir(bad)


def test_without_huggingface_hub_the_message_names_both_ways(offline, monkeypatch):
    """Not cached and huggingface_hub not importable: one line with the extra to install, OpenAI's
    download and --checkpoint DIR. Fails if the import is not guarded (planted: no try/except)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint_dir("openai-community/gpt2-large")
    msg = str(e.value)
    assert "\n" not in msg and "not in the Hugging Face cache" in msg and str(offline / "c") in msg, msg
    assert "pip install 'jaxcls[hub]'" in msg and "`jaxcls download gpt2-large`" in msg and "--checkpoint DIR" in msg


def test_loading_by_hub_name_equals_loading_the_folder(offline, monkeypatch):
    """The same weights, the same tokenizer, the same logits. Fails if the name loads another
    folder (planted: resolve returns the fixture's 'hf' folder, so the tokenizer folder differs)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    snap = add_snapshot(offline / "c", "openai-community/gpt2", MAIN)
    texts = ["Free entry in a weekly comp", "see you at 6"]
    by_name = Classifier.from_pretrained("hf://openai-community/gpt2", label_names=["ham", "spam"])
    direct = Classifier.from_pretrained(FIXTURE / "hf-hub", label_names=["ham", "spam"])
    assert by_name.tokenizer_dir == snap
    np.testing.assert_array_equal(by_name.predict_proba(texts), direct.predict_proba(texts))



def test_train_offline_takes_a_hub_name_from_the_cache_or_refuses_it(offline, monkeypatch, capsys):
    """`jaxcls train --offline --checkpoint ORG/NAME`: cached, it is kept as given; not cached, a
    one-line error (exit 2) before any data is read, never a download. Fails if --offline lets a
    Hub name through to the downloader (planted: the Hub-name check in offline.choose_model removed:
    hub.fetch is then called)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline / "c"))
    monkeypatch.delitem(sys.modules, "huggingface_hub")  # importable again: a download reaches hub.fetch, which fails
    args = argparse.Namespace(offline=True, quiet=True)
    spec = ModelSpec(checkpoint="openai-community/gpt2")
    add_snapshot(offline / "c", "openai-community/gpt2", MAIN)
    assert choose_model(args, spec, TrainConfig()) == (spec, TrainConfig())
    shutil.rmtree(offline / "c")
    assert main(["train", "--offline", "--checkpoint", "openai-community/gpt2", "--data", "sms-spam",
                 "--out", str(offline / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "openai-community/gpt2 is not in the Hugging Face cache" in err, err
    assert not (offline / "run").exists()

# ---- the download, through huggingface_hub, from a local server ----

class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub's file API for one repo at one commit: repo info, the file tree, and
    /ORG/NAME/resolve/REV/FILE (HEAD and GET) with X-Repo-Commit, ETag and Content-Length."""

    def __init__(self, repo: str, commit: str, folder: Path):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.repo, self.commit, self.requests = repo, commit, []
        self.files = {f: (folder / f).read_bytes() for f in HUB_FILES}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        hub_ = self.server
        hub_.requests.append(f"{self.command} {self.path}")
        path = self.path.split("?")[0]
        api = f"/api/models/{hub_.repo}/"
        if path.startswith(api + "revision/") or path == api.rstrip("/"):
            siblings = [{"rfilename": f} for f in hub_.files]
            return self._send(json.dumps({"id": hub_.repo, "modelId": hub_.repo, "sha": hub_.commit,
                                          "siblings": siblings, "private": False}).encode(), body)
        if path.startswith(api + "tree/"):
            tree = []
            for f, data in hub_.files.items():
                entry = {"type": "file", "path": f, "size": len(data), "oid": blob_id(data, False)}
                if f.endswith(".safetensors"):
                    entry["lfs"] = {"oid": blob_id(data, True), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            return self._send(json.dumps(tree).encode(), body)
        m = re.fullmatch(rf"/{re.escape(hub_.repo)}/resolve/([^/]+)/(.+)", path)
        if m and m[1] in ("main", hub_.commit) and m[2] in hub_.files:
            data = hub_.files[m[2]]
            etag = blob_id(data, m[2].endswith(".safetensors"))
            return self._send(data, body, {"X-Repo-Commit": hub_.commit, "ETag": f'"{etag}"'})
        self._send(b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"}, status=404)

    def _send(self, data: bytes, body: bool, headers=None, status=200):
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def fake_hub(hf_env, monkeypatch):
    pytest.importorskip("huggingface_hub")
    # as in a process that imported it earlier (transformers does): its settings are read from the
    # environment at that import, before the test's own, so jaxcls must pass them at each call
    importlib.import_module("huggingface_hub.constants")
    server = FakeHub("openai-community/gpt2", MAIN, FIXTURE / "hf-hub")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_env / "c"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.shutdown()
    server.server_close()


def test_a_missing_model_is_downloaded_through_huggingface_hub(fake_hub, hf_env, monkeypatch, capsys):
    """Not cached: downloaded from $HF_ENDPOINT into $HF_HUB_CACHE, the fixture's bytes, then
    found there offline. Fails if $HF_ENDPOINT or $HF_HUB_CACHE is not passed on at the call
    (planted: fetch's endpoint fixed to huggingface.co; no cache_dir= to snapshot_download)."""
    folder = resolve_checkpoint_dir("openai-community/gpt2", progress=False)
    assert folder == hf_env / "c" / "models--openai-community--gpt2" / "snapshots" / MAIN
    for f in HUB_FILES:
        assert (folder / f).read_bytes() == (FIXTURE / "hf-hub" / f).read_bytes(), f
    assert any("/resolve/" in r and r.endswith("model.safetensors") for r in fake_hub.requests)

    served = len(fake_hub.requests)
    monkeypatch.setattr(hub, "fetch", lambda *a, **k: pytest.fail("downloaded again"))
    assert resolve_checkpoint_dir("gpt2") == folder
    assert main(["download", "--source", "hf", "gpt2-small", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert len(fake_hub.requests) == served


def test_download_source_hf_fetches_into_the_given_cache(fake_hub, hf_env, monkeypatch, capsys):
    """`jaxcls download --source hf gpt2` with --cache-dir and --base-url (the endpoint); fails if
    --source is ignored (planted: cmd_download always takes OpenAI's path, which the server does
    not serve), or --cache-dir (planted: no cache_dir= to snapshot_download)."""
    monkeypatch.delenv("HF_ENDPOINT")
    assert main(["download", "--source", "hf", "gpt2", "--cache-dir", str(hf_env / "d"), "--quiet",
                 "--base-url", fake_hub.url]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == hf_env / "d" / "models--openai-community--gpt2" / "snapshots" / MAIN
    assert (folder / "model.safetensors").read_bytes() == (FIXTURE / "hf-hub" / "model.safetensors").read_bytes()


def test_hf_hub_offline_with_nothing_cached_is_one_line(fake_hub, hf_env, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 (read when the name is resolved, not when huggingface_hub was imported)
    and nothing cached: one line, exit code 2 from the CLI, no request. Fails if the variable is
    not checked (planted: the HF_HUB_OFFLINE test in hub._download removed; the download then succeeds)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JaxclsError) as e:
        resolve_checkpoint_dir("openai-community/gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE is set" in msg and "openai-community/gpt2" in msg, msg
    assert main(["generate", "hi", "--checkpoint", "hf://openai-community/gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE is set" in err, err
    assert fake_hub.requests == []
