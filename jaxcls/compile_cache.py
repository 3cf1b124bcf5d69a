"""JAX's persistent compilation cache, switched on for a whole process: used by training and
inference alike, so it lives above both. The CLI turns it on by default, in a folder under
`$JAXCLS_HOME`, so that a second `jaxcls train`/`classify`/`eval`/`serve` loads its programs from
disk instead of compiling them again.

JAX's cache is keyed by the lowered program, so a hit still pays for tracing and lowering: 0.2-0.4 s
per inference shape of gpt2-small, about 2 s of a 7 s `jaxcls classify` (2-core Intel Xeon). Beside it, `ProgramStore`
keeps whole compiled inference programs (jax.experimental.serialize_executable) under a key made
without tracing: the function, its static arguments, the arguments' shapes and dtypes, and
everything else a trace depends on (jax, jaxlib, the backend, the CPU's features, the jaxcls source,
JAX's and XLA's settings). No library keeps executables keyed that way, hence this code."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import pickle
import re
import threading
import warnings
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np

FOLDER = "compilation-cache"
PROGRAMS = "programs"  # ProgramStore's subfolder of the cache folder
DEFAULT_MAX_MB = 2048  # gpt2-small's train step and six inference buckets take ~100 MB


def default_cache_dir() -> Path:
    """`$JAXCLS_HOME/compilation-cache` (`~/.cache/jaxcls/...` without the variable)."""
    from jaxcls.download import cache_home

    return cache_home() / FOLDER


def enable_compilation_cache(path: str | Path, *, min_compile_time_secs: float = 0.0,
                             max_mb: float | None = DEFAULT_MAX_MB) -> Path:
    """Keep compiled programs in `path` across processes (JAX's persistent compilation cache).

    Every program is cached (JAX's defaults skip those that compile in under a second). Works even
    if something was compiled already in this process. With `max_mb` (None: unbounded), JAX evicts
    the least recently used entries once the folder would grow past it; it then guards every read
    and write with a file lock in the folder, so processes sharing it never see a half-written entry
    (an unreadable entry is only a warning and a recompile). The folder is trusted: anyone who can
    write to it can make this process run code, so it is created private (0700) and must never be
    a shared, writable folder."""
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path).expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if max_mb is not None:
        _adopt_entries(path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", -1 if max_mb is None else int(max_mb * 2**20))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is on; ask again
    global _store
    _store = ProgramStore(path / PROGRAMS, None if max_mb is None else max_mb / 4)
    return path


def _adopt_entries(path: Path) -> None:
    """Give an access time to every entry written while the cache was unbounded (JAX writes one
    only with a bound, and its eviction fails on an entry without one): the file's own mtime.
    The `-cache`/`-atime` names are JAX's (jax/_src/lru_cache.py)."""
    from jaxcls.fileio import atomic_write_bytes

    for entry in path.glob("*-cache"):
        atime = entry.with_name(entry.name[: -len("-cache")] + "-atime")
        if not atime.exists():
            try:
                atomic_write_bytes(atime, entry.stat().st_mtime_ns.to_bytes(8, "little"))
            except OSError:
                pass  # gone meanwhile (another process evicted it): nothing to adopt


def disable_compilation_cache() -> None:
    """No persistent cache for the rest of this process, even if an earlier call turned it on."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_max_size", -1)  # no bound left behind for a later enable
    compilation_cache.reset_cache()
    global _store
    _store = None


_store: "ProgramStore | None" = None
_compile_lock = threading.Lock()


def program_store() -> "ProgramStore | None":
    """The store of the cache `enable_compilation_cache` turned on; None while it is off."""
    return _store


def load_program(step, static: tuple, dynamic: tuple):
    """(program, its output on `dynamic`) for a jitted `step`: `step` with `static` bound, from the
    ProgramStore while the cache is on (so a second process does not trace it), else `step` itself.
    The caller keeps the program for later calls with arguments of the same shapes."""
    if _store is None:
        program = functools.partial(step, *static)
        return program, program(*dynamic)
    return _store.first_run(step, static, dynamic)


@contextlib.contextmanager
def _without_persistent_cache():
    """JAX's persistent cache off for one compile: an executable JAX loaded from it serializes
    without its kernels (running the copy fails with "Function ... not found"), so a program
    for the store is always compiled afresh."""
    from jax.experimental.compilation_cache import compilation_cache

    with _compile_lock:
        was = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", was)
            compilation_cache.reset_cache()


_FUNCTION = re.compile(r"<function ([\w.<>]+) at 0x[0-9a-f]+>")
_ENV = ("JAX_", "XLA_", "LIBTPU", "TPU_", "CUDA_", "NVIDIA_", "JAXCLS_CPU_GEMM", "JAXCLS_AMX_KERNEL")  # what a program may depend on


@functools.cache
def _source_digest() -> str:
    """sha256 of every jaxcls module: a program traced by other code is another program."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _context() -> str:
    """What a trace or its compile depends on besides the function and its arguments."""
    from jaxcls.cpu_amx import why_not
    from jaxcls.cpu_gemm import fast_path_available, host_flags

    backend = jax.devices()[0].client
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV))
    config = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                   "jax_default_prng_impl", "jax_numpy_rank_promotion")}
    versions = [(m.__name__, m.__version__) for m in (jax, jaxlib, flax, np)]
    return repr((versions, backend.platform, backend.platform_version, [d.device_kind for d in jax.devices()],
                 sorted(host_flags()), fast_path_available(), why_not(), _source_digest(), env, config))


