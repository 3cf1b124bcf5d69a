"""JAX's persistent compilation cache: on by default under $JAXCLS_HOME, `--compilation-cache DIR`
elsewhere, `--no-compilation-cache` off; a second process loads every program it needs instead of
compiling it, processes may share the folder, and its size is bounded (README, docs/predict.md).
Asserted on JAX's own cache events and the folder's entries, never on time."""

import csv
import itertools
import json
import os
import subprocess
import sys
import warnings

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


def _start(*args, home) -> subprocess.Popen:
    """The CLI in a fresh process whose $JAXCLS_HOME is `home`, started, not awaited."""
    return subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXCLS_HOME": str(home)})


def _wait(proc, timeout=300) -> dict:
    """JAX's cache hits and misses of a finished `_start`, and its stdout; asserts it succeeded and
    that JAX reported no unreadable or unwritable cache entry."""
    out, err = proc.communicate(timeout=timeout)
    line = [l for l in err.splitlines() if l.startswith("CACHE ")]
    assert proc.returncode == 0 and line, err[-2000:]
    assert "persistent compilation cache entry" not in err, err[-2000:]
    counts = json.loads(line[-1][len("CACHE "):])
    assert counts["rc"] == 0, err[-2000:]
    return {**counts, "stdout": out}


def _run(*args, home) -> dict:
    return _wait(_start(*args, home=home))


def _entries(folder) -> set[str]:
    """Compiled programs: JAX's `*-cache` files, not its access times or its lock file."""
    return {p.name for p in folder.iterdir() if p.name.endswith("-cache")} if folder.is_dir() else set()


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    """Train twice, then classify three times, in fresh processes. With no flag the cache is on, in
    $JAXCLS_HOME/compilation-cache; the second train compiles nothing (no persistent-cache miss, a
    hit for every program the first compiled or loaded) and adds no entry. Two classify processes
    started together on an empty cache both succeed with the same answers; a third, naming the same
    folder with --compilation-cache DIR, compiles nothing. --no-compilation-cache writes nothing.
    Fails if the folder is not used as a persistent cache (planted: the jax_compilation_cache_dir
    update removed from enable_compilation_cache), if the CLI leaves the cache off by default
    (planted: `folder = args.compilation_cache` in use_compilation_cache), and if a second process
    trips over the folder the first made (planted: exist_ok=False in enable_compilation_cache)."""
    with open(SMS, encoding="utf-8", errors="replace") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f][:40]
    data = tmp_path / "sms.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    home, cache = tmp_path / "home", tmp_path / "home" / "compilation-cache"
    runs = itertools.count()

    def train():
        return _run("train", "--checkpoint", FIXTURE / "openai", "--data", data, "--epochs", "1", "--max-steps", "2",
                    "--eval-freq", "1", "--out", tmp_path / f"run{next(runs)}", "--quiet", home=home)

    first = train()
    written = _entries(cache)
    assert first["misses"] and len(written) >= len(set(first["misses"])), first
    second = train()
    assert second["misses"] == [] and second["hits"] == first["hits"] + len(first["misses"]), (first, second)
    assert _entries(cache) == written

    texts = ("WINNER!! Claim your free prize now", "see you soon", "ok")
    classify = ("classify", "--model", tmp_path / "run0", *texts)
    together = [_start(*classify, home=tmp_path / "shared-home") for _ in range(2)]
    first, other = (_wait(p) for p in together)
    assert first["stdout"] == other["stdout"] and first["stdout"].strip()
    shared = tmp_path / "shared-home" / "compilation-cache"
    written = _entries(shared)
    assert first["misses"] and len(written) >= len(set(first["misses"])), first
    third = _run(*classify, "--compilation-cache", shared, home=tmp_path / "unused-home")
    assert third["misses"] == [] and third["hits"] >= len(written), (first, third)
    assert _entries(shared) == written

    _run(*classify, "--no-compilation-cache", home=tmp_path / "home-off")
    assert not (tmp_path / "home-off" / "compilation-cache").exists()


def test_size_bound_evicts_least_recently_used(tmp_path):
    """With max_mb set, the folder never grows past it: after compiling more programs than fit,
    the newest ones are kept and older ones were evicted, with no write failing, even when the
    folder already held entries written without a bound (an older jaxcls's cache, with no access
    times). Fails if the bound is not handed to JAX (planted: the jax_compilation_cache_max_size
    update removed from enable_compilation_cache), and if the old entries get no access time
    (planted: the loop in _adopt_entries removed: JAX's eviction then fails on every write)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcls.compile_cache import disable_compilation_cache, enable_compilation_cache

    folder = tmp_path / "xla"
    try:
        enable_compilation_cache(folder, max_mb=None)
        jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)(np.ones(7, np.float32))
        one = sum(p.stat().st_size for p in folder.glob("*-cache"))
        bound = 2.5 * one  # room for two programs of about this size
        enable_compilation_cache(folder, max_mb=bound / 2**20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(6):  # distinct programs: a different constant and shape each
                before = set(folder.glob("*-cache"))
                jax.jit(lambda x, k=k: jnp.tanh(x) * (k + 4.0) + 1.0)(np.ones(8 + k, np.float32))
        assert not [str(w.message) for w in caught if "compilation cache" in str(w.message)]
        kept = set(folder.glob("*-cache"))
        assert sum(p.stat().st_size for p in kept) <= bound
        assert kept - before and 1 <= len(kept) <= 2, [p.name for p in kept]  # the newest kept, most evicted
    finally:
        disable_compilation_cache()


def test_bad_cache_flags_are_one_line_errors_before_any_work(tmp_path, capsys):
    """A --compilation-cache that is a file, or given with --no-compilation-cache, stops `train`
    with status 2 and one line naming the flag, before any run folder is made. Fails if a file is
    handed on to JAX (planted: the is_dir check removed from use_compilation_cache: mkdir's
    FileExistsError escapes as a traceback)."""
    from jaxcls.cli import main

    afile = tmp_path / "cache-file"
    afile.write_text("not a folder")
    base = ["train", "--checkpoint", "tiny", "--weights", "random", "--data", "sms-spam", "--out", str(tmp_path / "run")]
    for extra, message in ((["--compilation-cache", str(afile)], f"--compilation-cache {afile}: a file, not a folder"),
                           (["--compilation-cache", str(tmp_path / "c"), "--no-compilation-cache"],
                            "--compilation-cache DIR and --no-compilation-cache contradict each other")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()
    assert afile.read_text() == "not a folder"


def test_default_folder_that_cannot_be_made_turns_the_cache_off_with_a_line(tmp_path, monkeypatch, capsys):
    """$JAXCLS_HOME being a file makes the default cache folder impossible: the command goes on
    without the cache and says so in one line on stderr, while the same folder named by the flag is
    a ConfigError. Fails if the OSError escapes (planted: the try/except around
    enable_compilation_cache in use_compilation_cache removed)."""
    import argparse

    import jax
    import pytest

    from jaxcls.cli.common import use_compilation_cache
    from jaxcls.errors import ConfigError

    home = tmp_path / "home-file"
    home.write_text("")
    monkeypatch.setenv("JAXCLS_HOME", str(home))
    try:
        use_compilation_cache(argparse.Namespace(compilation_cache=None, no_compilation_cache=False))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"jaxcls: compilation cache off: cannot make {home}"), err
        assert jax.config.jax_enable_compilation_cache is False
        with pytest.raises(ConfigError, match="--compilation-cache .*cannot use it"):
            use_compilation_cache(argparse.Namespace(compilation_cache=str(home / "c"), no_compilation_cache=False))
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
