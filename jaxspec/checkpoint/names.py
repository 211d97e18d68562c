"""Model names accepted wherever a model path is (imports nothing heavy: the CLI checks with it)."""

from __future__ import annotations

import os

from jaxspec.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, fetched on first use
NAMES = (DEFAULT_MODEL,)


def check_exists(source: str, what: str = "") -> None:
    """Refuse a source that is neither an existing path nor a model name (one-line UserError).

    what: a prefix for the message, e.g. "--draft".
    """
    if source in NAMES or os.path.exists(source):
        return
    prefix = f"{what}: " if what else ""
    raise UserError(f"{prefix}no such file or directory: {source} "
                    f"(or use the model name {DEFAULT_MODEL!r})")
