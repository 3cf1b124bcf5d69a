"""The ASGI application behind `jaxcls serve` (starlette), its limits and its /metrics.

    POST /classify  {"text": "..."} or {"texts": ["...", ...]}
                    -> {"predictions": [{"label": ..., "probability": ..., "probs": {name: p}}]}
                    pair, similarity: {"text": ..., "text_pair": ...} or {"texts": [{...}, ...]};
                    choice: {"context": ..., "question": ... (optional), "choices": [...]} or
                    {"texts": [{...}, ...]}; each answer as infer/answers.py writes it per task
    GET  /health    -> {"status": "ok"}
    GET  /info      -> labels, pooling, lengths, buckets, num_compiles and the limits
    GET  /metrics   -> Prometheus text format
    GET  /          -> a one-page HTML form

Every error is JSON, {"error": "..."}, with its status: 400 bad JSON or shape, 404 unknown path,
405 wrong method (with `Allow`), 408 body too slow, 411 no length, 413 body, list or text too large (every
text field counts: a pair is two texts, a choice example its context, question and options), 422 never (shapes are 400, sizes 413), 503 queue full (with `Retry-After`), 504 compute timeout.

The event loop never runs the model: texts go to a `Batcher` (one model thread, dynamic
batching). It never tokenizes or parses a large body either: those run in a small thread pool.
Tokenization there (tiktoken releases the GIL) means one long text cannot stall the batch of
short ones behind it; the texts carry the ids `Predictor.token_ids` gave them (bounded, as the
worker would compute them), so the worker does not encode them again, and
the short texts of a request with several, which tokenize in microseconds, stay in the worker.
The per-text character limit bounds that work (BPE on a long run of one character grows faster
than linearly).
A one-text request is tokenized at submit whatever its length (tens of microseconds for a short
one, work the worker then skips), so its item is keyed by the length bucket it pads to and the
batcher gathers texts of one length into a call, topped up with shorter ones to the predictor's
row bucket (see batcher.py); other requests gather unkeyed.

/metrics uses prometheus_client, the reference client: its text format and histogram rules are
exact, and a registry per app keeps two servers in one process (tests) apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jaxcls.data import length_buckets
from jaxcls.errors import DataError
from jaxcls.infer.answers import INPUT_FIELDS, answer, option_count
from jaxcls.infer.batcher import Batcher, QueueFull
from jaxcls.infer.limits import Limits
from jaxcls.infer.requests import Reject, parse_texts
from jaxcls.infer.serve_page import page as render_page

PRETOKENIZE_CHARS = 2000  # longer texts are tokenized in the pool, shorter ones in the worker
PARSE_IN_POOL_BYTES = 64 * 1024
PATHS = ("/", "/index.html", "/classify", "/health", "/info", "/metrics")


class _Tokenized(str):
    """A text with the ids `Predictor.token_ids` gave it at submit; the predictor reuses them."""

    ids: np.ndarray


class Metrics:
    """The Prometheus series of one server."""

    def __init__(self, max_batch_size: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxcls_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.errors = Counter("jaxcls_errors", "error answers, by reason", ["reason"], registry=r)
        self.latency = Histogram("jaxcls_request_seconds", "time from request to answer, by path", ["path"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        sizes = sorted({2**k for k in range(max_batch_size.bit_length() + 1)} | {max_batch_size})
        self.batch_texts = Histogram("jaxcls_batch_texts", "texts per model call", buckets=sizes, registry=r)
        self.batch_seconds = Histogram("jaxcls_batch_seconds", "seconds per model call", registry=r)
        self.texts = Counter("jaxcls_texts", "texts classified", registry=r)
        self.queue = Gauge("jaxcls_queue_texts", "texts waiting for the model", registry=r)
        self.compiles = Gauge("jaxcls_compiles", "programs compiled by the predictor (predictor.num_compiles)",
                              registry=r)
        self.connections = Gauge("jaxcls_open_connections", "open HTTP connections", registry=r)

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_texts.observe(n)
        self.batch_seconds.observe(seconds)
        self.texts.inc(n)


class ClassifierApp:
    """The app for `classifier` served through `predictor` under `limits`; `app` is the ASGI
    callable. `close()` stops the model worker after the last request."""

    def __init__(self, classifier, predictor, limits: Limits):
        self.classifier, self.predictor, self.limits = classifier, predictor, limits.check()
        self.task = predictor.task
        self.names = list(classifier.label_names)
        self.metrics = Metrics(limits.max_batch_size)
        self.batcher = Batcher(self._predict, max_batch_size=limits.max_batch_size,
                               max_delay_s=limits.max_batch_delay_ms / 1000, max_queue=limits.max_queue,
                               on_batch=self.metrics.on_batch, fill=self._rows_for)
        self.metrics.queue.set_function(lambda: self.batcher.pending)
        self.metrics.compiles.set_function(lambda: predictor.num_compiles)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxcls-parse")
        get = ["GET"]
        routes = [Route("/", self.page, methods=get), Route("/index.html", self.page, methods=get),
                  Route("/health", self.health, methods=get), Route("/info", self.info_route, methods=get),
                  Route("/metrics", self.metrics_route, methods=get),
                  Route("/classify", self.classify, methods=["POST"])]
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                                 Exception: self._internal_error})
        self.app = self._observe(starlette)

    def close(self, timeout: float | None = 30) -> None:
        self.batcher.close(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict:
        clf, p = self.classifier, self.predictor
        return {"task": self.task.name, "fields": list(INPUT_FIELDS[self.task.inputs.kind]),
                "labels": self.names, "pooling": clf.pooling, "pad_length": clf.pad_length,
                "max_length": clf.max_length, "n_ctx": clf.model.config.n_ctx, "long": p.long,
                "bucket_lengths": list(p.bucket_lengths), "batch_size": p.batch_size,
                "num_compiles": p.num_compiles, **dataclasses.asdict(self.limits)}

    def _predict(self, examples: list) -> list[dict]:
        """The worker's call: one predictor call for the gathered texts or examples."""
        decisions, probs = self.predictor.predict(examples)
        probs = np.asarray(probs, np.float64)
        return [answer(self.task, self.names, d, p, n_options=option_count(ex))
                for ex, d, p in zip(examples, decisions, probs)]

    def _observe(self, app):
        """Counts every answer (status, path, latency), the app's own 404s and 405s included."""

        async def observed(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                path = scope["path"] if scope["path"] in PATHS else "other"
                self.metrics.requests.labels(path, str(status[0])).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)

        return observed

    def error(self, e: Reject) -> JSONResponse:
        self.metrics.errors.labels(e.reason).inc()
        return JSONResponse({"error": str(e)}, e.status, headers=e.headers)

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 405:
            allow = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
            hint = "; use POST /classify with a JSON body" if path == "/classify" else ""
            return self.error(Reject(405, "method", f"{path} takes {allow}, not {request.method}{hint}",
                                     {"Allow": allow}))
        if exc.status_code == 404:
            return self.error(Reject(404, "not_found", f"no such path {path!r}; try /, /classify, "
                                                       "/health, /info or /metrics"))
        return self.error(Reject(exc.status_code, "http", str(exc.detail), exc.headers))

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        return self.error(Reject(500, "internal", f"{type(exc).__name__}: {exc}"))

    async def page(self, request: Request) -> Response:
        return HTMLResponse(render_page(self.task.inputs.kind))

    async def health(self, request: Request) -> Response:
        if not self.batcher.alive:
            return self.error(Reject(503, "worker_stopped", "the model worker has stopped"))
        return JSONResponse({"status": "ok"})

    async def info_route(self, request: Request) -> Response:
        return JSONResponse(self.info())

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def classify(self, request: Request) -> Response:
        try:
            body = await self._read_body(request)
            loop = asyncio.get_running_loop()
            if len(body) > PARSE_IN_POOL_BYTES:
                texts = await loop.run_in_executor(self.pool, self._parse_and_tokenize, body)
            else:
                texts = self._parse_and_tokenize(body)
            future = self.batcher.submit(texts, key=self._length_key(texts))
        except Reject as e:
            return self.error(e)
        except QueueFull as e:
            return self.error(Reject(503, "queue_full", f"the server is busy: {e}; retry later",
                                     {"Retry-After": "1"}))
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; counted, never sent
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), self.limits.request_timeout)
        except TimeoutError:
            return self.error(Reject(504, "compute_timeout", f"no answer within the request timeout of "
                                                             f"{self.limits.request_timeout:g} s"))
        except DataError as e:  # a text the model cannot take (sliding-window token cap, an empty part)
            return self.error(Reject(400, "bad_text", str(e)))
        return JSONResponse({"predictions": results})

    def _parse_and_tokenize(self, body: bytes) -> list:
        texts = parse_texts(body, self.limits, self.task.inputs.kind)
        if self.task.inputs.kind != "text":
            return texts
        for i, t in enumerate(texts):
            if len(t) > PRETOKENIZE_CHARS or len(texts) == 1:
                texts[i] = _Tokenized(t)
                texts[i].ids = self.predictor.token_ids(t, i)
        return texts

    def _rows_for(self, n: int) -> int:
        """The rows the predictor pads a call of n one-row texts to (its smallest row bucket >= n)."""
        return next((r for r in self.predictor.row_buckets if r >= n), n)

    def _length_key(self, texts: list) -> int | None:
        """The bucket length a one-text request pads to (its gathering key); None for others."""
        ids = getattr(texts[0], "ids", None) if len(texts) == 1 else None
        if ids is None:
            return None
        p = self.predictor
        n = min(max(len(ids), 1), p.max_length)  # an empty text runs as one pad token; long ones as max_length
        return int(length_buckets(np.array([n]), p.bucket_lengths)[0])

    async def _read_body(self, request: Request) -> bytes:
        limit, close = self.limits.max_body_bytes, {"Connection": "close"}
        length = request.headers.get("content-length")
        if length is None and "chunked" not in request.headers.get("transfer-encoding", "").lower():
            raise Reject(411, "no_length", "a Content-Length header is required")
        if length is not None:
            if not length.isdigit():
                raise Reject(400, "bad_length", f"bad Content-Length {length!r}", close)
            if int(length) > limit:
                raise Reject(413, "body_too_large", f"body of {int(length)} bytes is over the limit of "
                                                    f"{limit} bytes", close)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise Reject(413, "body_too_large", f"body of more than {limit} bytes is over "
                                                            f"the limit of {limit} bytes", close)
                    chunks.append(chunk)
        except TimeoutError:
            raise Reject(408, "body_timeout", f"the body did not arrive within {self.limits.body_timeout:g} s",
                         close) from None
        return b"".join(chunks)
