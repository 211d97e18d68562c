"""Where jaxspec keeps what it makes once and reuses: `$JAXSPEC_CACHE`, else ~/.cache/jaxspec
(the converted default model, downloads, compiled XLA programs, the CPU matmul kernel, γ
measurements).

Everything that writes there asks `writable_cache_dir` for its folder first: a cache that cannot
be written (a regular file, a read-only directory) is then one line, not a traceback. What needs
the cache (the default model) passes that line on; what only saves time with it (compiled
programs, the kernel, γ) goes on without it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

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


def write_atomically(path: str, data: bytes) -> None:
    """Write data to path through a temporary file in the same folder renamed into place, so
    that readers see the old file or the new one, never part of one; the temporary file is
    removed when writing fails (OSError passes through)."""
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", delete=False,
                                     prefix=f".{os.path.basename(path)}.tmp-") as f:
        temporary = f.name
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
