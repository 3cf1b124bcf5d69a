"""--data imdb: the book's IMDB split, downloaded (resumable, checked) from a local server."""

import hashlib
import http.server
import io
import os
import re
import tarfile
import threading

import numpy as np
import pandas as pd
import pytest

from jaxcls import download
from jaxcls.data import load_data
from jaxcls.data.imdb import IMDB_FILE, load_imdb
from jaxcls.errors import DataError, DownloadError

SIZES = (12, 4, 8)


def mini_tarball(path):
    """aclImdb's layout with 24 labelled reviews (6 per folder), plus what the loader must skip."""
    rng = np.random.default_rng(7)
    words = "great awful plot acting film boring loved hated ending music".split()
    with tarfile.open(path, "w:gz") as tf:
        def add(name, text):
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"aclImdb/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for subset in ("train", "test"):
            for label in ("pos", "neg"):
                for k in rng.permutation(6):  # archive order differs from sorted order
                    add(f"{subset}/{label}/{k * 7}_{k % 10 + 1}.txt",
                        " ".join(rng.choice(words, 5)) + f" {subset}-{label}-{k}<br />é\r\nend")
        add("train/unsup/0_0.txt", "unlabelled")
        add("imdb.vocab", "the\n")
    return path


def book_split(tar_path, tmp_path):
    """The book's script, step by step: extract, read folders, shuffle twice, slice."""
    with tarfile.open(tar_path) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    frames = []
    for subset in ("test", "train"):
        for label in ("pos", "neg"):
            folder = tmp_path / "x" / "aclImdb" / subset / label
            for name in sorted(os.listdir(folder)):
                with open(folder / name, "r", encoding="utf-8") as f:
                    frames.append(pd.DataFrame({"text": [f.read()], "label": [{"pos": 1, "neg": 0}[label]]}))
    df = pd.concat(frames, ignore_index=True).sample(frac=1, random_state=123).reset_index(drop=True)
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    return df.iloc[:SIZES[0]], df.iloc[SIZES[0]:SIZES[0] + SIZES[1]], df.iloc[SIZES[0] + SIZES[1]:]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one file with Range support; the first response is cut after `drop_after` bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        data = srv.data
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(rng.group(1)) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:srv.drop_after] if len(srv.requests) == 1 else data[start:])


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "RETRY_BASE_DELAY", 0.001)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path / "home"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.tar = mini_tarball(tmp_path / "served.tar.gz")
    srv.data = srv.tar.read_bytes()
    srv.drop_after, srv.requests = len(srv.data) // 2, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/{IMDB_FILE}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_resumes_verifies_and_splits_as_the_book_does(server, tmp_path):
    """Fails if the loader shuffles once where the book's script shuffles twice (planted: the
    second df.sample line in load_imdb removed)."""
    sha = hashlib.sha256(server.data).hexdigest()
    got = load_imdb(url=server.url, sha256=sha, sizes=SIZES, progress=False)
    cached = tmp_path / "home" / "data" / "imdb" / IMDB_FILE
    assert cached.read_bytes() == server.data and server.requests[0] is None
    assert server.requests[1] == f"bytes={server.drop_after}-"  # resumed, not restarted
    for ds, want in zip((got.train, got.validation, got.test), book_split(server.tar, tmp_path)):
        assert list(ds.texts) == list(want["text"]) and ds.labels.tolist() == want["label"].tolist()
    assert got.label_names == ("neg", "pos") and len(got.test) == 8 and "\r" not in "".join(got.train.texts)
    again = load_imdb(url=server.url, sha256=sha, sizes=SIZES, progress=False)  # from the cache
    assert len(server.requests) == 2 and again.test.texts == got.test.texts


def test_a_wrong_checksum_keeps_no_archive_under_its_name(server, tmp_path):
    """Fails if the archive is accepted without its sha256 (planted: sha256=None passed to
    download_file in imdb_file)."""
    with pytest.raises(DownloadError, match="sha256"):
        load_imdb(url=server.url, sha256="0" * 64, sizes=SIZES, progress=False)
    assert not (tmp_path / "home" / "data" / "imdb" / IMDB_FILE).exists()


def test_offline_names_the_file_to_fetch_by_hand(tmp_path, monkeypatch):
    """Fails if no network surfaces as anything but the download module's by-hand message
    (planted: imdb_file catching DownloadError and returning the missing path)."""
    monkeypatch.setattr(download, "RETRY_BASE_DELAY", 0.001)
    monkeypatch.setenv("JAXCLS_HOME", str(tmp_path))
    with pytest.raises(DownloadError, match=rf"could not reach .*download {IMDB_FILE} by hand into .*imdb"):
        load_imdb(url="http://127.0.0.1:9/aclImdb_v1.tar.gz", progress=False)


def test_local_archive_errors_name_the_file(tmp_path):
    """Fails if a short archive is split anyway (planted: the `len(df) < sum(sizes)` check removed)."""
    tar = mini_tarball(tmp_path / IMDB_FILE)
    with pytest.raises(DataError, match=rf"{IMDB_FILE}: 24 labelled reviews, fewer than the 50000"):
        load_data("imdb", path=tmp_path, progress=False)
    bad = tmp_path / "bad" / IMDB_FILE
    bad.parent.mkdir()
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        load_data("imdb", path=bad)
    with pytest.raises(DataError, match="fixed columns and splits"):
        load_data("imdb", path=tar, text_column="review")
