"""GGUF metadata access shared by the GGUF source and the tokenizer builder."""

from __future__ import annotations

from typing import Any

from gguf import GGUFReader

from jaxspec.checkpoint.source import one_line
from jaxspec.errors import UserError


def read_gguf(path: str) -> GGUFReader:
    """Open (memory-map) a GGUF file; a corrupted or truncated file raises UserError."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises many types on bad bytes
        raise UserError(f"cannot read GGUF file {path} (truncated or corrupted?): "
                        f"{one_line(e)}") from None


def field(reader: GGUFReader, key: str, default: Any = KeyError) -> Any:
    """A metadata value (str, number, bool or list); missing and no default -> UserError."""
    if key not in reader.fields:
        if default is KeyError:
            raise UserError(f"GGUF file has no metadata key {key}")
        return default
    return reader.fields[key].contents()
