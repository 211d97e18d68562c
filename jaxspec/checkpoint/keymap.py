"""Declarative map from Hugging Face tensor names to jaxspec params.

Each entry names the jaxspec leaf, the Hugging Face tensors it is built from, the named
transform that combines them and the shape every source must have. A mismatch raises an error
naming the key and both shapes, before anything is written. GGUF import renames its tensors to
these names first. The params layout is documented in jaxspec.models.decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from jaxspec.errors import UserError
from jaxspec.models.config import ModelConfig

GetTensor = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Entry:
    target: tuple  # path in the params pytree, e.g. ("layers", 3, "wqkv")
    sources: tuple[str, ...]  # Hugging Face tensor names
    shapes: tuple[tuple[int, ...], ...]  # expected shape of each source
    combine: str  # a name in TRANSFORMS


def layer_entries(config: ModelConfig, i: int) -> list[Entry]:
    D, F, Dh = config.hidden_size, config.intermediate_size, config.head_dim
    H, K = config.num_heads, config.num_kv_heads
    pre = f"model.layers.{i}."
    qkv_names = tuple(pre + f"self_attn.{n}_proj" for n in "qkv")
    qkv_rows = ((H * Dh, D), (K * Dh, D), (K * Dh, D))
    entries = [
        Entry(("layers", i, "attn_norm"), (pre + "input_layernorm.weight",), ((D,),), "copy"),
        Entry(("layers", i, "wqkv"), tuple(n + ".weight" for n in qkv_names), qkv_rows, "qkv"),
        Entry(("layers", i, "wo"), (pre + "self_attn.o_proj.weight",), ((D, H * Dh),), "transpose"),
        Entry(("layers", i, "mlp_norm"), (pre + "post_attention_layernorm.weight",), ((D,),),
              "copy"),
        Entry(("layers", i, "w_gate_up"),
              (pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"), ((F, D), (F, D)),
              "stack_t"),
        Entry(("layers", i, "w_down"), (pre + "mlp.down_proj.weight",), ((D, F),), "transpose"),
    ]
    if config.attention_bias:
        shapes = tuple((rows,) for rows, _ in qkv_rows)
        entries.append(Entry(("layers", i, "bqkv"), tuple(n + ".bias" for n in qkv_names), shapes,
                             "qkv"))
    if config.qk_norm:
        entries += [
            Entry(("layers", i, "q_norm"), (pre + "self_attn.q_norm.weight",), ((Dh,),), "copy"),
            Entry(("layers", i, "k_norm"), (pre + "self_attn.k_norm.weight",), ((Dh,),), "copy"),
        ]
    return entries


def entries(config: ModelConfig) -> list[Entry]:
    """Every entry of the key map for this config, in load order."""
    V, D = config.vocab_size, config.hidden_size
    out = [Entry(("embed",), ("model.embed_tokens.weight",), ((V, D),), "copy")]
    for i in range(config.num_layers):
        out += layer_entries(config, i)
    out.append(Entry(("final_norm",), ("model.norm.weight",), ((D,),), "copy"))
    if not config.tie_word_embeddings:
        out.append(Entry(("lm_head",), ("lm_head.weight",), ((V, D),), "transpose"))
    return out


def _grouped_qkv(config: ModelConfig, arrays: list[np.ndarray]) -> np.ndarray:
    """q [H·Dh, ...], k, v [K·Dh, ...] -> [..., K, G + 2, Dh]: per kv head its G query heads
    (query head h = k·G + g, as Hugging Face groups them), its key and its value."""
    K, Dh = config.num_kv_heads, config.head_dim
    parts = [a.T.reshape(a.T.shape[:-1] + (K, -1, Dh)) for a in arrays]  # [..., K, n, Dh]
    return np.concatenate(parts, axis=-2)


TRANSFORMS = {
    "copy": lambda config, arrays: arrays[0],
    "transpose": lambda config, arrays: arrays[0].T,  # Hugging Face [out, in] -> [in, out]
    "qkv": _grouped_qkv,  # weights [D, K, G + 2, Dh], biases [K, G + 2, Dh]
    "stack_t": lambda config, arrays: np.stack([a.T for a in arrays], axis=1),  # [D, 2, F]
}


def convert(config: ModelConfig, get: GetTensor, dtype) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yield (params path, array in `dtype`) for every entry; checks every source shape."""
    for entry in entries(config):
        arrays = []
        for name, shape in zip(entry.sources, entry.shapes):
            a = get(name)
            if tuple(a.shape) != shape:
                raise UserError(f"tensor {name}: expected shape {shape}, found {tuple(a.shape)}")
            arrays.append(np.asarray(a, dtype=np.float32))
        combined = TRANSFORMS[entry.combine](config, arrays)
        yield entry.target, np.ascontiguousarray(combined).astype(dtype)


def build_params(config: ModelConfig, get: GetTensor, dtype=np.float32, progress=None) -> dict:
    """Assemble the params pytree from a tensor getter (see jaxspec.model for the layout)."""
    params: dict = {"layers": [{} for _ in range(config.num_layers)]}
    items = convert(config, get, dtype)
    for path, array in progress(items, total=len(entries(config))) if progress else items:
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = array
    return params


def upgrade_v1(config: ModelConfig, params: dict) -> dict:
    """Params of a format-1 checkpoint (wqkv [D, (H + 2K)·Dh] and bqkv [(H + 2K)·Dh] with all
    query heads, then keys, then values; w_gate_up [D, 2F]) in today's layout."""
    H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    bounds = [H * Dh, (H + K) * Dh]

    def upgrade(layer: dict) -> dict:
        layer = dict(layer)
        for name in ("wqkv", "bqkv"):
            if name in layer:
                q, k, v = np.split(np.asarray(layer[name]), bounds, axis=-1)
                layer[name] = _grouped_qkv(config, [q.T, k.T, v.T])
        gate_up = np.asarray(layer["w_gate_up"])
        layer["w_gate_up"] = gate_up.reshape(gate_up.shape[0], 2, -1)
        return layer

    return {**params, "layers": [upgrade(layer) for layer in params["layers"]]}
