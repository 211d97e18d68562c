"""The jaxspec checkpoint directory: Orbax params, config.json and tokenizer files.

    config.json   {"jaxspec_checkpoint": 2, "dtype": "float32", "config": ModelConfig.to_dict()}
    params/       the params pytree (layout in jaxspec.models.decoder), saved by Orbax
    tokenizer.json, tokenizer_config.json, ... (whatever tokenizer files the source had)

Format 2 stores the attention and MLP projections grouped (wqkv [D, K, G + 2, Dh],
w_gate_up [D, 2, F]); format-1 checkpoints are upgraded when restored.
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

from jaxspec.checkpoint import keymap, orbax_io
from jaxspec.checkpoint.source import one_line
from jaxspec.errors import UserError
from jaxspec.models import decoder, sharding
from jaxspec.models.config import ModelConfig

MARKER = "jaxspec_checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of "float32" or "bfloat16"; anything else raises UserError."""
    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def is_jaxspec_dir(path: str, marker: str = MARKER) -> bool:
    """A directory whose config.json carries `marker` (default: the model checkpoint's)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return marker in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def write(directory: str, config: ModelConfig, params, dtype: str,
          tokenizer_files: dict[str, bytes]) -> None:
    """Write params (Orbax, uncompressed: restored at every start where they are not mapped),
    config.json and tokenizer files into an existing directory."""
    orbax_io.save(os.path.join(directory, "params"), params, compress=False)
    for name, data in tokenizer_files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    meta = {MARKER: FORMAT_VERSION, "dtype": dtype, "config": config.to_dict()}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def read_meta(path: str) -> tuple[ModelConfig, int]:
    """(ModelConfig, format version) of a jaxspec checkpoint directory."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    version = meta.get(MARKER)
    if version not in READABLE_VERSIONS:
        raise UserError(f"{path}: unsupported jaxspec checkpoint version {version!r}")
    try:
        return ModelConfig.from_dict(meta["config"]), version
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}/config.json: bad config ({e})") from None


def _v1_shapes(config: ModelConfig, params):
    """The abstract params of a format-1 checkpoint (fused projections, flat columns)."""
    def flat(layer):
        layer = dict(layer)
        for name in ("wqkv", "bqkv"):
            if name in layer:
                shape = layer[name].shape
                layer[name] = jax.ShapeDtypeStruct(shape[:-3] + (int(np.prod(shape[-3:])),),
                                                   layer[name].dtype)
        d, _, f = layer["w_gate_up"].shape
        layer["w_gate_up"] = jax.ShapeDtypeStruct((d, 2 * f), layer["w_gate_up"].dtype)
        return layer

    return {**params, "layers": [flat(layer) for layer in params["layers"]]}


def abstract_params(config: ModelConfig, dtype: str):
    """The params' ShapeDtypeStructs in dtype (the current format's shapes)."""
    np_dtype = numpy_dtype(dtype)
    return jax.eval_shape(lambda: decoder.init_params(config, jax.random.key(0), np_dtype))


def restore_params(path: str, config: ModelConfig, version: int, dtype: str, mesh=None):
    """Restore params from path/params in dtype (cast from the stored dtype): numpy arrays, or
    with a mesh jax arrays split by models.sharding, each shard read onto its own device."""
    target = abstract_params(config, dtype)
    if mesh is not None and version != 1:
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                              target, sharding.param_shardings(target, mesh))
    if version == 1:
        target = _v1_shapes(config, target)
    params_dir = os.path.join(os.path.abspath(path), "params")
    try:
        restored = orbax_io.restore(params_dir, target)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints
        raise UserError(f"cannot restore params from {params_dir}: {one_line(e)[:300]}") from None
    return keymap.upgrade_v1(config, restored) if version == 1 else restored
