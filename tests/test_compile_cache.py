"""`--compilation-cache DIR`: a second process with the same folder loads every program it needs
from the folder instead of compiling it (README, docs/predict.md). Asserted on JAX's own cache
events and the folder's entries, never on time."""

import csv
import itertools
import json
import os
import subprocess
import sys

from conftest import FIXTURE, SMS, requires_shared

pytestmark = requires_shared

# Runs the CLI and prints, last on stderr, JAX's persistent-cache hits and the programs it had to
# compile while the cache was on (JAX logs those misses as warnings under jax_explain_cache_misses).
DRIVER = """
import collections, json, logging, sys
import jax, jax.monitoring
counts = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: counts.update([event]))
misses = []
class Misses(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("PERSISTENT COMPILATION CACHE MISS"):
            misses.append(record.args[0])
logging.getLogger("jax._src.compiler").addHandler(Misses(logging.WARNING))
jax.config.update("jax_explain_cache_misses", True)
from jaxcls.cli import main
rc = main(sys.argv[1:])
print("CACHE " + json.dumps({"rc": rc, "hits": counts["/jax/compilation_cache/cache_hits"], "misses": misses}),
      file=sys.stderr)
"""


def _run(*args, timeout=300) -> dict:
    r = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = [l for l in r.stderr.splitlines() if l.startswith("CACHE ")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    counts = json.loads(line[-1][len("CACHE "):])
    assert counts["rc"] == 0, r.stderr[-2000:]
    return counts


def _entries(folder) -> set[str]:
    """Cache entries, without the access-time files JAX touches on every read."""
    return {p.name for p in folder.iterdir() if not p.name.endswith("-atime")}


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    """Train, then classify, twice each in fresh processes sharing one cache folder: the second of
    each compiles nothing once the cache is on (no persistent-cache miss, a hit for every program
    the first compiled or loaded) and adds no entry. Fails if the flag's folder is not used as a
    persistent cache (planted: the jax_compilation_cache_dir update removed from
    enable_compilation_cache)."""
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][:40]
    data = tmp_path / "sms.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    cache = tmp_path / "xla"
    runs = itertools.count()

    def train():
        return _run("train", "--checkpoint", FIXTURE / "openai", "--data", data, "--epochs", "1", "--max-steps", "2",
                    "--eval-freq", "1", "--out", tmp_path / f"run{next(runs)}", "--compilation-cache", cache, "--quiet")

    def classify():
        return _run("classify", "--model", tmp_path / "run0", "--compilation-cache", cache,
                    "WINNER!! Claim your free prize now", "see you soon", "ok")

    for run in (train, classify):  # the second run asks for exactly what the first compiled or loaded
        first = run()
        written = _entries(cache)
        assert first["misses"] and len(written) >= len(set(first["misses"])), first
        second = run()
        assert second["misses"] == [] and second["hits"] == first["hits"] + len(first["misses"]), (first, second)
        assert _entries(cache) == written
