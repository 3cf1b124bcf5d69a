"""The server under load, on 127.0.0.1 with the tiny random classifier: concurrent clients, stalled
connections, a huge text among small ones, memory after load, the queue limit, the compute
timeout, /metrics, and SIGTERM with a request in flight (the last two against `jaxcls serve` in a
subprocess)."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.classifier import Classifier
from jaxcls.config import TINY_SIZES
from jaxcls.model import GPT2Classifier
from jaxcls.tokenizer import encoding_from_files

pytest.importorskip("uvicorn", reason="the serve extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jaxcls.infer.serve import make_server  # noqa: E402

KW = {"batch_size": 8, "bucket_lengths": (64,), "row_buckets": (1, 8)}
NAMES = ["ham", "spam", "other"]


@pytest.fixture(scope="module")
def clf():
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    return Classifier(GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(1)), enc, NAMES)


@pytest.fixture(scope="module")
def server(clf):
    """Short timeouts so stalled connections end within the test; room for 200 of them."""
    with make_server(clf, predictor_kw=KW, header_timeout=2, body_timeout=2, keep_alive_timeout=2,
                     max_text_chars=8 << 20, max_body_bytes=16 << 20, max_connections=400) as srv:
        yield srv


def post(address, body, timeout=30, path="/classify"):
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def get(address, path):
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def metrics(address) -> dict:
    """{(name, labels...): value} from GET /metrics."""
    out = {}
    for family in text_string_to_metric_families(get(address, "/metrics")[1]):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_64_concurrent_clients_each_get_their_own_answer(server):
    """64 clients x 10 requests, one text each: no error, every answer the offline prediction for
    its own text, and the texts of concurrent requests ran together. Fails if results are handed
    to the wrong request (planted: Batcher._run gives every item results[:len(item.texts)])."""
    texts = {(c, i): f"client {c} says message {i} {'win cash ' * (c % 5)}" for c in range(64) for i in range(10)}
    want = dict(zip(texts, server.predictor.predict(list(texts.values()))[1]))
    before = metrics(server.address)

    def client(c):
        return [(i, post(server.address, {"text": texts[c, i]})) for i in range(10)]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(client, range(64)))
    for c, got in enumerate(answers):
        for i, (status, out, _) in got:
            assert status == 200, out
            probs = out["predictions"][0]["probs"]
            np.testing.assert_allclose([probs[n] for n in NAMES], want[c, i], atol=1e-5)
    after = metrics(server.address)
    calls = after[("jaxcls_batch_texts_count",)] - before[("jaxcls_batch_texts_count",)]
    assert after[("jaxcls_texts_total",)] - before[("jaxcls_texts_total",)] == 640
    assert calls < 640  # some model calls held texts from several requests


def _stall(address, n):
    socks = []
    for k in range(n):
        s = socket.create_connection(address, timeout=10)
        if k % 2:
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le")  # half a header line
        socks.append(s)
    return socks


def _raw(address, data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return out


def _json_answer(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_connection_limit_and_bad_http_answer_in_json(clf):
    """max_connections=4: with 3 idle connections open a request is served; with a 4th, a request
    gets 503 in JSON with Retry-After (uvicorn's own is plain text), and once they close it is
    served again. A malformed request line, and 20 KiB of a header with no end yet (over
    MAX_HEADER_BYTES), get a JSON 400. Fails with
    uvicorn's limit (planted: limit_concurrency=lim.max_connections back, and `over` never true:
    its 503 is text, and it refuses at 4 connections, not 5) or uvicorn's 400 (planted: the
    send_400_response override removed)."""
    with make_server(clf, predictor_kw=KW, header_timeout=5, max_connections=4) as srv:
        idle = [socket.create_connection(srv.address, timeout=10) for _ in range(3)]
        try:
            time.sleep(0.3)
            assert post(srv.address, {"text": "fourth"})[0] == 200
            idle.append(socket.create_connection(srv.address, timeout=10))
            time.sleep(0.3)
            status, out, headers = post(srv.address, {"text": "fifth"})
            assert status == 503 and headers["retry-after"] == "1", (status, headers)
            assert "max_connections" in out["error"], out
        finally:
            for c in idle:
                c.close()
        deadline = time.monotonic() + 5
        while len(srv.uvicorn.server_state.connections) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post(srv.address, {"text": "again"})[0] == 200
        for raw in (b"NOT HTTP AT ALL\r\n\r\n",
                    b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10)):  # no end in sight
            status, headers, out = _json_answer(_raw(srv.address, raw))
            assert status == 400 and headers["content-type"] == "application/json", (status, headers)
            assert out["error"].startswith("bad HTTP request"), out


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server):
    """After an answer on a kept-alive connection, the server closes it once --keep-alive-timeout
    (2 s here) passes with nothing sent. Fails if the limit does not reach uvicorn (planted:
    timeout_keep_alive left at uvicorn's 5 s default: still open at 3.5 s)."""
    body = json.dumps({"text": "hello"}).encode()
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        first = b""
        while b"\r\n\r\n" not in first or len(first.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", first.lower()).group(1)):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        t0 = time.monotonic()
        s.settimeout(3.5)
        rest = b""
        while chunk := s.recv(4096):  # a timeout here means the server kept it open
            rest += chunk
        waited = time.monotonic() - t0
    assert rest == b"" and 1.5 < waited < 3.5, (rest, waited)


def test_shutdown_waits_for_requests_in_flight_only_as_long_as_the_shutdown_timeout(clf):
    """A request whose body never finishes is in flight when the server is told to stop: with
    --shutdown-timeout 1 the server is gone after about a second, not after the 30 s body
    timeout. Fails if the limit does not reach uvicorn (planted: timeout_graceful_shutdown=None:
    uvicorn waits for the request, here until the body timeout)."""
    srv = make_server(clf, predictor_kw=KW, shutdown_timeout=1, body_timeout=30).start()
    body = json.dumps({"text": "never finished"}).encode()
    with socket.create_connection(srv.address, timeout=10) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.stop(timeout=20)
        took = time.monotonic() - t0
    assert not srv._thread.is_alive() and 0.8 < took < 5, took


def test_stalled_connections_neither_block_nor_linger(server):
    """200 open connections that send nothing or half a header: a normal request still answers
    within 1 s, and the server closes every stalled one within its 2 s header timeout (those that
    sent part of a request get a 408 first). Fails without the header clock (planted:
    _TimedH11._arm returns at once), as uvicorn then holds them open."""
    socks = _stall(server.address, 200)
    t0 = time.monotonic()
    try:
        start = time.monotonic()
        status, out, _ = post(server.address, {"text": "still there?"}, timeout=5)
        assert status == 200 and time.monotonic() - start < 1.0
        for k, s in enumerate(socks):
            s.settimeout(max(0.1, t0 + 4 - time.monotonic()))
            data = b""
            while chunk := s.recv(4096):  # a timeout here means the server kept it open
                data += chunk
            assert data.startswith(b"HTTP/1.1 408 ") if k % 2 else data == b"", data
        assert time.monotonic() - t0 < 4
    finally:
        for s in socks:
            s.close()


def test_a_stalled_body_gets_408(server):
    """Headers, then part of the body, then nothing: 408 JSON within the 2 s body timeout.
    Fails without the body clock (planted: asyncio.timeout(None) in _read_body)."""
    with socket.create_connection(server.address, timeout=6) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\": ")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in data
        assert time.monotonic() - t0 < 3.5


def test_a_huge_text_does_not_hold_up_small_ones(server):
    """A 3 MiB text (one character repeated: BPE's slow case, over a second to tokenize) is in
    flight while small requests go through: none of them takes more than 0.5 s. Fails if long
    texts are tokenized on the model worker (planted: PRETOKENIZE_CHARS = 10**9)."""
    huge = {}
    thread = threading.Thread(target=lambda: huge.update(r=post(server.address, {"text": "x" * (3 << 20)})))
    thread.start()
    waits, deadline = [], time.monotonic() + 20
    while thread.is_alive() and time.monotonic() < deadline:
        start = time.monotonic()
        assert post(server.address, {"text": "a short one"})[0] == 200
        waits.append(time.monotonic() - start)
    thread.join(30)
    assert huge["r"][0] == 200 and len(huge["r"][1]["predictions"]) == 1
    assert waits and max(waits) < 0.5, waits


def test_full_queue_is_503_with_retry_after(clf):
    """max_queue 1 and a predictor slowed to 0.6 s a call: one request runs, one waits, the third
    is turned away at once with 503 and Retry-After; the first two still answer. Fails without the
    queue bound (planted: Batcher.submit skips its QueueFull check)."""
    predictor = clf.predictor(**KW)
    predict = predictor.predict
    predictor.predict = lambda texts: (time.sleep(0.6), predict(texts))[1]
    with make_server(clf, predictor=predictor, max_queue=1, max_texts=1, max_batch_delay_ms=0) as srv:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(srv.address, {"text": "a"})))
                   for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # the first is on the worker before the second queues
        start = time.monotonic()
        status, out, headers = post(srv.address, {"text": "b"})
        assert status == 503 and headers["retry-after"] == "1" and "busy" in out["error"]
        assert time.monotonic() - start < 0.3
        for t in threads:
            t.join(10)
        assert [r[0] for r in results] == [200, 200]
        assert metrics(srv.address)[("jaxcls_errors_total", ("reason", "queue_full"))] == 1


