"""JAX's persistent compilation cache, switched on for a whole process: used by training and
inference alike, so it lives above both. The CLI turns it on by default, in a folder under
`$JAXCLS_HOME`, so that a second `jaxcls train`/`classify`/`eval`/`serve` loads its programs from
disk instead of compiling them again."""

from __future__ import annotations

from pathlib import Path

import jax

FOLDER = "compilation-cache"
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
