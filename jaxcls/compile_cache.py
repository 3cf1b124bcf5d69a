"""JAX's persistent compilation cache, switched on for a whole process: used by training and
inference alike, so it lives above both."""

from __future__ import annotations

from pathlib import Path

import jax


def enable_compilation_cache(path: str | Path, *, min_compile_time_secs: float = 0.0) -> Path:
    """Keep compiled programs in `path` across processes (JAX's persistent compilation cache), so
    a second `jaxcls classify`/`serve` loads its buckets from disk instead of compiling them.

    Every program is cached (JAX's defaults skip those that compile in under a second). Works even
    if something was compiled already in this process. The folder is trusted: anyone who can write
    to it can make this process run code, so never point it at a shared, writable folder."""
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is on; ask again
    return path
