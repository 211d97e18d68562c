"""JAX's persistent compilation cache under `$JAXSPEC_CACHE/xla`, so that a new process loads
the programs an earlier one compiled instead of compiling them again.

`enable()` is called by `load_model`, `SpeculativeDecoder` and the CLI before they compile
anything. It leaves JAX alone when the user configured a cache directory of their own
(`jax_compilation_cache_dir`) or set `JAXSPEC_COMPILE_CACHE=0` (`=xla` keeps this cache and
turns off only jaxspec.program_cache, which saves traced programs on top of it). Otherwise it
caches every program the process compiles from then on (no minimum size or compile time: jaxspec's
programs on small models compile in under a second, and they are what start-up waits for), and
keeps the directory under MAX_BYTES by evicting the least recently used entries (JAX's LRU
cache; a size limit the user set in `jax_compilation_cache_max_size` is kept). JAX's eviction
needs an access-time file beside every entry and fails every later write without one; entries
written while the cache was unbounded (by earlier jaxspec versions, or with the limit off) get
one from their modification time.
JAX decides once per process, at its first compilation, whether the cache is used: a program
compiled before `enable()` keeps the process uncached. A `$JAXSPEC_CACHE` that cannot be written
leaves the cache off, silently (JAX would warn at every compilation and compile anyway).
"""

from __future__ import annotations

import os

import filelock

from jaxspec.errors import UserError
from jaxspec.paths import writable_cache_dir

ENV = "JAXSPEC_COMPILE_CACHE"
MAX_BYTES = 2 << 30  # measured: 1,054 entries in 78 MB after a day of default-model runs
ENTRY, ACCESS_TIME = "-cache", "-atime"  # jax._src.lru_cache's file suffixes


def enable() -> str | None:
    """Turn the persistent cache on in $JAXSPEC_CACHE/xla (idempotent); returns its directory,
    or None when off."""
    import jax

    if os.environ.get(ENV, "1") == "0":
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    try:
        directory = writable_cache_dir("xla")
    except UserError:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if jax.config.jax_compilation_cache_max_size != -1:
        give_access_times(directory)
    return directory


def give_access_times(directory: str) -> None:
    """An access-time file (8 bytes, little-endian nanoseconds, as JAX writes them) for each
    entry in directory that has none: its modification time. Under JAX's lock file, so that no
    JAX process is writing or evicting meanwhile; skipped if the lock is not had in 10 s."""
    try:
        with filelock.FileLock(os.path.join(directory, ".lockfile"), timeout=10):
            names = set(os.listdir(directory))
            for name in names:
                key = name.removesuffix(ENTRY)
                if key != name and key + ACCESS_TIME not in names:
                    stamp = os.stat(os.path.join(directory, name)).st_mtime_ns
                    with open(os.path.join(directory, key + ACCESS_TIME), "wb") as f:
                        f.write(stamp.to_bytes(8, "little"))
    except (filelock.Timeout, OSError):  # the cache still works; eviction may warn
        pass
