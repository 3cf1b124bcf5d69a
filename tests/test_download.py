"""Downloads against a local HTTP server that serves the tiny GPT-2 fixture and misbehaves on purpose."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import SHARED, requires_shared
from jaxcls import download
from jaxcls.ckpt.download import KNOWN_SHA256, download_checkpoint
from jaxcls.ckpt.openai import OPENAI_FILES
from jaxcls.download import download_file
from jaxcls.errors import DownloadError, JaxclsError

FIXTURE = SHARED / "fixtures/gpt2-tiny/openai"
BIG = "model.ckpt.data-00000-of-00001"

pytestmark = requires_shared


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "normal"
        self.drop_after = 0
        self.fail_count = 0
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves FIXTURE under /models/124M/, with Range support and a per-test `mode` of misbehaviour."""

    server: _Server

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            first = len(srv.requests) == 1
            failing = srv.fail_count > 0
            srv.fail_count -= failing
        m = re.fullmatch(r"/models/124M/([^/]+)", self.path)
        target = FIXTURE / m.group(1) if m else None
        if srv.mode == "404" or target is None or not target.is_file():
            return self.send_error(404)
        if srv.mode == "500" and failing:
            return self.send_error(500)
        data = target.read_bytes()
        if srv.mode == "garbage":
            data = os.urandom(len(data))
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if rng and srv.mode != "ignore-range":
            start = int(rng.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "drop" and first:
            body = body[: srv.drop_after]
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _fast_and_local(monkeypatch):
    """Tiny retry delays, and no proxy between the client and 127.0.0.1."""
    monkeypatch.setattr(download, "RETRY_BASE_DELAY", 0.001)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("JAXCLS_BASE_URL", raising=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fresh_download_is_identical_and_silent(server, tmp_path, capfd):
    dest = tmp_path / "sub" / BIG
    out = download_file(f"{server.url}/models/124M/{BIG}", dest, sha256=_sha(FIXTURE / BIG), progress=False)
    assert out == dest
    assert dest.read_bytes() == (FIXTURE / BIG).read_bytes()
    assert _leftovers(dest.parent) == [BIG]
    assert capfd.readouterr() == ("", "")


def test_progress_bar_does_not_break_download(server, tmp_path):
    dest = tmp_path / "vocab.bpe"
    download_file(f"{server.url}/models/124M/vocab.bpe", dest, progress=True)
    assert _sha(dest) == KNOWN_SHA256["vocab.bpe"]


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.mode, server.drop_after = "drop", 100_000
    dest = tmp_path / BIG
    download_file(f"{server.url}/models/124M/{BIG}", dest, sha256=_sha(FIXTURE / BIG), progress=False)
    assert dest.read_bytes() == (FIXTURE / BIG).read_bytes()
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]
    assert not download.part_path(dest).exists()


def test_complete_part_file_answered_416_is_verified_and_kept(server, tmp_path):
    dest = tmp_path / "vocab.bpe"
    download.part_path(dest).write_bytes((FIXTURE / "vocab.bpe").read_bytes())
    download_file(f"{server.url}/models/124M/vocab.bpe", dest, sha256=KNOWN_SHA256["vocab.bpe"], progress=False)
    assert _sha(dest) == KNOWN_SHA256["vocab.bpe"]
    assert [r for _, r in server.requests] == [f"bytes={(FIXTURE / 'vocab.bpe').stat().st_size}-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.mode = "ignore-range"
    dest = tmp_path / BIG
    download.part_path(dest).write_bytes(b"\0" * 5000)
    download_file(f"{server.url}/models/124M/{BIG}", dest, progress=False)
    assert dest.read_bytes() == (FIXTURE / BIG).read_bytes()
    assert [r for _, r in server.requests] == ["bytes=5000-"]


def test_checksum_mismatch_quarantines_bytes(server, tmp_path):
    server.mode = "garbage"
    dest = tmp_path / "encoder.json"
    expected = KNOWN_SHA256["encoder.json"]
    with pytest.raises(DownloadError) as info:
        download_file(f"{server.url}/models/124M/encoder.json", dest, sha256=expected, progress=False)
    corrupt = download.corrupt_path(dest)
    msg = str(info.value)
    assert "encoder.json" in msg and expected in msg and _sha(corrupt) in msg
    assert corrupt.stat().st_size == (FIXTURE / "encoder.json").stat().st_size
    assert _leftovers(tmp_path) == ["encoder.json.corrupt"]


def test_expected_size_mismatch_is_refused(server, tmp_path):
    dest = tmp_path / "hparams.json"
    with pytest.raises(DownloadError, match="size mismatch"):
        download_file(f"{server.url}/models/124M/hparams.json", dest, expected_size=1, progress=False)
    assert not dest.exists()


def test_404_fails_at_once_naming_url_and_status(server, tmp_path):
    server.mode = "404"
    url = f"{server.url}/models/124M/hparams.json"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "hparams.json", progress=False)
    assert url in str(info.value) and "404" in str(info.value)
    assert len(server.requests) == 1
    assert not (tmp_path / "hparams.json").exists()


def test_500_is_retried_then_succeeds(server, tmp_path):
    server.mode, server.fail_count = "500", 2
    dest = tmp_path / "hparams.json"
    download_file(f"{server.url}/models/124M/hparams.json", dest, progress=False, retries=3)
    assert dest.read_bytes() == (FIXTURE / "hparams.json").read_bytes()
    assert len(server.requests) == 3


def test_persistent_500_gives_up_after_retries(server, tmp_path):
    server.mode, server.fail_count = "500", 100
    with pytest.raises(DownloadError, match="after 3 attempts.*500"):
        download_file(f"{server.url}/models/124M/hparams.json", tmp_path / "h.json", progress=False, retries=2)
    assert len(server.requests) == 3


def test_disk_full_names_folder_and_leaves_no_final_file(server, tmp_path, monkeypatch):
    def full(f, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_write_chunk", full)
    dest = tmp_path / BIG
    with pytest.raises(DownloadError) as info:
        download_file(f"{server.url}/models/124M/{BIG}", dest, progress=False)
    assert "disk is full" in str(info.value) and str(tmp_path) in str(info.value)
    assert not dest.exists()
    assert len(server.requests) == 1


def test_checkpoint_end_to_end_and_cached(server, tmp_path):
    folder = download_checkpoint("gpt2-small", cache_dir=tmp_path, base_url=server.url + "/models", progress=False)
    assert folder == tmp_path / "models" / "124M"
    assert _leftovers(folder) == sorted(OPENAI_FILES)
    for name in OPENAI_FILES:
        assert (folder / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    for name, digest in KNOWN_SHA256.items():
        assert _sha(FIXTURE / name) == digest
    assert len(server.requests) == len(OPENAI_FILES)
    assert download_checkpoint("124M", cache_dir=tmp_path, base_url=server.url + "/models", progress=False) == folder
    assert len(server.requests) == len(OPENAI_FILES)


def test_cli_download_takes_cache_dir_base_url_and_quiet(server, tmp_path, capsys):
    """`jaxcls download gpt2-small --cache-dir D --base-url U --quiet` (the default OpenAI source):
    the files land under D from U, stdout is the folder alone and stderr is empty. Fails if a flag
    does not reach download_checkpoint (planted: `base_url=None` in cmd_download: the real host,
    unreachable here; `progress=True`: a progress line on stderr)."""
    from jaxcls.cli import main

    capsys.readouterr()
    rc = main(["download", "gpt2-small", "--cache-dir", str(tmp_path), "--base-url", server.url + "/models", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == f"{tmp_path / 'models' / '124M'}\n" and err == "", (out, err)
    assert _leftovers(tmp_path / "models" / "124M") == sorted(OPENAI_FILES)


def test_checkpoint_refetches_known_file_with_bad_hash(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCLS_BASE_URL", server.url + "/models/")
    folder = tmp_path / "models" / "124M"
    folder.mkdir(parents=True)
    for name in OPENAI_FILES:
        (folder / name).write_bytes((FIXTURE / name).read_bytes())
    (folder / "vocab.bpe").write_bytes(b"tampered")
    download_checkpoint("gpt2-small", cache_dir=tmp_path, progress=False)
    assert [p for p, _ in server.requests] == ["/models/124M/vocab.bpe"]
    assert _sha(folder / "vocab.bpe") == KNOWN_SHA256["vocab.bpe"]
    assert (folder / "vocab.bpe.corrupt").read_bytes() == b"tampered"


def test_unreachable_server_fails_fast_with_manual_instructions(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_checkpoint("gpt2-small", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}/models", progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert str(tmp_path / "models" / "124M") in msg and "--checkpoint" in msg
    assert all(name in msg for name in OPENAI_FILES)
    folder = tmp_path / "models" / "124M"
    assert not folder.exists() or not any(folder.iterdir())


def test_cache_home_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))
    assert download.cache_home() == tmp_path
    monkeypatch.delenv("JAXCLS_HOME")
    assert download.cache_home() == Path.home() / ".cache" / "jaxcls"


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(JaxclsError, match="gpt2-small"):
        download_checkpoint("gpt3", cache_dir=tmp_path, progress=False)


def test_parse_content_range():
    assert download.parse_content_range("bytes 10-99/100") == (10, 100)
    assert download.parse_content_range("bytes */100") == (None, 100)
    assert download.parse_content_range("bytes 0-9/*") == (0, None)
    assert download.parse_content_range(None) == (None, None)
