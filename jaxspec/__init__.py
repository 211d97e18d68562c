"""jaxspec: exact speculative decoding for LLMs in JAX, the whole loop in one XLA program."""

from jaxspec.api import GenerateOutput, SpeculativeDecoder
from jaxspec.errors import UserError
from jaxspec.loop import DecodeState, LoopSpec
from jaxspec.loop import generate as generate_tokens


def load_model(source: str, *, dtype: str = "float32"):
    """Load a model: an Orbax or Hugging Face directory, a .gguf file or a default's name."""
    from jaxspec.checkpoint import load_model as _load_model

    return _load_model(source, dtype=dtype)


__all__ = ["DecodeState", "GenerateOutput", "LoopSpec", "SpeculativeDecoder", "UserError",
           "generate_tokens", "load_model"]
