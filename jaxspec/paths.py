"""Where jaxspec keeps what it makes once and reuses: `$JAXSPEC_CACHE`, else ~/.cache/jaxspec
(the converted default model, downloads, compiled XLA programs, traced programs, params laid
out for the CPU, the CPU matmul kernel, γ measurements).

Everything that writes there asks `writable_cache_dir` for its folder first: a cache that cannot
be written (a regular file, a read-only directory) is then one line, not a traceback. What needs
the cache (the default model) passes that line on; what only saves time with it (programs,
laid-out params, the kernel, γ) goes on without it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable

from jaxspec.errors import UserError


def cache_dir() -> str:
    """$JAXSPEC_CACHE, or ~/.cache/jaxspec."""
    return os.environ.get("JAXSPEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "jaxspec")


def writable_cache_dir(*parts: str) -> str:
    """cache_dir()/parts, created if needed; UserError (one line naming it) when this process
    cannot create a file there."""
    path = os.path.join(cache_dir(), *parts)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = "Not a directory" if isinstance(e, FileExistsError) else e.strerror or e
        raise UserError(f"the jaxspec cache {path} is not writable ({reason}); set "
                        "JAXSPEC_CACHE to a writable directory") from None
    return path


TEMPORARY = ".tmp-"  # in the names of write_atomically's temporary files
STALE_SECONDS = 3600  # a temporary file this old was left by a process that died writing it


def write_atomically(path: str, data: bytes | Callable) -> None:
    """Write data (bytes, or a function that writes into the open binary file) to path through
    a temporary file in the same folder renamed into place, so that readers see the old file
    or the new one, never part of one; the temporary file is removed when writing fails (the
    exception passes through)."""
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", delete=False,
                                     prefix=f".{os.path.basename(path)}{TEMPORARY}") as f:
        temporary = f.name
    try:
        with open(temporary, "wb") as f:
            data(f) if callable(data) else f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def prune(folder: str, max_bytes: int, suffix: str = ".bin") -> None:
    """Remove the least recently used (modified) files of folder whose names end in suffix
    until the others total at most max_bytes, and temporary files older than STALE_SECONDS.
    Files another process removes meanwhile are skipped."""
    files, stale = [], time.time() - STALE_SECONDS
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                info = entry.stat()
                if entry.name.endswith(suffix):
                    files.append((info.st_mtime, info.st_size, entry.path))
                elif TEMPORARY in entry.name and info.st_mtime < stale:
                    os.remove(entry.path)
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            os.remove(path)
        total -= size
