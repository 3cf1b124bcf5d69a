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
from jaxcls import compile_cache
from jaxcls.cli import main
from jaxcls.infer import predictor
rc = main(sys.argv[1:])
store = compile_cache.program_store()
print("CACHE " + json.dumps({"rc": rc, "hits": counts["/jax/compilation_cache/cache_hits"], "misses": misses,
                             "traces": predictor._trace_count(), "loads": store.loads if store else None,
                             "saves": store.saves if store else None}), file=sys.stderr)
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


def _programs(folder) -> set[str]:
    """Whole inference programs the ProgramStore keeps in the cache folder."""
    folder = folder / "programs"
    return {p.name for p in folder.glob("*.program")} if folder.is_dir() else set()


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    """Train twice, then classify three times, in fresh processes. With no flag the cache is on, in
    $JAXCLS_HOME/compilation-cache; the second train compiles nothing (no persistent-cache miss, a
    hit for every program the first compiled or loaded) and adds no entry. Two classify processes
    started together on an empty cache both succeed with the same answers; a third, naming the same
    folder with --compilation-cache DIR, compiles nothing. --no-compilation-cache writes nothing.
    Fails if the folder is not used as a persistent cache (planted: the jax_compilation_cache_dir
    update removed from enable_compilation_cache), if the CLI leaves the cache off by default
    (planted: `folder = args.compilation_cache` in use_compilation_cache), and if a second process
    trips over the folder the first made (planted: exist_ok=False in enable_compilation_cache).
    Classify's programs come from the ProgramStore: the third process traces nothing and loads
    every saved program (fails with load_program planted to return the jitted `step` always)."""
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
    written, programs = _entries(shared), _programs(shared)
    for run in (first, other):  # every program it ran was traced and saved, or loaded
        assert run["saves"] + run["loads"] >= 1 and run["traces"] >= run["saves"], run
    assert 1 <= len(programs) <= first["saves"] + other["saves"], (programs, first, other)
    third = _run(*classify, "--compilation-cache", shared, home=tmp_path / "unused-home")
    assert third["misses"] == [] and third["hits"] >= len(written), (first, third)
    assert third["traces"] == third["saves"] == 0 and third["loads"] == len(programs), (third, first, other, programs)
    assert third["stdout"] == first["stdout"]
    assert _entries(shared) == written and _programs(shared) == programs

    off = _run(*classify, "--no-compilation-cache", home=tmp_path / "home-off")
    assert not (tmp_path / "home-off" / "compilation-cache").exists()
    assert off["loads"] is None and off["traces"] >= 1 and off["stdout"] == first["stdout"]


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


