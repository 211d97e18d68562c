"""Draft-head checkpoints: a directory with config.json and Orbax params, written atomically.

    config.json  {"jaxspec_draft_head": 1, "dtype": "bfloat16" | "float32",
                  "config": HeadConfig.to_dict(),       the target's config, fused layers, V_d
                  "fingerprint": [...],                 sums of the target's first embedding rows
                  "d2t_sha256": "...",                  digest of the vocabulary mapping
                  "gamma": γ, "threshold": t,           what the measurements picked
                  "training": {...}}                    how it was made (free-form)
    params/      the head params (jaxspec.drafts.head), d2t included, saved by Orbax

A head is loaded in fp32 whatever it was stored in, and refused, before anything compiles, for
a target with another shape (hidden size, vocabulary, layer count, heads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.checkpoint import blocks, mapped, orbax_io, temp_dirs
from jaxspec.checkpoint.source import one_line
from jaxspec.checkpoint.store import is_jaxspec_dir, numpy_dtype
from jaxspec.drafts import head as heads
from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.models import quantized

MARKER = "jaxspec_draft_head"
VERSION = 1
FINGERPRINT_ROWS = 8
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "checkpoints", "smollm2-135m-instruct-head")  # in the repository's checkpoints/


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedHead:
    config: heads.HeadConfig
    params: dict  # fp32 head params, d2t included (laid out when loaded with a layout)
    meta: dict  # config.json: gamma, threshold, fingerprint, training


def _floating(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def fingerprint(target_params) -> list[float]:
    """Sums of the target's first embedding rows: tells its weights apart from a same-shaped
    model's (a head is only useful for the weights it was trained on)."""
    rows = np.asarray(jax.device_get(target_params["embed"][:FINGERPRINT_ROWS]), np.float64)
    return [round(float(v), 4) for v in rows.sum(axis=1)]


def d2t_digest(d2t) -> str:
    """sha256 of the vocabulary mapping (int32 little-endian), recorded in config.json."""
    return hashlib.sha256(np.asarray(d2t, "<i4").tobytes()).hexdigest()


def is_head_dir(path: str) -> bool:
    return is_jaxspec_dir(path, MARKER)


def save(path: str, config: heads.HeadConfig, params: dict, *, target_params, dtype: str,
         gamma: int, threshold: float, training: dict) -> None:
    """Write the head to `path` (replacing it) through a temporary sibling directory."""
    store = numpy_dtype(dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(store) if _floating(x)
                          else np.asarray(x), params)
    tmp = temp_dirs.make(os.path.abspath(path))
    try:
        orbax_io.save(os.path.join(tmp, "params"), params)
        meta = {MARKER: VERSION, "dtype": dtype, "config": config.to_dict(),
                "fingerprint": fingerprint(target_params), "d2t_sha256": d2t_digest(
                    params["d2t"]), "gamma": gamma,
                "threshold": threshold, "training": training}
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get(MARKER) != VERSION:
        raise UserError(f"{path}: unsupported draft head version {meta.get(MARKER)!r}")
    return meta


def load(path: str, layout=None, device=None) -> LoadedHead:
    """The head at `path` in fp32; a damaged checkpoint raises UserError. With a `layout`
    (jaxspec.models.layout) its params are laid out in it and placed on `device`, a CPU
    device: mapped by jaxspec.checkpoint.mapped when an earlier process saved them."""
    meta = read_meta(path)
    try:
        config = heads.HeadConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}/config.json: bad head config ({e})") from None
    store = numpy_dtype(meta.get("dtype", "float32"))

    def restore():
        shapes = jax.eval_shape(lambda: heads.init_params(config, jax.random.key(0),
                                                          dtype=store))
        try:
            params = orbax_io.restore(os.path.join(os.path.abspath(path), "params"), shapes)
        except Exception as e:  # Orbax/tensorstore raise many types for damaged checkpoints
            raise UserError(f"cannot restore the draft head in {path}: "
                            f"{one_line(e)[:300]}") from None
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if _floating(x)
                            else jnp.asarray(x), params)

    if layout is None:
        return LoadedHead(config, restore(), meta)
    as_blocks = blocks.wanted(layout, "float32")

    def restore_laid_out():
        params = _q8_0(restore(), quantized.quantize_q8_0) if as_blocks else restore()
        return jax.device_put(layouts.apply(layout, params, tied=False), device)

    def abstract():
        params = jax.eval_shape(lambda: heads.init_params(config, jax.random.key(0)))
        if as_blocks:
            params = _q8_0(params, lambda w: jax.ShapeDtypeStruct(
                quantized.data_shape("q8_0", w.shape), np.int8))
        return jax.eval_shape(lambda p: layouts.apply(layout, p, tied=False), params)

    params = mapped.laid_out(path, "float32", layout, abstract, restore_laid_out, device)
    return LoadedHead(config, params, meta)


def _q8_0(params: dict, quantize) -> dict:
    """The head's projections, fusion and output layer as Panels of Q8_0 blocks (`quantize(w)`
    gives their data), loaded so where the CPU kernel reads the target's GGUF blocks
    (blocks.wanted): a quarter of the bytes per draft step. The rounding changes what the head
    proposes, never the output (rejection sampling is exact whatever q is)."""
    def blocks_of(w):
        if w.shape[0] % quantized.BLOCK:
            return w
        return layouts.Panels(data=quantize(w), shape=tuple(w.shape))

    layer = {k: blocks_of(v) if k in layouts.PACKED else v
             for k, v in params["layers"][0].items()}
    return {**params, "layers": [layer], "fuse": blocks_of(params["fuse"]),
            "lm_head": blocks_of(params["lm_head"])}


SHAPE_FIELDS = ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim")


def _shape_difference(config: heads.HeadConfig, target) -> str | None:
    """The first shape field where the head's target and `target` differ, else None."""
    return next((f for f in SHAPE_FIELDS
                 if getattr(config.target, f) != getattr(target.config, f)), None)


def check_target(head: LoadedHead, target, where: str = "draft head") -> None:
    """Refuse a head trained for a target of another shape (one line, before compiling)."""
    field = _shape_difference(head.config, target)
    if field is not None:
        raise UserError(f"{where} was trained for a target with {field}="
                        f"{getattr(head.config.target, field)}, this target has "
                        f"{getattr(target.config, field)}")


def matches(head_meta: dict, target) -> bool:
    """Whether the head was trained on exactly this target's weights (shape and fingerprint;
    EOS ids and position limits may differ)."""
    config = heads.HeadConfig.from_dict(head_meta["config"])
    return _shape_difference(config, target) is None and np.allclose(
        head_meta["fingerprint"], fingerprint(target.params), rtol=1e-2, atol=1e-2)


def shipped_for(target) -> str | None:
    """The shipped head's path when `target` is the model it was trained for, else None."""
    if not is_head_dir(SHIPPED):
        return None
    return SHIPPED if matches(read_meta(SHIPPED), target) else None


def as_draft(head: LoadedHead, target, layout):
    """(HeadDraft, None, loop params {"head", "embed"}) for `target`, the head's weights in
    `layout` (packed for the CPU kernel where the layout wants it)."""
    check_target(head, target)
    draft = heads.HeadDraft(head.config, threshold=float(head.meta.get("threshold", 0.0)),
                            gamma=int(head.meta.get("gamma", 4)))
    params = layouts.apply(layout, head.params, tied=False)
    return draft, None, {"head": params, "embed": target.params["embed"]}
