"""What one `jaxcls serve` server accepts, and how long it waits: stdlib only, so the command
line can list the flags and check them without the serve extra installed."""

from __future__ import annotations

import dataclasses

from jaxcls.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts; each field is a `jaxcls serve` flag (`max_texts` is --max-texts)."""

    max_texts: int = 1024
    max_text_chars: int = 100_000
    max_body_bytes: int = 8 * 1024 * 1024
    max_queue: int = 4096
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_connections: int = 512
    backlog: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    request_timeout: float = 60.0
    shutdown_timeout: float = 30.0

    def check(self) -> "Limits":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name == "max_batch_delay_ms" else 1e-9 if f.type == "float" else 1
            kinds = (int,) if f.type == "int" else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or not v >= low or v == float("inf"):
                flag = "--" + f.name.replace("_", "-")
                kind = "an integer" if f.type == "int" else "a number"
                raise ConfigError(f"{f.name} ({flag}) must be {kind} >= {low:g}, got {v!r}")
        if self.max_queue < self.max_texts:
            raise ConfigError(f"max_queue ({self.max_queue}) must be >= max_texts ({self.max_texts}): "
                              "a full-sized request could never be queued")
        return self


HELP = {  # field -> what it bounds and what a client sees past it (the --help of each flag)
    "max_texts": "most texts per request (more: 413)",
    "max_text_chars": "most characters per text (more: 413 naming the text's index)",
    "max_body_bytes": "largest request body in bytes, checked from Content-Length and while reading (more: 413)",
    "max_queue": "most texts waiting for the model; a request that would pass it gets 503 with Retry-After",
    "max_batch_size": "most texts gathered from concurrent requests into one model call",
    "max_batch_delay_ms": "how long the first text of a batch waits for others to join it (0: no gathering, "
                          "each request runs alone)",
    "max_connections": "most open connections and requests at once (more: 503)",
    "backlog": "connections the kernel queues before the server accepts them",
    "header_timeout": "seconds for a request's line and headers; a connection that sends nothing or part of "
                      "them is closed (408 when part came)",
    "body_timeout": "seconds for a request's body once its headers are in (then 408 and the connection closes)",
    "keep_alive_timeout": "seconds an idle connection stays open after an answer",
    "request_timeout": "seconds from accepting a request's texts to its answer (then 504)",
    "shutdown_timeout": "seconds SIGTERM or Ctrl-C waits for requests in flight before stopping",
}
