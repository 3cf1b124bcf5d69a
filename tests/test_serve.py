"""The HTTP server, on 127.0.0.1 with an OS-chosen port, in a thread: the API, bad requests and
the command line. Load, limits under load, /metrics and shutdown are in test_serve_load.py."""

import http.client
import json
import sys
import threading

import numpy as np
import pytest
from flax import nnx

from conftest import TOKENIZER_DIR
from jaxcls.classifier import Classifier
from jaxcls.cli import main
from jaxcls.config import TINY_SIZES
from jaxcls.errors import ConfigError
from jaxcls.model import GPT2Classifier
from jaxcls.tokenizer import encoding_from_files

pytest.importorskip("uvicorn", reason="the serve extra is not installed")
from jaxcls.infer.serve import make_server  # noqa: E402

KW = {"batch_size": 4, "bucket_lengths": (64,), "row_buckets": (1, 4)}


@pytest.fixture(scope="module")
def server():
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    model = GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(0))
    clf = Classifier(model, enc, ["ham", "spam", "other"])
    srv = make_server(clf, "127.0.0.1", 0, predictor_kw=KW, max_texts=5, max_body_bytes=8192,
                      max_text_chars=300)
    with srv:
        yield srv


def request(server, method, path, body=None, headers=None, *, with_headers=False):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        kind = resp.getheader("Content-Type", "")
        out = json.loads(data) if kind.startswith("application/json") else data.decode()
        return (resp.status, out, dict(resp.getheaders())) if with_headers else (resp.status, out)
    finally:
        conn.close()


def test_health_info_and_page(server):
    assert server.address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
    assert request(server, "GET", "/health") == (200, {"status": "ok"})
    status, info = request(server, "GET", "/info")
    assert status == 200
    assert info["labels"] == ["ham", "spam", "other"] and info["pooling"] == "last_real"
    assert info["pad_length"] is None and info["max_length"] == info["n_ctx"] == 64
    # every limit, as the server runs with it (docs/predict.md; planted: the limits left out of info)
    from jaxcls.infer.limits import Limits

    assert {k: info[k] for k in Limits.__dataclass_fields__} == {
        **{k: f.default for k, f in Limits.__dataclass_fields__.items()},
        "max_texts": 5, "max_body_bytes": 8192, "max_text_chars": 300}
    # both shapes compiled at startup (fewer if another test compiled the same shapes first)
    assert info["num_compiles"] <= 2 == len(server.predictor.shapes())
    assert server.predictor.warmup() == 0  # every shape was ready before the first request
    status, page = request(server, "GET", "/")
    assert status == 200 and "<textarea" in page and 'fetch("/classify"' in page


def test_classify(server):
    compiles_at_start = server.predictor.num_compiles
    texts = ["Win a free prize now!!!", "see you at lunch", "", "naïve 🎉 " * 30]
    status, out = request(server, "POST", "/classify", {"texts": texts})
    assert status == 200 and len(out["predictions"]) == 4
    want = server.predictor.predict(texts)[1]
    for p, w in zip(out["predictions"], want):
        assert set(p) == {"label", "probability", "probs"}
        assert list(p["probs"]) == ["ham", "spam", "other"]
        np.testing.assert_allclose(list(p["probs"].values()), w, atol=1e-6)
        assert p["label"] == ["ham", "spam", "other"][int(np.argmax(w))]
        assert p["probability"] == p["probs"][p["label"]]
    status, one = request(server, "POST", "/classify", {"text": texts[1]})
    assert status == 200 and len(one["predictions"]) == 1
    np.testing.assert_allclose(one["predictions"][0]["probability"], out["predictions"][1]["probability"],
                               atol=1e-6)
    assert request(server, "GET", "/info")[1]["num_compiles"] == compiles_at_start  # none while serving