def test_compute_timeout_is_504(clf):
    """A request the model does not answer within request_timeout gets 504 JSON. Fails without the
    timeout (planted: asyncio.wait_for(..., None) in ClassifierApp.classify)."""
    predictor = clf.predictor(**KW)
    predict = predictor.predict
    predictor.predict = lambda texts: (time.sleep(1.0), predict(texts))[1]
    with make_server(clf, predictor=predictor, request_timeout=0.3) as srv:
        status, out, _ = post(srv.address, {"text": "slow"})
        assert status == 504 and "request timeout of 0.3 s" in out["error"]


def test_metrics_follow_traffic(server):
    """/metrics counts requests by path and status, errors by reason, texts and batches, and shows
    the queue and the compiles. Fails if a path's requests are not counted (planted: the
    `finally:` of ClassifierApp._observe counts only status 200)."""
    a = server.address
    before = metrics(a)
    for _ in range(3):
        assert post(a, {"texts": ["one", "two"]})[0] == 200
    assert get(a, "/nope")[0] == 404
    assert post(a, {"texts": []})[0] == 400
    after = metrics(a)

    def grew(*key):
        return after.get(key, 0) - before.get(key, 0)

    assert grew("jaxcls_requests_total", ("path", "/classify"), ("status", "200")) == 3
    assert grew("jaxcls_requests_total", ("path", "other"), ("status", "404")) == 1
    assert grew("jaxcls_requests_total", ("path", "/classify"), ("status", "400")) == 1
    assert grew("jaxcls_errors_total", ("reason", "not_found")) == 1
    assert grew("jaxcls_errors_total", ("reason", "bad_shape")) == 1
    assert grew("jaxcls_texts_total") == 6 and grew("jaxcls_batch_texts_count") == 3
    assert grew("jaxcls_request_seconds_count", ("path", "/classify")) == 4
    assert after[("jaxcls_queue_texts",)] == 0
    assert after[("jaxcls_compiles",)] == server.predictor.num_compiles
    assert after[("jaxcls_open_connections",)] >= 1  # the /metrics request's own


