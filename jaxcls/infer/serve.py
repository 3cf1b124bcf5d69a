"""A small HTTP server for a trained classifier, standard library only.

    POST /classify  {"text": "..."} or {"texts": ["...", ...]}
                    -> {"predictions": [{"label": ..., "probability": ..., "probs": {name: p}}]}
    GET  /health    -> {"status": "ok"}
    GET  /info      -> labels, pooling, pad_length, max_length, n_ctx, num_compiles, ...
    GET  /          -> a one-page HTML form

Bad requests get a 4xx status and {"error": "..."}. Requests are handled in threads, but the model
runs one request at a time (a lock around the predictor): each request's texts go through the
fixed-shape buckets, which were all compiled at startup (the predictor's `warmup()`), so no request
waits for a compile. The address is bound before anything compiles, so a busy port fails at once.
Binds to 127.0.0.1 unless told otherwise; there is no authentication.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from jaxcls.errors import ConfigError

MAX_TEXTS = 1024
MAX_BODY_BYTES = 8 * 1024 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClassifierServer(ThreadingHTTPServer):
    """Holds its address from construction on (see `bind`); listens once `attach` gives it a
    classifier, so no client connects to a server that cannot answer yet."""

    daemon_threads = True

    def __init__(self, address):
        self.classifier = self.predictor = None
        self.max_texts, self.max_body_bytes, self.log = MAX_TEXTS, MAX_BODY_BYTES, False
        self.lock = threading.Lock()
        super().__init__(address, _Handler, bind_and_activate=False)
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise

    def attach(self, classifier, predictor, *, max_texts: int = MAX_TEXTS,
               max_body_bytes: int = MAX_BODY_BYTES, log: bool = False) -> None:
        """Serve `classifier` through `predictor` and start listening (`serve_forever()` answers)."""
        self.classifier, self.predictor = classifier, predictor
        self.max_texts, self.max_body_bytes, self.log = max_texts, max_body_bytes, log
        self.server_activate()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        clf, predictor = self.classifier, self.predictor
        return {
            "labels": list(clf.label_names),
            "pooling": clf.pooling,
            "pad_length": clf.pad_length,
            "max_length": clf.max_length,
            "n_ctx": clf.model.config.n_ctx,
            "long": predictor.long,
            "bucket_lengths": list(predictor.bucket_lengths),
            "batch_size": predictor.batch_size,
            "num_compiles": predictor.num_compiles,
            "max_texts": self.max_texts,
        }

    def classify(self, texts: list[str]) -> list[dict]:
        names = list(self.classifier.label_names)
        with self.lock:
            ids, probs = self.predictor.predict(texts)
        out = []
        for i, p in zip(ids.tolist(), np.asarray(probs, np.float64)):
            out.append({"label": names[i], "probability": float(p[i]),
                        "probs": {n: float(x) for n, x in zip(names, p)}})
        return out


class _Handler(BaseHTTPRequestHandler):
    server: ClassifierServer
    server_version = "jaxcls"

    def log_message(self, format, *args):
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/info":
            self._json(200, self.server.info())  # no lock: answers while a batch runs
        elif path in ("/", "/index.html"):
            self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/classify":
            self._error(405, "use POST /classify with a JSON body")
        else:
            self._error(404, f"no such path {path!r}; try /, /classify, /health or /info")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path != "/classify":
            if path in ("/", "/health", "/info"):
                self._error(405, f"{path} takes GET")
            else:
                self._error(404, f"no such path {path!r}; POST to /classify")
            return
        try:
            texts = self._read_texts()
        except _BadRequest as e:
            self.close_connection = True  # the body may be unread
            self._error(e.status, str(e))
            return
        try:
            predictions = self.server.classify(texts)
        except Exception as e:  # a bug, not the client's fault; keep serving
            self._error(500, f"{type(e).__name__}: {e}")
            return
        self._json(200, {"predictions": predictions})

    def _read_texts(self) -> list[str]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _BadRequest(411, "a Content-Length header is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise _BadRequest(400, f"bad Content-Length {length!r}") from None
        if n > self.server.max_body_bytes:
            raise _BadRequest(413, f"body of {n} bytes is over the limit of "
                                   f"{self.server.max_body_bytes} bytes")
        body = self.rfile.read(n)
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _BadRequest(400, f"body is not valid UTF-8 JSON ({e})") from None
        if not isinstance(obj, dict):
            raise _BadRequest(400, 'expected a JSON object {"text": "..."} or {"texts": [...]}')
        if ("text" in obj) == ("texts" in obj):
            raise _BadRequest(400, 'give exactly one of "text" (a string) and "texts" (a list of strings)')
        if "text" in obj:
            texts = [obj["text"]]
            if not isinstance(obj["text"], str):
                raise _BadRequest(400, f'"text" must be a string, got {type(obj["text"]).__name__}')
        else:
            texts = obj["texts"]
            if not isinstance(texts, list):
                raise _BadRequest(400, f'"texts" must be a list of strings, got {type(texts).__name__}')
            if not texts:
                raise _BadRequest(400, '"texts" is empty')
            if len(texts) > self.server.max_texts:
                raise _BadRequest(413, f'"texts" has {len(texts)} entries; at most '
                                       f"{self.server.max_texts} per request")
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise _BadRequest(400, f'"texts"[{i}] must be a string, got {type(t).__name__}')
        return texts


def bind(host: str = "127.0.0.1", port: int = 0) -> ClassifierServer:
    """A server holding `host:port` but not yet listening. A bad, busy or forbidden address is a
    ConfigError here, in milliseconds, not after a model has loaded and compiled."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 0..65535, got {port!r}")
    try:
        return ClassifierServer((host, port))
    except (OSError, OverflowError, UnicodeError) as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e})") from None


