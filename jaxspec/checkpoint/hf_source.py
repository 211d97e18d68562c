"""A Hugging Face checkpoint directory as a Source: config.json, safetensors, tokenizer files.

Weights come only from safetensors (`model.safetensors`, a sharded
`model.safetensors.index.json`, or the `*.safetensors` files present). Pickled `.bin`/`.pt`
weights are refused, never unpickled. Tensors are read lazily, one at a time, as numpy arrays
in their stored dtype (bf16 through ml_dtypes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy reader)
from safetensors import SafetensorError, safe_open

from jaxspec.checkpoint.source import GetTensor, Source, missing_tensor, one_line, unreadable
from jaxspec.checkpoint.tokenizer import read_tokenizer_files
from jaxspec.errors import UserError
from jaxspec.models.config import ModelConfig, from_hf_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(path, e) from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path}: expected a JSON object")
    return value


def _merged_eos(config: ModelConfig, directory: str) -> tuple[int, ...]:
    """config.json's EOS ids, then any more from generation_config.json (order kept)."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return config.eos_token_ids
    extra = _read_json(path).get("eos_token_id")
    extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
    ids = list(config.eos_token_ids)
    ids += [int(i) for i in extra if int(i) not in ids]
    return tuple(ids)


def read_config(directory: str) -> ModelConfig:
    """ModelConfig from `directory/config.json`, EOS ids merged with generation_config.json."""
    hf = _read_json(os.path.join(directory, "config.json"))
    try:
        config = from_hf_config(hf)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{directory}/config.json: missing or bad field {one_line(e)}") from None
    return dataclasses.replace(config, eos_token_ids=_merged_eos(config, directory))


def weight_files(directory: str) -> dict[str, str] | list[str]:
    """The safetensors weights: a {tensor: file} map when indexed, else a list of files.

    Raises UserError for pickled-only or weightless directories.
    """
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        return {name: os.path.join(directory, f) for name, f in weight_map.items()}
    names = sorted(os.listdir(directory))
    if "model.safetensors" in names:
        return [os.path.join(directory, "model.safetensors")]
    shards = [os.path.join(directory, n) for n in names if n.endswith(".safetensors")]
    if shards:
        return shards
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise UserError(
            f"{directory} has only pickled weights (.bin/.pt), which jaxspec does not load; "
            "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise UserError(f"{directory} has config.json but no *.safetensors weights")


def _open(stack: contextlib.ExitStack, path: str):
    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except (SafetensorError, OSError) as e:
        raise unreadable(f"safetensors file {path}", e) from None


def _tensor_getter(stack: contextlib.ExitStack, files: dict[str, str] | list[str]) -> GetTensor:
    """A getter over every file: maps each tensor name to its opened file, lazily read."""
    handles: dict[str, Any] = {}
    owner: dict[str, str] = {}
    paths = sorted(set(files.values())) if isinstance(files, dict) else files
    for path in paths:
        handles[path] = _open(stack, path)
        owner.update({name: path for name in handles[path].keys()})
    if isinstance(files, dict):
        owner = {name: path for name, path in files.items() if name in owner}

    def get(name: str):
        if name not in owner:
            raise missing_tensor(name, "the checkpoint")
        try:
            return handles[owner[name]].get_tensor(name)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise unreadable(f"tensor {name} from {owner[name]}", e) from None

    return get


def is_hf_dir(directory: str) -> bool:
    """A directory with a config.json naming a model_type (and no jaxspec marker)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def open_hf(directory: str) -> Iterator[Source]:
    """Open a Hugging Face directory; tensors can be read until the context exits."""
    config = read_config(directory)
    files = weight_files(directory)
    with contextlib.ExitStack() as stack:
        yield Source(config, _tensor_getter(stack, files), read_tokenizer_files(directory))
