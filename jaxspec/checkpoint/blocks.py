"""A converted GGUF checkpoint's quantized projections, kept as their blocks next to its params.

Conversion dequantizes a GGUF model's weights to fp32 (`params/`, read on every backend) and,
for projections and output layers quantized as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or
Q6_K (the types whose blocks the kernel reads: gguf_source.BLOCK_TYPES), also stores their
blocks packed for the CPU kernel (`blocks/`, Orbax, and `blocks.json`: each weight's kind and data shape; see
jaxspec.models.quantized). A weight is kept only when its packed blocks dequantize to exactly
its fp32 params, bit for bit (checked at conversion). Loading for the CPU kernel in fp32 then
uses the blocks in place of those weights (`substitute`): the same results, a third to a sixth
of the bytes read per step. `JAXSPEC_QUANTIZED=0` turns that off (the fp32 weights in panels).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.checkpoint import keymap, orbax_io
from jaxspec.checkpoint.source import one_line
from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.models import quantized
from jaxspec.models.config import ModelConfig

ENV = "JAXSPEC_QUANTIZED"
FOLDER, INDEX = "blocks", "blocks.json"


def wanted(layout: layouts.Layout, dtype: str) -> bool:
    """Whether params of this layout and dtype use stored blocks: fp32 params packed for the
    CPU kernel (which alone reads blocks), unless `JAXSPEC_QUANTIZED=0`."""
    from jaxspec.kernels import cpu_matmul

    return (os.environ.get(ENV, "1") != "0" and dtype == "float32" and layout.panels
            and cpu_matmul.available())


def _weights(config: ModelConfig):
    """(entry, params path of the fp32 weight, blocks path) of every weight that can be kept as
    blocks: each layer's projections and the output layer (the transposed embedding of a tied
    model)."""
    for entry in keymap.entries(config):
        path = entry.target
        if path[0] == "layers" and path[2] in layouts.PACKED:
            yield entry, path, path
        elif path == ("lm_head",) or (path == ("embed",) and config.tie_word_embeddings):
            yield entry, path, ("lm_head",)


def build(config: ModelConfig, get_blocks, params: dict) -> dict:
    """{"layers": [{name: data}], "lm_head": data} for the weights whose sources all have blocks
    (get_blocks: gguf_source.block_getter; a fused weight whose sources differ in kind, such as
    Q4_K queries and keys with Q6_K values, as q8_dm) and whose packed blocks dequantize exactly
    to `params` (the fp32 params built from the same file)."""
    out: dict = {"layers": [{} for _ in range(config.num_layers)]}
    for entry, path, target in _weights(config):
        got = [get_blocks(name) for name in entry.sources]
        if any(g is None for g in got):
            continue
        if len({g[0] for g in got}) > 1:  # parts of different kinds: all in the one that holds any
            got = [quantized.widen(*g[1:]) for g in got]
        kind = got[0][0]
        combine = (keymap.TRANSFORMS["transpose"] if path == ("embed",)
                   else keymap.TRANSFORMS[entry.combine])
        q, d, m = (None if got[0][i] is None else combine(config, [g[i] for g in got])
                   for i in (1, 2, 3))
        weight = _at(params, path)
        weight = weight.T if path == ("embed",) else weight  # [K, *O]
        K = weight.shape[0]
        flat = [None if a is None else np.asarray(a).reshape(K, -1) for a in (q, d, m)]
        data = quantized.pack(kind, *flat)
        if _exact(data, weight):
            node = out["layers"][target[1]] if target[0] == "layers" else out
            node[target[-1]] = data
    return out


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _exact(data: np.ndarray, weight: np.ndarray) -> bool:
    """Whether panel data dequantize to weight[K, *O] (fp32) bit for bit, zeros of either sign
    alike: the kernel's sums start at +0 and add each product with an FMA, so a zero product
    never changes them, whatever its sign (a Q4_0 weight d·(q − 8) is −0 for q = 8 and d < 0,
    the kernel's d·q − 8d is +0)."""
    panels = np.asarray(layouts.pack(jnp.asarray(weight, jnp.float32)).data)
    return np.array_equal(quantized.dequantize_np(data) + 0, panels + 0)


def _index(blocks: dict) -> dict:
    def entry(data):
        return [str(np.dtype(data.dtype)), list(data.shape)]
    return {"layers": [{k: entry(v) for k, v in layer.items()} for layer in blocks["layers"]],
            **({"lm_head": entry(blocks["lm_head"])} if "lm_head" in blocks else {})}


def write(directory: str, blocks: dict) -> None:
    """Store blocks (from `build`) in a checkpoint directory being written (the index alone
    when there are none: the checkpoint was converted with this module)."""
    if "lm_head" in blocks or any(blocks["layers"]):
        orbax_io.save(os.path.join(directory, FOLDER), blocks, compress=False)
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
        json.dump(_index(blocks), f)


def abstract(path: str) -> dict | None:
    """The stored blocks' ShapeDtypeStructs, None when the checkpoint has none."""
    try:
        with open(os.path.join(path, INDEX), encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {os.path.join(path, INDEX)}: {one_line(e)}") from None
    if "lm_head" not in index and not any(index["layers"]):
        return None

    def spec(entry):
        return jax.ShapeDtypeStruct(tuple(entry[1]), np.dtype(entry[0]))
    return {"layers": [{k: spec(v) for k, v in layer.items()} for layer in index["layers"]],
            **({"lm_head": spec(index["lm_head"])} if "lm_head" in index else {})}


def restore(path: str, target: dict) -> dict:
    """The stored blocks (numpy), shaped like `abstract(path)`."""
    folder = os.path.join(os.path.abspath(path), FOLDER)
    try:
        return orbax_io.restore(folder, target)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints
        raise UserError(f"cannot restore quantized blocks from {folder}: "
                        f"{one_line(e)[:300]}") from None


def substitute(params: dict, blocks: dict) -> dict:
    """params with each weight that has blocks replaced by their Panels (arrays or
    ShapeDtypeStructs alike); a tied model gains the output layer `lm_head` = embed.T."""
    def panels(data, weight_shape):
        return layouts.Panels(data=data, shape=tuple(weight_shape))

    params = dict(params)
    params["layers"] = [{k: panels(b[k], v.shape) if k in b else v for k, v in layer.items()}
                        for layer, b in zip(params["layers"], blocks["layers"])]
    if "lm_head" in blocks:
        shape = params["lm_head"].shape if "lm_head" in params else params["embed"].shape[::-1]
        params["lm_head"] = panels(blocks["lm_head"], shape)
    return params
