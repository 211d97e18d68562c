"""Decode attention for CPU (`cpu_attention.cc`, built into the CPU matmul kernel's library):
one layer's attention for the few query rows of a decode step or a verify, reading that
layer's keys and values where they lie in the stacked KV cache and only the slots each row may
see. XLA:CPU copied the scanned layer's slice of the cache before its dots at every layer of
every step, and the dots ran over every slot: at a few hundred new tokens on SmolLM2-135M that
was a third of a decode step. A row's result is bit-identical whatever the number of rows (a
verify equals its one-token steps), computed in fp32 with a polynomial exp (Cephes' expf).

And prefill attention (`cpu_prefill_attention.cc`, `prefill`): a prompt's first forward, its
queries over its own keys and values (causal, sliding window), blocks of query positions
sharing every key and value they read; 900 prompt tokens on SmolLM2-135M took 0.23 s of
attention where XLA's causal blocks (models.decoder._attention_prefill) took about twice that.

`JAXSPEC_CPU_ATTENTION=xla` turns both off (XLA's dots, as on other backends);
`JAXSPEC_CPU_MATMUL=xla` does too (no library is loaded)."""

from __future__ import annotations

import os

from jaxspec.validation import MAX_SPECULATIVE_TOKENS

from . import cpu_matmul

ENV = "JAXSPEC_CPU_ATTENTION"

# Query positions per call up to which the decoder uses the kernel: every verify (γ + 1) and a
# one-token step, so they compute alike; a longer prompt's prefill keeps XLA's batched dots (one
# pass over the slots for many rows).
MAX_POSITIONS = MAX_SPECULATIVE_TOKENS + 1
LANES = 8  # Dh must be a multiple of this (one AVX2 vector)


def fits(q, cache) -> bool:
    """Whether the kernel takes q[B, T, K, G, Dh] against this KV cache (models.cache: one the
    CPU layout made for it, fp32 everywhere, values slots-last [L, B, K, Dh, S]; T ≤
    MAX_POSITIONS) and is available."""
    import jax.numpy as jnp

    return (cache.cpu_kernel and cache.values_slots_last and q.ndim == 5
            and 1 <= q.shape[1] <= MAX_POSITIONS and q.shape[4] % LANES == 0
            and all(a.dtype == jnp.float32 for a in (q, cache.k, cache.v))
            and os.environ.get(ENV, "kernel") != "xla" and cpu_matmul.available())


def prefill_takes(cpu_kernel: bool, dtype, head_dim: int) -> bool:
    """Whether a prompt's first forward attends through `prefill` (cpu_prefill_attention.cc):
    a KV cache the CPU layout made (`cpu_kernel`), attention in fp32, Dh a multiple of 16."""
    import jax.numpy as jnp

    return (cpu_kernel and jnp.dtype(dtype) == jnp.float32 and head_dim % 16 == 0
            and os.environ.get(ENV, "kernel") != "xla" and cpu_matmul.available())


def prefill(q, keys, values, window: int | None):
    """Causal attention of a prompt's own positions 0..T-1: q[B, T, K, G, Dh], keys and
    values [B, T, K, Dh] (fp32) -> [B, T, K, G, Dh] fp32, each query seeing keys s ≤ t (and
    s > t - window). Call only where `prefill_takes`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    keys_t = jnp.transpose(keys, (0, 2, 3, 1))  # [B, K, Dh, T]: the kernel's score tiles
    return jax.ffi.ffi_call(cpu_matmul.PREFILL_TARGET, out)(q, keys_t, values,
                                                            window=np.int64(window or 0))


def attend(q, keys, values, layer, positions, window: int | None):
    """Attention of q[B, T, K, G, Dh] over layer `layer` (i32[]) of keys[L, B, K, S, Dh] and
    values[L, B, K, Dh, S], the query at positions[b, t] seeing slots s ≤ positions[b, t]
    (and s > positions[b, t] - window with a sliding window): [B, T, K, G, Dh] fp32. Call only
    where `fits`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(cpu_matmul.ATTENTION_TARGET, out)(
        q, keys, values, jnp.asarray(layer, jnp.int32), positions.astype(jnp.int32),
        window=np.int64(window or 0))