def make_server(classifier, host: str = "127.0.0.1", port: int = 0, *, warmup: bool = True,
                max_texts: int = MAX_TEXTS, max_body_bytes: int = MAX_BODY_BYTES,
                predictor_kw: dict | None = None, log: bool = False,
                server: ClassifierServer | None = None) -> ClassifierServer:
    """A listening, not yet started server (`serve_forever()` starts it; port 0 picks a free port,
    see `server.url`). The address is bound first, or `server` (from `bind`) is used. The model
    runs through `classifier.predictor(**predictor_kw)`; `warmup` compiles all of that
    predictor's batch shapes before the server listens, so no request waits for a compile."""
    if max_texts < 1:
        raise ConfigError(f"max_texts must be >= 1, got {max_texts}")
    server = bind(host, port) if server is None else server
    try:
        predictor = classifier.predictor(**(predictor_kw or {}))
        if warmup:
            predictor.warmup()
        server.attach(classifier, predictor, max_texts=max_texts, max_body_bytes=max_body_bytes, log=log)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(classifier, host: str = "127.0.0.1", port: int = 8000, *,
          server: ClassifierServer | None = None, **kw) -> None:
    """Serve until interrupted (Ctrl-C); `server` (from `bind`) replaces host and port."""
    kw.setdefault("log", True)
    server = bind(host, port) if server is None else server
    try:
        print("jaxcls: compiling the batch shapes before serving...", file=sys.stderr, flush=True)
        make_server(classifier, server=server, **kw)
        print(f"jaxcls: serving {', '.join(classifier.label_names)} classifier on {server.url} "
              "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        server.serve_forever()
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxcls</title>
<style>
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}
textarea{width:100%;height:8rem;font:inherit}
table{border-collapse:collapse;margin-top:1rem}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}
#err{color:#b00}
</style></head><body>
<h1>jaxcls classifier</h1>
<p id="info"></p>
<p>One text per line:</p>
<textarea id="texts">You won a free prize! Call now to claim it.
See you at lunch tomorrow?</textarea>
<p><button id="go">Classify</button> <span id="err"></span></p>
<table id="out"></table>
<script>
const esc = s => s.replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
fetch("/info").then(r => r.json()).then(i => {
  document.getElementById("info").textContent =
    "labels: " + i.labels.join(", ") + " | pooling: " + i.pooling + " | max length: " + i.max_length;
});
document.getElementById("go").onclick = async () => {
  const texts = document.getElementById("texts").value.split("\\n").filter(t => t.trim());
  const err = document.getElementById("err"), out = document.getElementById("out");
  err.textContent = ""; out.innerHTML = "";
  if (!texts.length) { err.textContent = "type a text first"; return; }
  const r = await fetch("/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({texts})});
  const j = await r.json();
  if (!r.ok) { err.textContent = j.error; return; }
  out.innerHTML = "<tr><th>text</th><th>label</th><th>probability</th></tr>" +
    j.predictions.map((p, k) => "<tr><td>" + esc(texts[k]) + "</td><td>" + esc(p.label) +
                      "</td><td>" + p.probability.toFixed(3) + "</td></tr>").join("");
};
</script>
</body></html>
"""
