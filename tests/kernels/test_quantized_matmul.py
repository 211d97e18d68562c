"""GGUF Q4_1 and Q8_0 blocks in panels (jaxspec.models.quantized) and the CPU kernel on them.

The kernel must compute, from the blocks, exactly what it computes from the fp32 weights that
gguf's numpy code dequantizes them to: bit for bit, for any number of rows, on any number of
threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout, quantized

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")
KINDS = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def gguf_weight(kind: str, k: int, n: int, seed: int = 0):
    """A [K, N] weight quantized by gguf (its rows of K as GGUF blocks), as (q, d, m) and as
    gguf.quants.dequantize computes it."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)  # GGUF orientation [out, in]
    raw = gguf.quants.quantize(w, KINDS[kind])
    size = 20 if kind == "q4_1" else 34
    blocks = raw.view(np.uint8).reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n · k / 32, 1]
    if kind == "q8_0":
        q, m = blocks[:, 2:].view(np.int8), None
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)

    def kn(a):  # per block [n · k / 32, c] -> [K / c', N]
        return a.reshape(n, -1).T

    dense = gguf.quants.dequantize(raw, KINDS[kind]).reshape(n, k).T  # [K, N]
    return kn(q), kn(d), None if m is None else kn(m), np.ascontiguousarray(dense)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,n", [(32, 64), (64, 100), (576, 192)])
def test_packed_blocks_dequantize_as_gguf_does(kind, k, n):
    q, d, m, dense = gguf_weight(kind, k, n)
    data = quantized.pack(kind, q, d, m)
    assert data.dtype == quantized.DTYPES[kind]
    assert data.shape == quantized.data_shape(kind, (k, n))
    expected = layout.pack(jnp.asarray(dense)).data
    for got in (quantized.dequantize_np(data), quantized.dequantize(jnp.asarray(data))):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                      np.asarray(expected).view(np.uint32))
    unpacked = layout.unpack(layout.Panels(jnp.asarray(data), (k, n)))
    np.testing.assert_array_equal(np.asarray(unpacked), dense)


def kernel(x, data):
    return jax.jit(cpu_matmul.matmul)(jnp.asarray(x), jnp.asarray(data))


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,n", [(32, 64), (64, 100), (576, 960)])
def test_blocks_give_the_bits_of_the_dequantized_weights(kind, k, n):
    """The same bits as the fp32 panels of the weights gguf dequantizes, for 1 to 40 rows: every
    row-block size of the fused path (each weight dequantized into registers for up to 6 rows,
    up to 9 rows in all) and the fp32 copy of a panel that prefill-sized products use."""
    q, d, m, dense = gguf_weight(kind, k, n, seed=1)
    data = quantized.pack(kind, q, d, m)
    assert cpu_matmul.fits(jnp.zeros((3, k), jnp.float32), data)
    panels = layout.pack(jnp.asarray(dense)).data
    x = np.random.default_rng(2).standard_normal((40, k)).astype(np.float32)
    for rows in (1, 2, 3, 4, 5, 6, 7, 9, 10, 17, 40):
        got, expected = kernel(x[:rows], data), kernel(x[:rows], panels)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                      np.asarray(expected).view(np.uint32))
    np.testing.assert_allclose(np.asarray(got)[:, :n], x @ dense, rtol=1e-4, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("rows, n", [(5, 4160), (300, 576)])
def test_blocks_on_one_thread_give_the_same_bits(tmp_path, rows, n):
    """Split across threads here (65 panels; or 9 panels x 4 chunks of rows, a prefill-sized
    product), one thread in a subprocess computes the same, and the fp32 panels too."""
    q, d, m, dense = gguf_weight("q4_1", 64, n, seed=3)
    data = quantized.pack("q4_1", q, d, m)
    x = np.random.default_rng(4).standard_normal((rows, 64)).astype(np.float32)
    expected = kernel(x, layout.pack(jnp.asarray(dense)).data)
    np.testing.assert_array_equal(np.asarray(kernel(x, data)), np.asarray(expected))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "data.npy", data)
    script = ("import sys, numpy as np, jax; from jaxspec.kernels import cpu_matmul as c; "
              "d = sys.argv[1]; c.available(); "
              "np.save(d + '/out.npy', jax.jit(c.matmul)(np.load(d + '/x.npy'), "
              "np.load(d + '/data.npy')))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True,
                   env={**os.environ, cpu_matmul.THREADS_ENV: "1"})
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.asarray(kernel(x, data)))


def test_other_dtypes_and_shapes_are_not_blocks():
    x = jnp.zeros((2, 64), jnp.float32)
    assert quantized.kind(np.float32) is None and quantized.kind(jnp.bfloat16) is None
    assert not cpu_matmul.fits(x, np.zeros((1, 2, 1000), np.uint8))  # wrong block size
    assert not cpu_matmul.fits(jnp.zeros((2, 48), jnp.float32),  # K not a multiple of 32
                               np.zeros((1, 1, quantized.BYTES["q8_0"]), np.int8))


def test_q8_0_quantizer_rounds_each_weight_to_its_blocks_grid():
    """quantize_q8_0 (a draft head's weights): per column and block of 32 rows, an fp16 scale
    d = max|w| / 127 and each weight within d / 2 of q·d; an all-zero block stays zero."""
    w = np.random.default_rng(5).standard_normal((96, 70)).astype(np.float32)
    w[32:64, 3] = 0.0
    data = quantized.quantize_q8_0(w)
    assert data.dtype == np.int8 and data.shape == quantized.data_shape("q8_0", w.shape)
    back = np.asarray(layout.unpack(layout.Panels(jnp.asarray(data), w.shape)))
    scale = np.abs(w.reshape(3, 32, 70)).max(axis=1) / 127  # [blocks, columns]
    error = np.abs(back - w).reshape(3, 32, 70)
    assert np.all(error <= scale[:, None, :] * (0.5 + 1e-3) + 1e-7)
    assert np.all(back[32:64, 3] == 0)
    assert np.abs(back).max() <= np.abs(w).max() * (1 + 1e-3)
