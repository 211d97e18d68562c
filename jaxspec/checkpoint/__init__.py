"""Checkpoints: sources (Hugging Face, GGUF), the key map, Orbax storage, tokenizers, the default
model's fetch, `convert` and `load_model`.

Names load lazily, so that the CLI can check model names (`checkpoint.names`) without JAX.
"""

import importlib

_LAZY = {"convert": "jaxspec.checkpoint.conversion", "load_model": "jaxspec.checkpoint.load"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxspec.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = list(_LAZY)
