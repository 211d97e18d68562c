"""Where jaxspec keeps what it makes once and reuses: `$JAXSPEC_CACHE`, else ~/.cache/jaxspec
(the converted default model, downloads, compiled XLA programs, the CPU matmul kernel, γ
measurements)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """$JAXSPEC_CACHE, or ~/.cache/jaxspec."""
    return os.environ.get("JAXSPEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "jaxspec")
