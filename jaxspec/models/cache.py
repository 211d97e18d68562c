"""Preallocated KV cache.

`k`: [layers, B, kv_heads, S_max, head_dim]; `v`: [layers, B, kv_heads, head_dim, S_max] when
the layout policy stores values slots-last (CPU), else [layers, B, kv_heads, S_max, head_dim]
(see jaxspec.models.layout). Slot s of row b holds the key/value of the token at position s of
that row. Heads come before slots (DESIGN.md has slots first) because attention's matmuls batch
over heads: with slots first, XLA on CPU copies every layer's values into this layout at every
step.

Writes go to the positions of the tokens being processed, so the cache is never rolled back:
slots past a row's length (rejected drafts, prompt padding) are masked by position in
attention and overwritten by the next forward that reaches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec import pytree
from jaxspec.models.config import ModelConfig
from jaxspec.models.layout import Layout

BUCKET = 128  # S_max is a multiple of this, so new prompt lengths rarely recompile


@pytree.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S_max, Dh]
    v: jax.Array  # [L, B, K, Dh, S_max] (values_slots_last) or [L, B, K, S_max, Dh]
    values_slots_last: bool = pytree.static(default=True)
    # attention through the CPU decode-attention kernel where it fits (the CPU layout with
    # panels: one device, unsharded; kernels.cpu_attention)
    cpu_kernel: bool = pytree.static(default=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def bucket(n: int, size: int = BUCKET) -> int:
    """Round n up to a multiple of size."""
    return -(-n // size) * size


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype, layout: Layout) -> KVCache:
    """An empty cache for params of `dtype` (fp32 where the layout wants an fp32 cache)."""
    dtype = jnp.float32 if layout.fp32_cache else dtype
    heads = (config.num_layers, batch, config.num_kv_heads)
    keys = heads + (max_len, config.head_dim)
    values = heads + (config.head_dim, max_len) if layout.values_slots_last else keys
    return KVCache(k=jnp.zeros(keys, dtype), v=jnp.zeros(values, dtype),
                   values_slots_last=layout.values_slots_last, cpu_kernel=layout.panels)


def write(cache: KVCache, layer: int, positions: jax.Array, k: jax.Array,
          v: jax.Array) -> KVCache:
    """Write k, v [B, T, K, Dh] into `layer` at per-row positions[B, T] (one scatter each)."""
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    # index arrays split by slices: numpy puts their [B, T] first, so every target is [B,T,K,Dh]
    keys = cache.k.at[layer, rows, :, positions].set(k.astype(cache.k.dtype))
    if cache.values_slots_last:
        values = cache.v.at[layer, rows, :, :, positions].set(v.astype(cache.v.dtype))
    else:
        values = cache.v.at[layer, rows, :, positions].set(v.astype(cache.v.dtype))
    return cache.replace(k=keys, v=values)