# -- `jaxcls serve` in a subprocess ------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    """(process, (host, port)): `jaxcls serve` on a saved tiny classifier, port chosen by the OS."""
    folder = tmp_path_factory.mktemp("clf")
    Classifier.from_pretrained("tiny", label_names=["ham", "spam"], weights="random",
                               tokenizer=TOKENIZER_DIR, seed=3).save(folder)
    cmd = [str(Path(sys.executable).with_name("jaxcls")), "serve", "--model", str(folder), "--port", "0", "--quiet",
           "--batch-size", "8", "--header-timeout", "2", "--shutdown-timeout", "10"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if m := re.search(r"on http://127\.0\.0\.1:(\d+) ", line):
            break
    assert m, "".join(lines)
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    proc.lines = lines
    yield proc, ("127.0.0.1", int(m.group(1)))
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def test_memory_returns_near_baseline_after_load(cli_server):
    """After 640 concurrent requests and twenty 4 MiB bodies, the server's RSS is back within 48 MiB
    of where it was after warming up. Fails if request bodies are kept (planted: a module-level
    list in serve_app that _read_body appends every body to)."""
    proc, address = cli_server
    for _ in range(20):
        assert post(address, {"text": "warm up " * 50})[0] == 200
    base = rss_kib(proc.pid)
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda i: post(address, {"text": f"text number {i}"})[0], range(640)))
        big = list(pool.map(lambda i: post(address, {"texts": ["y " * (1 << 20)] * 2})[0], range(20)))
    assert set(statuses) == {200} and set(big) == {413}  # 4 MiB each, over the 100000-character limit
    time.sleep(1)
    grown = (rss_kib(proc.pid) - base) / 1024
    assert grown < 48, f"RSS grew {grown:.0f} MiB over its baseline"


def test_sigterm_finishes_the_request_in_flight(cli_server):
    """SIGTERM while a request's body is half sent: the server stops accepting, the request still
    gets its 200, and the process ends with status 0 and 'jaxcls: stopped'. Fails if shutdown
    does not wait for requests in flight (planted: timeout_graceful_shutdown=0 in Server)."""
    proc, address = cli_server
    body = json.dumps({"text": "finish me"}).encode()
    with socket.create_connection(address, timeout=20) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(address, timeout=2).close()
        s.sendall(body[5:])
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert json.loads(payload)["predictions"][0]["label"] in ("ham", "spam")
    assert proc.wait(20) == 0
    assert "jaxcls: stopped" in "".join(proc.lines)
