"""Where jaxspec keeps what it makes once and reuses: `$JAXSPEC_CACHE`, else ~/.cache/jaxspec
(the converted default model, downloads, compiled XLA programs, the CPU matmul kernel, γ
measurements).

Everything that writes there asks `writable_cache_dir` for its folder first: a cache that cannot
be written (a regular file, a read-only directory) is then one line, not a traceback. What needs
the cache (the default model) passes that line on; what only saves time with it (compiled
programs, the kernel, γ) goes on without it.
"""

from __future__ import annotations

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