class ProgramStore:
    """Compiled programs on disk, one file each, found without tracing (see the module docstring).

    `compiled(fn, static, dynamic)` gives `fn.lower(*static, *dynamic).compile()`, loaded from the
    folder when an earlier process saved it, else compiled and saved (atomically, so processes may
    share the folder). Past `max_mb` the least recently used files go. A file that does not load is
    a warning and a recompile. The folder is trusted as JAX's is: loading a program runs its code."""

    def __init__(self, folder: str | Path, max_mb: float | None = None):
        self.folder = Path(folder)
        self.max_bytes = None if max_mb is None else int(max_mb * 2**20)
        self.loads = self.saves = 0

    def first_run(self, step, static: tuple, dynamic: tuple):
        """(program, its output on `dynamic`). A program loaded from a file runs synchronously
        here, its first run: a copy that loads but cannot run is a warning and a recompile."""
        program, loaded = self.compiled(step, static, dynamic)
        out = program(*dynamic)
        if loaded:
            try:
                out = jax.block_until_ready(out)
            except jax.errors.JaxRuntimeError as e:
                warnings.warn(f"{self.folder}: a saved program that does not run ({e}); compiling it again",
                              stacklevel=3)
                program, _ = self.compiled(step, static, dynamic, reuse=False)
                out = program(*dynamic)
        return program, out

    def key(self, fn, static: tuple, dynamic: tuple) -> str | None:
        """The file name for these arguments, or None when they cannot be named across processes
        (a static argument whose repr holds an address, an argument not on one device)."""
        named = _FUNCTION.sub(r"<function \1>", repr(static))  # flax's LayerNorm holds promote_dtype
        if " at 0x" in named:
            return None
        leaves, tree = jax.tree.flatten(dynamic)
        sig = []
        for x in leaves:
            sharding = getattr(x, "sharding", None)
            if sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
                return None
            sig.append(str(jax.typeof(x)))  # shape, dtype, weak type
        h = hashlib.sha256()
        for part in (f"{fn.__module__}.{fn.__qualname__}", named, str(tree), repr(sig), _context()):
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    def compiled(self, fn, static: tuple, dynamic: tuple, reuse: bool = True):
        """(`fn.lower(*static, *dynamic).compile()`, whether it came from a file)."""
        key = self.key(fn, static, dynamic)
        if key is None:
            return fn.lower(*static, *dynamic).compile(), False
        path = self.folder / f"{key}.program"
        if reuse and (loaded := self._load(path)) is not None:
            return loaded, True
        lowered = fn.lower(*static, *dynamic)
        with _without_persistent_cache():
            program = lowered.compile()
        self._save(path, program)
        return program, False

    def _load(self, path: Path):
        from jax.experimental.serialize_executable import deserialize_and_load

        importlib.import_module("jaxcls.cpu_attention")  # defines its handlers on import
        from jaxcls.cpu_gemm import register_all

        try:
            data = path.read_bytes()
        except OSError:
            return None  # not saved yet, or evicted meanwhile
        try:
            register_all()
            payload, in_tree, out_tree = pickle.loads(data)
            program = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - any unreadable file is only a recompile
            warnings.warn(f"{path}: a saved program that does not load ({type(e).__name__}: {e}); "
                          "compiling it again", stacklevel=3)
            return None
        self.loads += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return program

    def _save(self, path: Path, program) -> None:
        from jax.experimental.serialize_executable import serialize

        from jaxcls.fileio import atomic_write_bytes

        try:
            data = pickle.dumps(serialize(program))
        except Exception:  # noqa: BLE001 - a program that cannot be serialized just is not kept
            return
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError:
            return  # a full or read-only disk only costs the next process a compile
        self.saves += 1
        self._evict()

    def _evict(self) -> None:
        if self.max_bytes is None:
            return
        files = []
        for p in self.folder.glob("*.program"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
