"""Preallocated KV cache.

`k`, `v`: [layers, B, kv_heads, S_max, head_dim]. Slot s of row b holds the key/value of the
token at position s of that row. Heads come before slots (DESIGN.md has slots first) because
attention's matmuls batch over heads: with slots first, XLA on CPU copies every layer's values
into this layout at every step. Writes go to the positions of the tokens being processed, so
the cache is never rolled back: slots past a row's length (rejected drafts, prompt padding) are
masked by position in attention and overwritten by the next forward that reaches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec.config import ModelConfig

BUCKET = 128  # S_max is a multiple of this, so new prompt lengths rarely recompile


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S_max, Dh]
    v: jax.Array  # [L, B, K, S_max, Dh]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def bucket(n: int, size: int = BUCKET) -> int:
    """Round n up to a multiple of size."""
    return -(-n // size) * size


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write(cache: jax.Array, layer: int, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Write new[B, T, K, Dh] into cache[layer] at per-row positions[B, T] (one scatter)."""
    rows = jnp.arange(new.shape[0])[:, None]  # [B, 1]
    return cache.at[layer, rows, :, positions].set(new.astype(cache.dtype))
