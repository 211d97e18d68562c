"""The `Source` protocol: an opened checkpoint that conversion reads tensors from.

Every source (Hugging Face directory, GGUF file) yields its config, a tensor getter that speaks
Hugging Face names and layouts, and its tokenizer files. Errors use one wording everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxspec.errors import UserError
from jaxspec.models.config import ModelConfig

GetTensor = Callable[[str], np.ndarray]  # Hugging Face name -> array ([out, in] projections)


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened checkpoint; `get` is valid only inside the context manager that produced it."""

    config: ModelConfig
    get: GetTensor
    tokenizer_files: dict[str, bytes]  # {file name: contents}, e.g. tokenizer.json
    # GGUF: Hugging Face name -> the tensor's quantized blocks (gguf_source.block_getter)
    blocks: Callable | None = None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def missing_tensor(name: str, where: str) -> UserError:
    return UserError(f"tensor {name} is missing from {where}")


def unreadable(what: str, error: BaseException) -> UserError:
    return UserError(f"cannot read {what}: {one_line(error)}")
