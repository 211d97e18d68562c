"""The CPU prefill-attention kernel (kernels/cpu_prefill_attention.cc through jax.ffi).

A prompt's first forward attends to its own keys and values, positions 0..T-1: the kernel
must equal causal softmax attention (computed here in float64) to fp32 rounding, with and
without a sliding window, for prompt lengths that leave partial query blocks and key tiles,
and with one or several query heads per key/value head. The decoder's prefill on the CPU
layout goes through it (tests/models/test_decoder.py compares that with attention over the
cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import causal_attention

from jaxspec.kernels import cpu_attention, cpu_matmul

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")


@needs_kernel
@pytest.mark.parametrize("T", [1, 7, 37, 130])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("G, Dh", [(3, 64), (1, 16)])
def test_equals_causal_softmax_attention(T, window, G, Dh):
    rng = np.random.default_rng(T)
    B, K = 2, 2
    q = rng.standard_normal((B, T, K, G, Dh)).astype(np.float32) * 2
    k = rng.standard_normal((B, T, K, Dh)).astype(np.float32) * 2
    v = rng.standard_normal((B, T, K, Dh)).astype(np.float32)
    got = jax.jit(cpu_attention.prefill, static_argnums=3)(q, k, v, window)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), causal_attention(q, k, v, window), rtol=0,
                               atol=2e-5)


@needs_kernel
def test_takes_fp32_attention_of_the_cpu_layout_only():
    assert cpu_attention.prefill_takes(True, jnp.float32, 64)
    assert not cpu_attention.prefill_takes(False, jnp.float32, 64)  # another layout's cache
    assert not cpu_attention.prefill_takes(True, jnp.bfloat16, 64)
    assert not cpu_attention.prefill_takes(True, jnp.float32, 8)  # Dh not a multiple of 16
