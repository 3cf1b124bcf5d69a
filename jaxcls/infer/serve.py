"""`jaxcls serve`'s HTTP server: the app of serve_app.py on uvicorn (asyncio, h11), on a socket
bound before the model loads, with every wait bounded.

Needs the `serve` extra (starlette, uvicorn, prometheus_client). What each limit does is in
`limits.Limits`; how they reach the network:

* The port is bound by `bind` before anything loads or compiles, so a busy or invalid port fails
  at once; the socket listens (uvicorn, `backlog`) only once the model is warm, so no client
  connects to a server that cannot answer yet.
* `max_connections` bounds open connections and requests in flight together, as uvicorn's
  `limit_concurrency` does, but `_TimedH11` applies it so that the 503 past it is JSON with a
  Retry-After, like every other error of the API (uvicorn's own is plain text). A malformed
  request or one with headers over MAX_HEADER_BYTES gets a JSON 400 for the same reason.
* `keep_alive_timeout` is uvicorn's: an idle connection after an answer is closed.
* uvicorn has no timeout for a connection that has not sent a whole request line and headers
  (its keep-alive clock starts only after a first answer, and stops at the next byte), so an
  open socket that sends nothing, or half a header line, would be held for ever. `_TimedH11`
  adds that clock: `header_timeout` seconds from the connection's start or a new request's first
  byte; then a 408 (if a partial request came) and the connection is closed. The body has its
  own clock in the app (`body_timeout`, 408).
* SIGTERM (or SIGINT) stops accepting, lets requests in flight finish for `shutdown_timeout`
  seconds (uvicorn's graceful shutdown), then stops the model worker.

Binds 127.0.0.1 unless told otherwise; there is no authentication.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxcls.errors import ConfigError
from jaxcls.infer.limits import Limits
from jaxcls.infer.serve_app import ClassifierApp

MAX_HEADER_BYTES = 16 * 1024  # request line and headers; more is h11's 400


_BUSY = json.dumps({"error": "the server is at its connection limit (max_connections); retry later"}).encode()


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's line and headers, and the
    connection limit answered in JSON."""

    header_timeout = 10.0
    max_connections: int | None = None
    _header_timer = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        app = self.app

        async def limited(scope, receive, send):
            # uvicorn's test, made once this request's task is in self.tasks (hence `>`)
            over = self.max_connections is not None and (
                len(self.connections) > self.max_connections or len(self.tasks) > self.max_connections)
            if not over:
                return await app(scope, receive, send)
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BUSY)),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": _BUSY})

        self.app = limited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def send_400_response(self, msg: str) -> None:
        """h11's refusal of a malformed request (or headers over MAX_HEADER_BYTES), in JSON."""
        body = json.dumps({"error": f"bad HTTP request: {msg}"}).encode()
        for event in (h11.Response(status_code=400, reason=b"Bad Request", headers=[
                (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a new request start its clock
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why it ends
            body = b'{"error": "the request line and headers did not arrive in time"}'
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, calling `on_started` once its sockets listen."""

    on_started = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket holding `host:port`, not yet listening. A bad, busy or forbidden address is a
    ConfigError here, in milliseconds, not after a model has loaded and compiled."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 0..65535, got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise ConfigError(f"cannot serve on {host}:{port} ({e})") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """A uvicorn server for one `ClassifierApp` on a bound socket. `run()` serves in this thread
    until SIGTERM/SIGINT (or `stop()`); `start()` serves in a background thread; as a context
    manager it starts and stops. The model worker stops when serving ends."""

    def __init__(self, service: ClassifierApp, sock: socket.socket, *, log: bool = False):
        self.service, self.sock, self.limits = service, sock, service.limits
        lim = self.limits
        protocol = type("TimedH11", (_TimedH11,), {"header_timeout": lim.header_timeout,
                                                   "max_connections": lim.max_connections})
        config = uvicorn.Config(
            service.app, http=protocol, loop="asyncio", lifespan="off", log_config=LOGGING_CONFIG if log else None,
            log_level="info" if log else "warning", access_log=log,
            limit_concurrency=None, backlog=lim.backlog,  # max_connections: _TimedH11
            timeout_keep_alive=lim.keep_alive_timeout, timeout_graceful_shutdown=lim.shutdown_timeout,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False)
        self.uvicorn = _Uvicorn(config)
        service.metrics.connections.set_function(lambda: len(self.uvicorn.server_state.connections))
        self._thread: threading.Thread | None = None

    @property
    def classifier(self):
        return self.service.classifier

    @property
    def predictor(self):
        return self.service.predictor

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def run(self, on_started=None) -> None:
        """Serve until stopped; `on_started()` runs once the socket listens."""
        self.uvicorn.on_started = on_started
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.close()

    def close(self) -> None:
        self.service.close(self.limits.shutdown_timeout)
        self.sock.close()

    def start(self, timeout: float = 30) -> "Server":
        """Serve in a daemon thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.run, name="jaxcls-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: no new connections, requests in flight finish, then the worker ends."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.limits.shutdown_timeout + 10)

    def __enter__(self) -> "Server":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_server(classifier, host: str = "127.0.0.1", port: int = 0, *, limits: Limits | None = None,
                warmup: bool = True, predictor_kw: dict | None = None, predictor=None, log: bool = False,
                sock: socket.socket | None = None, **limit_kw) -> Server:
    """A server for `classifier`, not yet started (`run()`, `start()` or `with`; port 0 picks a
    free port, see `server.url`). Limits come from `limits` and keyword overrides of its fields
    (`max_texts=5`). The address is bound first, or `sock` (from `bind`) is used. The model runs
    through `predictor`, or `classifier.predictor(**predictor_kw)`; `warmup` compiles all of its
    batch shapes before the server listens, so no request waits for a compile."""
    try:
        limits = dataclasses.replace(limits or Limits(), **limit_kw).check()
    except TypeError as e:
        raise ConfigError(f"unknown server limit: {e}") from None
    sock = bind(host, port) if sock is None else sock
    try:
        if predictor is None:
            predictor = classifier.predictor(**(predictor_kw or {}))
        if warmup:
            predictor.warmup()
        return Server(ClassifierApp(classifier, predictor, limits), sock, log=log)
    except BaseException:
        sock.close()
        raise


def serve(classifier, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
          **kw) -> None:
    """Serve until SIGTERM or Ctrl-C; `sock` (from `bind`) replaces host and port."""
    kw.setdefault("log", True)
    sock = bind(host, port) if sock is None else sock
    print("jaxcls: compiling the batch shapes before serving...", file=sys.stderr, flush=True)
    server = make_server(classifier, sock=sock, **kw)
    server.run(on_started=lambda: print(
        f"jaxcls: serving {', '.join(classifier.label_names)} classifier on {server.url} "
        "(Ctrl-C or SIGTERM to stop)", file=sys.stderr, flush=True))