def test_the_cache_folder_is_created_private(tmp_path):
    """JAX runs what it finds in the cache folder, so jaxcls creates it 0700 (docs/predict.md), the
    default one under $JAXCLS_HOME included, whatever the umask allows. Fails if it is made with
    mkdir's default mode (planted: `mode=0o700` dropped in enable_compilation_cache)."""
    home = tmp_path / "home"
    code = ("import os; os.umask(0o022); from jaxcls.compile_cache import default_cache_dir, "
            "enable_compilation_cache; print(enable_compilation_cache(default_cache_dir()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAXCLS_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    folder = r.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(home)) and os.stat(folder).st_mode & 0o777 == 0o700


# ---- the ProgramStore: whole inference programs, found without tracing ---------------------------

def _tiny_predictor(seed, batch_size=2):
    from flax import nnx

    from conftest import TOKENIZER_DIR
    from jaxcls.config import TINY_SIZES
    from jaxcls.infer.predictor import Predictor
    from jaxcls.model import GPT2Classifier
    from jaxcls.tokenizer import encode, encoding_from_files

    enc = encoding_from_files(TOKENIZER_DIR / "vocab.bpe", TOKENIZER_DIR / "encoder.json")
    model = GPT2Classifier(TINY_SIZES["tiny"], 3, rngs=nnx.Rngs(seed))
    return Predictor(model, lambda t: encode(enc, t), batch_size=batch_size, bucket_lengths=(16, 24))


STORE_TEXTS = ["free cash now", "lunch " * 20, "x"]  # buckets 16 and 24


def test_store_loads_programs_a_second_predictor_would_trace(tmp_path, monkeypatch):
    """With the cache on, a Predictor's programs are saved whole; another Predictor of the same
    architecture (other weights) traces nothing, loads them, and gives exactly the logits of a
    Predictor run without any cache. A changed setting a trace depends on (XLA_FLAGS) or another
    batch shape is another program; a damaged file is a warning and a recompile, never a wrong
    answer. (Each `enable_compilation_cache` starts a new store, as a new process would.) Fails if
    the store is bypassed (planted: load_program returning the jitted `step` always: traces
    again), if XLA's settings are left out of the key (planted: `env = []` in compile_cache._context),
    and if a file that does not load escapes as an error (planted: `except Exception` in
    ProgramStore._load narrowed to `except OSError`)."""
    import numpy as np

    from jaxcls.compile_cache import disable_compilation_cache, enable_compilation_cache, program_store

    try:
        enable_compilation_cache(tmp_path / "xla")
        store = program_store()
        _tiny_predictor(seed=1).logits(STORE_TEXTS)
        saved = sorted((tmp_path / "xla" / "programs").glob("*.program"))
        assert len(saved) == store.saves == 2 and store.loads == 0

        store = program_store() if enable_compilation_cache(tmp_path / "xla") else None  # as a new process
        second = _tiny_predictor(seed=2)
        got = second.logits(STORE_TEXTS)
        assert second.num_compiles == 0 and store.loads == 2 and store.saves == 0

        assert _tiny_predictor(seed=2, batch_size=4).logits(STORE_TEXTS).shape == (3, 3)
        assert store.saves == 1  # one batch of 4 rows: a new program

        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_thunk_runtime=true")
        store = program_store() if enable_compilation_cache(tmp_path / "xla") else None
        np.testing.assert_array_equal(_tiny_predictor(seed=2).logits(STORE_TEXTS), got)
        assert store.saves == 2 and store.loads == 0
        monkeypatch.undo()

        saved[0].write_bytes(b"not a program")
        store = program_store() if enable_compilation_cache(tmp_path / "xla") else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(_tiny_predictor(seed=2).logits(STORE_TEXTS), got)
        assert store.saves == 1 and store.loads == 1
        assert any("does not load" in str(w.message) for w in caught)
    finally:
        disable_compilation_cache()
    assert program_store() is None
    np.testing.assert_array_equal(_tiny_predictor(seed=2).logits(STORE_TEXTS), got)  # no cache at all


REUSE = """
import contextlib, functools, shutil, sys, warnings, numpy as np
sys.path.insert(0, {tests!r})
from test_compile_cache import STORE_TEXTS, _tiny_predictor
from jaxcls import compile_cache
from jaxcls.infer import predictor
compile_cache.enable_compilation_cache({folder!r})
pred = _tiny_predictor(seed=3)
if sys.argv[1] == "jit":  # JAX's own cache only, as a jaxcls without the store would run
    predictor.load_program = lambda step, static, dynamic: (functools.partial(step, *static), step(*static, *dynamic))
if sys.argv[1] == "poison":  # the store compiling through JAX's cache: copies that load but cannot run
    compile_cache._without_persistent_cache = contextlib.nullcontext
    shutil.rmtree(compile_cache.program_store().folder)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logits = np.asarray(pred.logits(STORE_TEXTS))
store = compile_cache.program_store()
print("LOGITS", logits.tobytes().hex(), predictor._trace_count(), store.loads,
      sum("does not run" in str(w.message) for w in caught))
"""


def test_store_never_keeps_a_program_jax_loaded_from_its_own_cache(tmp_path):
    """An executable JAX loaded from its persistent cache serializes without its kernels: the copy
    loads, then fails when run ("Function ... not found"). Processes on one folder: the first fills
    JAX's cache through plain jit; the second (the store on) must compile afresh and save; the third
    loads those, traces nothing and gets the same logits. Then copies saved the wrong way (a
    process made to compile through JAX's cache) are each a warning and a recompile, and the
    process after that loads clean ones. Fails if the store compiles through JAX's cache (planted:
    `with _without_persistent_cache():` replaced by `with contextlib.nullcontext():` in
    ProgramStore.compiled), and if a copy that does not run escapes as an error (planted: the
    `except jax.errors.JaxRuntimeError` in ProgramStore.first_run narrowed to `except KeyError`)."""
    from pathlib import Path

    script = REUSE.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "xla"))

    def run(mode):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        line = [l for l in r.stdout.splitlines() if l.startswith("LOGITS ")]
        assert r.returncode == 0 and line, r.stderr[-2000:]
        return line[0].split()[1:]

    runs = {mode: run(mode.rstrip("0123456789")) for mode in ("jit", "store1", "store2", "poison", "store3", "store4")}
    counts = {mode: r[1:] for mode, r in runs.items()}  # traces, loads, "does not run" warnings
    assert counts == {"jit": ["2", "0", "0"], "store1": ["2", "0", "0"], "store2": ["0", "2", "0"],
                      "poison": ["2", "0", "0"], "store3": ["2", "2", "2"], "store4": ["0", "2", "0"]}, counts
    assert len({r[0] for r in runs.values()}) == 1  # the same logits every time


def test_store_size_is_bounded(tmp_path):
    """Past max_mb the least recently used programs go and the newest stay. Fails if nothing is
    evicted (planted: `return` at the top of ProgramStore._evict)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcls.compile_cache import ProgramStore

    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)
    probe = ProgramStore(tmp_path / "probe")
    probe.compiled(f, (), (np.ones(7, np.float32),))
    one = sum(p.stat().st_size for p in (tmp_path / "probe").glob("*.program"))
    store = ProgramStore(tmp_path / "bounded", max_mb=2.5 * one / 2**20)
    for n in range(8, 14):
        out = store.compiled(f, (), (np.ones(n, np.float32),))[0](np.ones(n, np.float32))
        np.testing.assert_allclose(np.asarray(out), np.tanh(1.0) * 3.0 + 1.0, rtol=1e-6)
    kept = list((tmp_path / "bounded").glob("*.program"))
    assert store.saves == 6 and 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= 2.5 * one
