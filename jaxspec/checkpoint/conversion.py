"""Convert a Hugging Face directory or a GGUF file into a jaxspec checkpoint directory.

`convert` writes into a temporary directory next to the destination and renames it at the
end, so an interrupted conversion never leaves a directory that loads as complete (and the next
conversion into the same place removes what a killed one left: `temp_dirs`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from tqdm import tqdm

from jaxspec.checkpoint import blocks, gguf_source, hf_source, keymap, store, temp_dirs
from jaxspec.checkpoint.source import Source
from jaxspec.errors import UserError

_GGUF_MAGIC = b"GGUF"


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def source_kind(path: str) -> str:
    """The kind of an existing path: "jaxspec", "hf" or "gguf"; UserError otherwise."""
    if not os.path.exists(path):
        raise UserError(f"no such file or directory: {path}")
    if os.path.isfile(path):
        if _is_gguf(path):
            return "gguf"
        raise UserError(f"{path} is not a GGUF file (expected a .gguf file or a checkpoint "
                        "directory)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"cannot read directory {path}: permission denied")
    if store.is_jaxspec_dir(path):
        return "jaxspec"
    if hf_source.is_hf_dir(path):
        return "hf"
    raise UserError(f"{path} is not a checkpoint directory: expected a jaxspec checkpoint "
                    "(config.json + params/) or a Hugging Face directory (config.json with "
                    "model_type + *.safetensors)")


@contextlib.contextmanager
def open_source(path: str) -> Iterator[Source]:
    """Open a Hugging Face directory or a GGUF file for conversion."""
    kind = source_kind(path)
    if kind == "jaxspec":
        raise UserError(f"{path} is already a jaxspec checkpoint")
    opener = gguf_source.open_gguf if kind == "gguf" else hf_source.open_hf
    with opener(path) as source:
        yield source


def _progress(items, total: int):
    return tqdm(items, total=total, desc="converting", unit="tensor", disable=None)


def convert(src: str, dst: str, *, dtype: str = "float32") -> str:
    """Convert a Hugging Face directory or GGUF file into a jaxspec checkpoint at dst (in fp32, a
    GGUF file's quantized projections also as their blocks: jaxspec.checkpoint.blocks).

    Atomic: everything is written to a temporary directory next to dst, renamed at the end and
    removed on any error. dst must not exist. Returns the absolute path of dst.
    """
    np_dtype = store.numpy_dtype(dtype)
    dst = os.path.abspath(dst)
    if os.path.lexists(dst):
        raise UserError(f"destination {dst} already exists")
    with open_source(src) as source:
        tmp = temp_dirs.make(dst)
        try:
            params = keymap.build_params(source.config, source.get, np_dtype, progress=_progress)
            store.write(tmp, source.config, params, dtype, source.tokenizer_files)
            if source.blocks is not None and dtype == "float32":
                blocks.write(tmp, blocks.build(source.config, source.blocks, params))
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst
