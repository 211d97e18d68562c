"""Checkpoints: convert Hugging Face / GGUF to a jaxspec (Orbax) directory, and load any of them.

A converted checkpoint directory holds:

    config.json   {"jaxspec_checkpoint": 1, "dtype": "float32", "config": ModelConfig.to_dict()}
    params/       the params pytree (layout in jaxspec.model), saved by Orbax
    tokenizer.json, tokenizer_config.json, ... (whatever tokenizer files the source had)

`convert` writes into a temporary directory next to the destination and renames it at the
end, so an interrupted conversion never leaves a directory that loads as complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxspec import gguf_import, hf_import, keymap, model
from jaxspec.config import ModelConfig
from jaxspec.errors import UserError
from jaxspec.hf_import import Source

MARKER = "jaxspec_checkpoint"
FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: config, params pytree (jax arrays), tokenizer (or None) and its path."""

    config: ModelConfig
    params: Any
    tokenizer: Any  # transformers PreTrainedTokenizerFast, or None without tokenizer files
    path: str


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of "float32" or "bfloat16"; anything else raises UserError."""
    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def is_jaxspec_dir(path: str) -> bool:
    """A directory whose config.json carries the jaxspec checkpoint marker."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return MARKER in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


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
    if is_jaxspec_dir(path):
        return "jaxspec"
    if hf_import.is_hf_dir(path):
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
    opener = gguf_import.open_gguf if kind == "gguf" else hf_import.open_hf
    with opener(path) as source:
        yield source


def _progress(items, total: int):
    return tqdm(items, total=total, desc="converting", unit="tensor", disable=None)


def _write_checkpoint(directory: str, config: ModelConfig, params, dtype: str,
                      tokenizer_files: dict[str, bytes]) -> None:
    """Write params (Orbax), config.json and tokenizer files into an existing directory."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), params)
        checkpointer.wait_until_finished()
    for name, data in tokenizer_files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    meta = {MARKER: FORMAT_VERSION, "dtype": dtype, "config": config.to_dict()}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def _make_temp_dir(dst: str) -> str:
    """A new empty directory next to dst (unlike mkdtemp's, it honours the umask)."""
    parent = os.path.dirname(dst)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise UserError(f"cannot create {tmp}: {e.strerror}") from None
    return tmp


def convert(src: str, dst: str, *, dtype: str = "float32") -> str:
    """Convert a Hugging Face directory or GGUF file into a jaxspec checkpoint at dst.

    Atomic: everything is written to a temporary directory next to dst, renamed at the end and
    removed on any error. dst must not exist. Returns the absolute path of dst.
    """
    np_dtype = numpy_dtype(dtype)
    dst = os.path.abspath(dst)
    if os.path.lexists(dst):
        raise UserError(f"destination {dst} already exists")
    with open_source(src) as source:
        tmp = _make_temp_dir(dst)
        try:
            params = keymap.build_params(source.config, source.get, np_dtype, progress=_progress)
            _write_checkpoint(tmp, source.config, params, dtype, source.tokenizer_files)
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a jaxspec checkpoint directory."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get(MARKER) != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported jaxspec checkpoint version {meta.get(MARKER)!r}")
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}/config.json: bad config ({e})") from None


def restore_params(path: str, config: ModelConfig, dtype: str):
    """Restore params from path/params as jax arrays of dtype (cast from the stored dtype)."""
    np_dtype = numpy_dtype(dtype)
    target = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0), np_dtype))
    params_dir = os.path.join(os.path.abspath(path), "params")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints
        raise UserError(f"cannot restore params from {params_dir}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    return jax.device_put(restored)  # Orbax hands back numpy arrays: copy once, not per call


def load_tokenizer(directory: str):
    """The tokenizer in directory (transformers fast tokenizer), or None without tokenizer files."""
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(directory)
    except Exception as e:  # transformers raises many types for bad tokenizer files
        raise UserError(f"cannot load the tokenizer in {directory}: "
                        f"{' '.join(str(e).split())[:300]}") from None


def _tokenizer_from_files(files: dict[str, bytes]):
    """Load a tokenizer from in-memory tokenizer files (via a temporary directory)."""
    if "tokenizer.json" not in files:
        return None
    with tempfile.TemporaryDirectory(prefix="jaxspec-tokenizer-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        return load_tokenizer(tmp)


def _load_converted(path: str, dtype: str) -> Model:
    config = read_config(path)
    params = restore_params(path, config, dtype)
    return Model(config=config, params=params, tokenizer=load_tokenizer(path), path=path)


def _load_in_memory(path: str, dtype: str) -> Model:
    np_dtype = numpy_dtype(dtype)
    with open_source(path) as source:
        params = keymap.build_params(source.config, source.get, np_dtype)
        params = jax.tree.map(jnp.asarray, params)
        tokenizer = _tokenizer_from_files(source.tokenizer_files)
    return Model(config=source.config, params=params, tokenizer=tokenizer, path=path)


def load_model(source: str, *, dtype: str = "float32") -> Model:
    """Load a model from a jaxspec checkpoint dir, a Hugging Face dir, a .gguf file or a name.

    The only name is "smollm2-135m-instruct" (downloaded and converted once into the cache).
    Hugging Face and GGUF sources are converted in memory, nothing is written.
    dtype: "float32" or "bfloat16" (the params' dtype after loading).
    """
    numpy_dtype(dtype)
    source = os.fspath(source)
    from jaxspec import default_model  # imported here: default_model uses convert()

    if not os.path.exists(source):
        if source != default_model.NAME:
            raise UserError(f"no such file or directory: {source} "
                            f"(or use the model name {default_model.NAME!r})")
        source = default_model.ensure_converted()
    path = os.path.abspath(source)
    load = _load_converted if source_kind(path) == "jaxspec" else _load_in_memory
    return _for_backend(load(path, dtype))


def _for_backend(m: Model) -> Model:
    """On CPU, tied models get a transposed copy of the embedding as their output layer.

    XLA's matrix-vector product streams a [D, V] matrix at full memory bandwidth but the
    [V, D] embedding at about two thirds of it: the copy (V·D more memory, the same bytes read
    per token) makes decoding SmolLM2 about 4% faster.
    """
    if not m.config.tie_word_embeddings or "lm_head" in m.params or jax.default_backend() != "cpu":
        return m
    return dataclasses.replace(m, params={**m.params, "lm_head": jnp.asarray(m.params["embed"].T)})
