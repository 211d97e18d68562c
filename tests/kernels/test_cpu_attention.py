"""The CPU decode-attention kernel (kernels/cpu_attention.cc through jax.ffi).

It must equal softmax attention (computed here in float64) to fp32 rounding over exactly the
slots a query may see, never read the others (they hold NaN and inf here), give each query row
the same bits whatever the number of rows, rows of the batch, or threads (a verify computes
what one-token steps compute), and read the layer it is given. The decoder uses it for decode
steps and verifies on CPU; its parity with transformers and the greedy-equality tests of the
suite run through it.
"""

from __future__ import annotations

import ctypes

import jax
import numpy as np
import pytest

from jaxspec.kernels import cpu_attention, cpu_matmul
from jaxspec.models.cache import KVCache

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")

L, B, K, G, S, DH = 3, 2, 2, 3, 80, 16


@jax.jit
def attend(q, keys, values, layer, positions):
    return cpu_attention.attend(q, keys, values, layer, positions, None)


@jax.jit
def attend_windowed(q, keys, values, layer, positions):
    return cpu_attention.attend(q, keys, values, layer, positions, 5)


def cache(seed: int = 0):
    """keys[L, B, K, S, Dh], values[L, B, K, Dh, S] fp32."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((L, B, K, S, DH)).astype(np.float32) * 2
    values = rng.standard_normal((L, B, K, DH, S)).astype(np.float32)
    return keys, values


def queries(T: int, seed: int = 1):
    return np.random.default_rng(seed).standard_normal((B, T, K, G, DH)).astype(np.float32) * 2


def reference(q, keys, values, layer, positions, window=None):
    """float64 softmax attention over the visible slots."""
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for t in range(q.shape[1]):
            p = positions[b, t]
            lo = 0 if window is None else max(0, p - window + 1)
            for k in range(K):
                ks = keys[layer, b, k, lo: p + 1].astype(np.float64)  # [n, Dh]
                vs = values[layer, b, k, :, lo: p + 1].astype(np.float64)  # [Dh, n]
                s = q[b, t, k].astype(np.float64) @ ks.T / np.sqrt(DH)  # [G, n]
                w = np.exp(s - s.max(-1, keepdims=True))
                out[b, t, k] = (w / w.sum(-1, keepdims=True)) @ vs.T
    return out


def poison_invisible(keys, values, layer, positions):
    """NaN and inf in every slot of `layer` past the rows' last position: a kernel that reads
    them (or lets a masked slot through) returns NaN."""
    keys, values = keys.copy(), values.copy()
    for b in range(B):
        past = positions[b].max() + 1
        keys[layer, b, :, past:] = np.nan
        values[layer, b, :, :, past:] = np.inf
    return keys, values


@needs_kernel
@pytest.mark.parametrize("T", [1, 2, 5, 9])
@pytest.mark.parametrize("layer", [0, 2])
def test_equals_softmax_attention_over_the_visible_slots(T, layer):
    keys, values = cache()
    positions = np.stack([np.arange(T) + 3, np.arange(T) + 60]).astype(np.int32)  # [B, T]
    keys, values = poison_invisible(keys, values, layer, positions)
    q = queries(T)
    got = np.asarray(attend(q, keys, values, np.int32(layer), positions))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference(q, keys, values, layer, positions), rtol=2e-5,
                               atol=2e-6)


@needs_kernel
def test_sliding_window_and_the_first_slot():
    keys, values = cache(2)
    positions = np.array([[0, 1, 4, 5], [9, 10, 11, 40]], np.int32)
    q = queries(4, 3)
    keys, values = poison_invisible(keys, values, 1, positions)
    expected = reference(q, keys, values, 1, positions, window=5)
    got = np.asarray(attend_windowed(q, keys, values, np.int32(1), positions))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    # slots before the window (of positions 5 and 40: from 1 and 36) hold NaN: not read either
    keys[1, 0, :, :1] = values[1, 0, :, :, :1] = np.nan
    keys[1, 1, :, :36] = values[1, 1, :, :, :36] = np.nan
    got = np.asarray(attend_windowed(q[:, 3:], keys, values, np.int32(1), positions[:, 3:]))
    np.testing.assert_allclose(got, expected[:, 3:], rtol=2e-5, atol=2e-6)


@needs_kernel
def test_each_row_is_bit_identical_whatever_the_rows_and_threads():
    """A verify's T positions against T one-position calls, one batch row alone, and 1 thread
    against several (the library's thread count, restored after)."""
    keys, values = cache(4)
    T = 9
    positions = np.stack([np.arange(T) + 50, np.arange(T) + 70]).astype(np.int32)
    q = queries(T, 5)
    together = np.asarray(attend(q, keys, values, np.int32(1), positions))
    for t in range(T):
        alone = np.asarray(attend(q[:, t: t + 1], keys, values, np.int32(1),
                                  positions[:, t: t + 1]))
        assert np.array_equal(alone[:, 0], together[:, t])
    single_row = np.asarray(attend(q[:1], keys[:, :1], values[:, :1], np.int32(1),
                                   positions[:1]))
    assert np.array_equal(single_row[0], together[0])
    library = cpu_matmul._load()
    library.jaxspec_small_m_set_threads(ctypes.c_int(1))
    try:
        one_thread = np.asarray(attend(q + 0, keys, values, np.int32(1), positions))
    finally:
        library.jaxspec_small_m_set_threads(ctypes.c_int(cpu_matmul.default_threads()))
    assert np.array_equal(one_thread, together)


@needs_kernel
def test_fits_only_fp32_caches_the_cpu_layout_made_and_few_positions():
    keys, values = cache()
    q = queries(1)
    made = KVCache(k=keys, v=values, values_slots_last=True, cpu_kernel=True)
    assert cpu_attention.fits(q, made)
    assert not cpu_attention.fits(q, made.replace(cpu_kernel=False))  # cpu-xla
    slots_first = KVCache(k=keys, v=keys, values_slots_last=False, cpu_kernel=True)
    assert not cpu_attention.fits(q, slots_first)  # values [.., S, Dh]
    assert not cpu_attention.fits(q.astype(np.float16), made)
    many = np.zeros((B, cpu_attention.MAX_POSITIONS + 1, K, G, DH), np.float32)  # a prefill
    assert not cpu_attention.fits(many, made)
    assert not cpu_attention.fits(np.zeros((B, 1, K, G, 12), np.float32), made)
