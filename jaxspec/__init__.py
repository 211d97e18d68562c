"""jaxspec: exact speculative decoding for LLMs in JAX, the whole loop in one XLA program.

Public names load lazily, so `python -m jaxspec.generate --help` does not import JAX.
"""

import importlib

from jaxspec.errors import UserError

_LAZY = {
    "SpeculativeDecoder": ("jaxspec.api", "SpeculativeDecoder"),
    "GenerateOutput": ("jaxspec.api", "GenerateOutput"),
    "DecodeState": ("jaxspec.decode.state", "DecodeState"),
    "LoopSpec": ("jaxspec.decode.state", "LoopSpec"),
    "generate_tokens": ("jaxspec.decode.loop", "generate_tokens"),  # the pure function
    "load_model": ("jaxspec.checkpoint.load", "load_model"),
    "Model": ("jaxspec.models.loaded", "Model"),
    "Draft": ("jaxspec.drafts.base", "Draft"),
    "compiler_options": ("jaxspec.xla_options", "compiler_options"),  # for your own jax.jit
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = ["UserError", *_LAZY]