def test_concurrent_requests_get_their_own_answers(server):
    """Fails if answers are mixed between requests (planted: Batcher._run hands every item the
    results from offset 0, results[:len(item.texts)], instead of its own slice)."""
    batches = [[f"{w} number {i}" for w in ("win cash", "lunch at", "call me")] for i in range(4)]
    alone = [request(server, "POST", "/classify", {"texts": b}) for b in batches]
    assert all(status == 200 for status, _ in alone)
    alone = [out["predictions"] for _, out in alone]
    for a in range(4):  # every client's answer differs from every other's, so a mix-up shows
        for b in range(a):
            assert alone[a] != alone[b]
    start = threading.Barrier(4)
    results = {}

    def worker(i):
        start.wait(30)
        for _ in range(3):
            results.setdefault(i, []).append(request(server, "POST", "/classify", {"texts": batches[i]}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        assert len(results[i]) == 3
        for status, out in results[i]:
            assert status == 200
            assert [p["label"] for p in out["predictions"]] == [p["label"] for p in alone[i]]
            for got, want in zip(out["predictions"], alone[i]):
                np.testing.assert_allclose(list(got["probs"].values()), list(want["probs"].values()),
                                           atol=1e-6)


def test_busy_or_invalid_port_fails_before_compiling(server):
    """Fails if the port is bound only after the predictor is built and warmed up (planted:
    make_server calls classifier.predictor() and warmup() before bind())."""

    class NeverUsed:
        def predictor(self, **kw):
            raise AssertionError("the predictor was built before the port was bound")

    busy = server.address[1]
    with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{busy}"):
        make_server(NeverUsed(), "127.0.0.1", busy)
    for port in (99999, -1):
        with pytest.raises(ConfigError, match="port must be an integer in 0..65535"):
            make_server(NeverUsed(), "127.0.0.1", port)
    with pytest.raises(ConfigError, match=r"max_texts \(--max-texts\) must be an integer >= 1, got 0"):
        make_server(NeverUsed(), "127.0.0.1", 0, max_texts=0)
    with pytest.raises(ConfigError, match=r"max_queue \(2\) must be >= max_texts \(5\)"):
        make_server(NeverUsed(), "127.0.0.1", 0, max_texts=5, max_queue=2)
    assert request(server, "GET", "/health")[0] == 200  # the failed attempts left it serving


@pytest.mark.parametrize("port", ["busy", "99999"])
def test_cli_serve_reports_a_bad_port_before_loading(server, tmp_path, capsys, port):
    """The model folder does not exist: the port error comes first, as one line with exit 2.
    Fails if cmd_serve loads before binding (planted: load_classifier(args) moved above bind())."""
    port = str(server.address[1]) if port == "busy" else port
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("already in use" in err) if port != "99999" else ("got 99999" in err)


@pytest.mark.parametrize("body,status,message", [
    ("{not json", 400, "not valid UTF-8 JSON"),
    (b"\xff\xfe", 400, "not valid UTF-8 JSON"),
    ([1, 2], 400, "expected a JSON object"),
    ({}, 400, "exactly one of"),
    ({"text": "a", "texts": ["b"]}, 400, "exactly one of"),
    ({"text": 5}, 400, '"text" must be a string'),
    ({"texts": "abc"}, 400, '"texts" must be a list'),
    ({"texts": []}, 400, "is empty"),
    ({"texts": ["a", None]}, 400, r'"texts"[1] must be a string'),
    ({"texts": ["a"] * 6}, 413, "at most 5"),
    ({"text": "x" * 9000}, 413, "over the limit of 8192"),
    ({"texts": ["a", "x" * 301]}, 413, '"texts"[1] has 301 characters; at most 300 per text'),
    ({"text": "x" * 301}, 413, '"text" has 301 characters; at most 300'),
    ('{"texts": [[["a"]]]}', 400, "JSON nested 4 levels deep; at most 3"),
    ("[" * 4000, 400, "JSON nested 4000 levels deep"),
    ('{"text": ' + "7" * 5000 + "}", 400, "a number in the body has 5000 characters; at most 40"),
    ('{"text": "a", "n": -1.' + "5" * 100 + "}", 400, "a number in the body has 103 characters"),
    ('{"texts": ["[[[[[{{{{", "]]]]"]}', 200, None),  # brackets inside texts are text
])
def test_bad_requests(server, body, status, message):
    """Each answer is JSON with its status, never a traceback or a dropped connection. Fails if
    the nesting or number checks go (planted: MAX_DEPTH = 10**6 gives a RecursionError -> 400
    'not valid JSON' for the 4000-deep body, and the 5000-digit number hits int()'s digit limit)."""
    got, out = request(server, "POST", "/classify", body, {"Content-Type": "application/json"})
    assert got == status, out
    if message is None:
        assert len(out["predictions"]) == 2
    else:
        assert message in out["error"]


@pytest.mark.parametrize("method,path,allow", [("PUT", "/classify", "POST"), ("DELETE", "/classify", "POST"),
                                               ("OPTIONS", "/health", "GET, HEAD"), ("GET", "/classify", "POST"),
                                               ("POST", "/info", "GET, HEAD"), ("PATCH", "/", "GET, HEAD")])
def test_wrong_method_is_405_json_with_allow(server, method, path, allow):
    """Fails if the 405 loses its JSON body or Allow header (planted: _http_error returns
    Reject(405, ...) without the {"Allow": allow} headers)."""
    status, out, headers = request(server, method, path, "{}", with_headers=True)
    assert status == 405 and headers["allow"] == allow
    assert out["error"].startswith(f"{path} takes {allow}, not {method}")


def test_serve_without_the_extra_is_one_line(monkeypatch, capsys, tmp_path):
    """Fails if the missing extra surfaces as a traceback or after loading (planted: missing_extra
    checks only 'starlette')."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    assert main(["serve", "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err == "jaxcls serve needs the serve extra: pip install 'jaxcls[serve]'\n"


@pytest.mark.parametrize("flag,value,message", [
    ("--max-batch-size", "0", "max_batch_size (--max-batch-size) must be an integer >= 1, got 0"),
    ("--header-timeout", "0", "header_timeout (--header-timeout) must be a number >= 1e-09, got 0.0"),
    ("--max-batch-delay-ms", "-1", "max_batch_delay_ms (--max-batch-delay-ms) must be a number >= 0"),
    ("--max-queue", "10", "max_queue (10) must be >= max_texts (1024)"),
])
def test_cli_serve_bad_limits_are_one_line(server, tmp_path, capsys, flag, value, message):
    """A bad limit is refused before the port or the model: the busy port is not what it reports.
    Fails if the limits are checked only after bind() (planted: .check() dropped from cmd_serve, leaving
    make_server's check, which runs after bind and load)."""
    port = str(server.address[1])
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--port", port, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcls: error: ") and err.count("\n") == 1 and message in err, err


def test_missing_length_and_unknown_paths(server):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/classify")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "POST", "/nope", {"text": "a"})[0] == 404
    assert request(server, "GET", "/classify")[0] == 405
    assert request(server, "POST", "/health", {})[0] == 405
    status, out = request(server, "GET", "/nope")
    assert status == 404 and out["error"].startswith("no such path '/nope'")
    assert request(server, "GET", "/health")[0] == 200  # still serving


def _chunked(server, body: bytes):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/classify", body=iter([body[:7], body[7:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_chunked_body_is_accepted_and_its_size_checked_while_reading(server):
    """No Content-Length but Transfer-Encoding: chunked is read; over --max-body-bytes (8192 here)
    it is 413 once the count passes the limit. Fails if chunked bodies are refused (planted:
    the `"chunked" not in ...` test dropped: 411) or unbounded (planted: the running `size >
    limit` check removed: a 10 KB list of short texts gets 413 from max_texts instead)."""
    status, out = _chunked(server, json.dumps({"texts": ["free prize", "see you at 5"]}).encode())
    assert status == 200 and len(out["predictions"]) == 2, out
    status, out = _chunked(server, json.dumps({"texts": ["x" * 200] * 50}).encode())
    assert status == 413 and "over the limit of 8192 bytes" in out["error"], out


def test_a_model_error_is_500_named_and_the_server_goes_on_until_the_worker_stops():
    """docs/predict.md: a server error is 500 with the exception named, and the server keeps
    serving; /health answers 503 once the model worker has stopped. Fails if the error is not
    JSON naming the exception (planted: `_internal_error` not registered: starlette's plain-text
    500) or /health ignores the worker (planted: `if not self.batcher.alive` made `if False`)."""
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    clf = Classifier(GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(0)), enc, ["ham", "spam", "other"])
    with make_server(clf, "127.0.0.1", 0, predictor_kw=KW) as srv:
        batcher = srv.service.batcher
        real = batcher.run

        def run(texts):
            if any("explode" in str(getattr(t, "text", t)) for t in texts):
                raise RuntimeError("boom in the model")
            return real(texts)

        batcher.run = run
        status, out = request(srv, "POST", "/classify", {"text": "please explode"})
        assert status == 500 and out == {"error": "RuntimeError: boom in the model"}, (status, out)
        assert request(srv, "POST", "/classify", {"text": "still fine"})[0] == 200
        assert request(srv, "GET", "/health") == (200, {"status": "ok"})
        batcher.close(timeout=10)
        assert request(srv, "GET", "/health") == (503, {"error": "the model worker has stopped"})


# ---- tasks beyond single-label text: pairs, choice, per-field limits, errors from the model -----

def task_server(task, seed=0, max_texts=6, **limits):
    from jaxcls.task import make_task

    task = make_task(task, ["x", "y", "z"], num_choices=3 if task == "choice" else None)
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    model = GPT2Classifier(TINY_SIZES["tiny"], task.head_width, rngs=nnx.Rngs(seed))
    clf = Classifier(model, enc, task.label_names, task=task)
    return clf, make_server(clf, "127.0.0.1", 0, predictor_kw=KW, max_texts=max_texts,
                            max_body_bytes=8192, max_text_chars=300, **limits)


def test_pair_and_choice_requests_answer_as_classifier_predict():
    """JSON of each layout gives Classifier.predict's answers, one object or a "texts" list; the
    form offers the layout's fields. Planted: _predict answering without the option count (choice
    probs for every column) -> fails; the page for layout 'text' whatever the task -> fails."""
    pairs = [("the cat sat", "on the mat"), ("free cash now", "call 42"), ("hello", "lunch?")]
    clf, srv = task_server("pair-multilabel")
    with srv:
        want, probs = clf.predict(pairs, return_probs=True)
        status, out = request(srv, "POST", "/classify", {"texts": [{"text": a, "text_pair": b} for a, b in pairs]})
        assert status == 200 and [p["labels"] for p in out["predictions"]] == want
        for p, w in zip(out["predictions"], probs):
            np.testing.assert_allclose(list(p["probs"].values()), w, atol=1e-6)
        status, one = request(srv, "POST", "/classify", {"text": pairs[1][0], "text_pair": pairs[1][1]})
        assert status == 200 and one["predictions"] == [out["predictions"][1]]
        page = request(srv, "GET", "/")[1]
        assert 'id="text_pair"' in page and 'id="texts"' not in page
        assert request(srv, "GET", "/info")[1]["fields"] == ["text", "text_pair"]
    examples = [{"context": "pick the animal", "choices": ["car", "cat"]},
                {"context": "pick a number", "question": "which?", "choices": ["42", "lunch", "tea"]}]
    clf, srv = task_server("choice", max_texts=10)
    with srv:
        want, probs = clf.predict(examples, return_probs=True)
        status, out = request(srv, "POST", "/classify", {"texts": examples})
        assert status == 200 and [p["index"] for p in out["predictions"]] == want
        assert len(out["predictions"][0]["probs"]) == 2 and len(out["predictions"][1]["probs"]) == 3
        for p, w, e in zip(out["predictions"], probs, examples):
            np.testing.assert_allclose(p["probs"], w[:len(e["choices"])], atol=1e-6)
            assert p["probability"] == p["probs"][p["index"]]
        page = request(srv, "GET", "/")[1]
        assert 'id="context"' in page and 'id="choices"' in page and 'id="question"' in page


@pytest.mark.parametrize("body,status,message", [
    ({"text": "a"}, 400, '"text_pair" is missing'),
    ({"texts": [{"text": "a", "text_pair": "b"}, {"text": "a"}]}, 400, '"texts"[1]."text_pair" is missing'),
    ({"text": "a", "text_pair": 3}, 400, '"text_pair" must be a string, got int'),
    ({"text": "a", "text_pair": "b", "label": "x"}, 400, '"label": not a field of this task'),
    ({"texts": ["a b"]}, 400, '"texts"[0] must be an object'),
    ({"texts": [{"text": "a", "text_pair": "b"}] * 4}, 413, "more than 6 texts (every text field counts)"),
    ({"text": "a", "text_pair": "x" * 301}, 413, '"text_pair" has 301 characters; at most 300'),
    ({"text": "", "text_pair": "b"}, 400, "'text' encodes to no tokens"),
])
def test_pair_bad_requests(body, status, message):
    """Every text field counts against --max-texts and --max-text-chars. Planted: examples_of
    counting examples instead of text fields -> the 4-pair request (8 texts) passes -> fails."""
    _, srv = task_server("pair-multilabel")
    with srv:
        got, out = request(srv, "POST", "/classify", body)
        assert got == status and message in out["error"], out


def test_choice_limits_and_depth():
    """Choice bodies are one level deeper ({"texts": [{"choices": [...]}]}, allowed) and every
    option counts as a text. Planted: max_depth left at 3 for choice -> the list form is refused -> fails."""
    _, srv = task_server("choice")
    with srv:
        ex = {"context": "c", "choices": ["a", "b"]}
        assert request(srv, "POST", "/classify", {"texts": [ex, ex]})[0] == 200
        status, out = request(srv, "POST", "/classify", {"context": "c", "choices": ["a", "y" * 301]})
        assert status == 413 and '"choices"[1] has 301 characters' in out["error"]
        status, out = request(srv, "POST", "/classify", {"context": "c", "choices": list("abcdef")})
        assert status == 413 and "more than 6 texts" in out["error"]
        status, out = request(srv, "POST", "/classify", {"context": "c", "choices": []})
        assert status == 400 and "non-empty list" in out["error"]


def test_sliding_token_cap_is_400_and_spares_the_batch():
    """A text over the sliding-window token cap is the client's error (400 naming it), not a 500, and
    requests gathered in the same batch still get their answers. Planted: the `except DataError`
    in ClassifierApp.classify removed -> 500; Batcher._run failing every gathered item -> the good
    request fails."""
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    clf = Classifier(GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(0)), enc, ["a", "b", "c"])
    srv = make_server(clf, "127.0.0.1", 0, predictor_kw={**KW, "long": "sliding", "max_text_tokens": 100},
                      max_batch_delay_ms=300)
    with srv:
        results = {}

        def post(key, text):
            results[key] = request(srv, "POST", "/classify", {"texts": ["fine", text]})

        threads = [threading.Thread(target=post, args=("bad", "word " * 150)),
                   threading.Thread(target=post, args=("good", "a short text"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        status, out = results["bad"]
        assert status == 400 and out["error"].startswith("text at index 1: more than 100 tokens"), out
        assert results["good"][0] == 200 and len(results["good"][1]["predictions"]) == 2
        assert request(srv, "GET", "/health")[0] == 200


def test_one_text_requests_are_keyed_by_length_bucket_and_gathered_per_bucket():
    """A one-text request is tokenized at submit and keyed by the bucket it pads to; several texts
    go unkeyed. Concurrent short and long requests then share calls only with their own length,
    and each gets predict's answer (shorter texts may top up a longer call to the rows it is padded
    to). Planted: classify submitting with key=None -> one call of all six -> fails; _length_key
    not capping at max_length -> the long text's key is off -> fails."""
    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    clf = Classifier(GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(0)), enc, ["a", "b", "c"])
    kw = {**KW, "bucket_lengths": (16, 64)}
    srv = make_server(clf, "127.0.0.1", 0, predictor_kw=kw, max_batch_delay_ms=300)
    app, p = srv.service, srv.predictor
    short, long_, over = "see you soon", "word " * 30, "word " * 200
    for texts, key in [([short], 16), ([long_], 64), ([over], 64), ([""], 16), ([short, short], None)]:
        parsed = app._parse_and_tokenize(json.dumps({"texts": texts}).encode())
        assert app._length_key(parsed) == key, texts
        if key is not None:
            assert list(parsed[0].ids) == list(enc.encode(texts[0]))[: p.max_length + 1]  # bounded at submit
    calls = []
    run = app.batcher.run
    app.batcher.run = lambda examples: calls.append([len(p.encode(t)) for t in examples]) or run(examples)
    with srv:
        results = {}
        texts = [short, long_, "hi", long_ + "more", "ok then", long_ + "words"]

        def post(i):
            results[i] = request(srv, "POST", "/classify", {"text": texts[i]})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    want = p.predict(texts)[1]
    for i, w in enumerate(want):
        assert results[i][0] == 200
        np.testing.assert_allclose(list(results[i][1]["predictions"][0]["probs"].values()), w, atol=1e-6)
    assert sorted(n for call in calls for n in call) == sorted(len(enc.encode(t)) for t in texts)
    assert len(calls) < len(texts), calls
    for call in calls:  # the oldest leads; shorter texts only fill rows its own bucket pads to anyway
        same = sum((n <= 16) == (call[0] <= 16) for n in call)
        assert all(n <= 16 for n in call) or call[0] > 16, calls
        assert len(call) == same or len(call) <= app._rows_for(same), calls


def test_a_one_text_request_is_tokenized_once_off_the_model_thread(server, monkeypatch):
    """The ids computed at submit (bounded, by Predictor.token_ids) are the ones the worker runs:
    the model thread encodes nothing. A 295-character text is long enough that the bounded
    encoder reads it in prefixes. Fails if the predictor ignores `text.ids` (planted:
    `ids = None` in token_ids) or the app stops attaching them (planted: no `_Tokenized`)."""
    import threading

    calls = []
    encode = server.predictor.encode

    def recording(text):
        calls.append(threading.current_thread().name)
        return encode(text)

    monkeypatch.setattr(server.predictor, "encode", recording)
    text = "word " * 59
    status, out = request(server, "POST", "/classify", {"text": text})
    assert status == 200
    assert calls and "jaxcls-model-worker" not in calls, calls
    monkeypatch.setattr(server.predictor, "encode", encode)
    np.testing.assert_allclose(list(out["predictions"][0]["probs"].values()),
                               server.predictor.predict([text])[1][0], atol=1e-6)
