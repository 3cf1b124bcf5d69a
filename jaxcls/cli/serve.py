"""`jaxcls serve`: a saved classifier over HTTP (jaxcls/infer/serve.py), with its limits as flags.
Needs the `serve` extra; without it the command says so in one line."""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys

from jaxcls.cli.common import load_classifier, model_options, predictor_kw
from jaxcls.infer.limits import HELP, Limits

EXTRA_MODULES = ("starlette", "uvicorn", "prometheus_client")
NEEDS_EXTRA = "jaxcls serve needs the serve extra: pip install 'jaxcls[serve]'"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a saved classifier over HTTP (POST /classify, GET /, /metrics)")
    model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the default, 127.0.0.1, is reachable from this machine only")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    for f in dataclasses.fields(Limits):
        kind = int if f.type == "int" else float
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       metavar="S" if "timeout" in f.name else "MS" if f.name.endswith("_ms") else "N", help=HELP[f.name])
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    p.set_defaults(func=cmd_serve)


def missing_extra() -> str | None:
    """The first module of the serve extra that does not import, or None."""
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated


def row_buckets(batch_size: int) -> tuple[int, ...]:
    """Row counts a served batch may have: one text alone, a few gathered, a full batch."""
    return tuple(sorted({1, min(8, batch_size), batch_size}))


def cmd_serve(args) -> int:
    if missing_extra():
        print(NEEDS_EXTRA, file=sys.stderr)
        return 2
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}).check()
    from jaxcls.infer.serve import bind, serve

    sock = bind(args.host, args.port)  # a busy port fails now, not after loading and compiling
    before = signal.signal(signal.SIGTERM, _on_sigterm)  # SIGTERM while loading stops cleanly too
    try:
        clf = load_classifier(args)
        kw = predictor_kw(args, row_buckets=row_buckets(args.batch_size))
        serve(clf, sock=sock, limits=limits, predictor_kw=kw, log=not args.quiet)
    except (KeyboardInterrupt, _Terminated):
        print("jaxcls: stopped", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, before)
        sock.close()
    return 0
