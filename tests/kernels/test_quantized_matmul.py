"""GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) in panels
(jaxspec.models.quantized) and the CPU kernel on them.

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
from helpers import gguf_quantize

from jaxspec.checkpoint import gguf_source
from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout, quantized

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")
# GGUF type -> the kind of panel data it is kept as (gguf_source.BLOCK_TYPES)
TYPES = {"Q4_0": "q4_1", "Q4_1": "q4_1", "Q5_0": "q8_0", "Q5_1": "q8_dm", "Q8_0": "q8_0",
         "Q4_K": "q4_k", "Q5_K": "q8_dm", "Q6_K": "q6_k"}


def gguf_weight(qtype: str, k: int, n: int, seed: int = 0):
    """A [K, N] weight quantized as GGUF `qtype` (its rows of K as blocks), as (kind, q, d, m)
    read by gguf_source (each [K, N]) and as gguf.quants.dequantize computes it."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)  # GGUF orientation [out, in]
    gtype = gguf.GGMLQuantizationType[qtype]
    raw = gguf_quantize(w, gtype)
    kind, *fields = gguf_source.blocks_of(qtype, raw, (n, k))
    dense = gguf.quants.dequantize(raw, gtype).reshape(n, k).T  # [K, N]
    return (kind, *(None if a is None else np.ascontiguousarray(a.T) for a in fields),
            np.ascontiguousarray(dense))


def shapes(qtype: str, *kn):
    """(k, n) pairs, K widened to a multiple of 256 for the K-quants' super-blocks."""
    return [(qtype, k if "K" not in qtype else -(-k // 256) * 256, n) for k, n in kn]


@pytest.mark.parametrize("qtype,k,n", [c for t in TYPES
                                       for c in shapes(t, (32, 64), (64, 100), (576, 192))])
def test_packed_blocks_dequantize_as_gguf_does(qtype, k, n):
    kind, q, d, m, dense = gguf_weight(qtype, k, n)
    assert kind == TYPES[qtype]
    data = quantized.pack(kind, q, d, m)
    assert quantized.kind(data) == kind
    assert data.shape == quantized.data_shape(kind, (k, n))
    expected = layout.pack(jnp.asarray(dense)).data
    for got in (quantized.dequantize_np(data), quantized.dequantize(jnp.asarray(data))):
        np.testing.assert_array_equal(bits(got), bits(expected))
    unpacked = layout.unpack(layout.Panels(jnp.asarray(data), (k, n)))
    np.testing.assert_array_equal(bits(unpacked), bits(dense))


@pytest.mark.parametrize("qtype", TYPES)
def test_every_kind_widens_exactly_to_q8_dm(qtype):
    """A fused weight whose parts differ in kind is packed as q8_dm: each kind's blocks widened
    to it dequantize to the same weights."""
    _, k, n = shapes(qtype, (64, 100))[0]
    _, q, d, m, dense = gguf_weight(qtype, k, n, seed=6)
    data = quantized.pack(*quantized.widen(q, d, m))
    assert quantized.kind(data) == "q8_dm"
    np.testing.assert_array_equal(bits(quantized.dequantize_np(data)),
                                  bits(layout.pack(jnp.asarray(dense)).data))


def bits(a) -> np.ndarray:
    """The fp32 bits of `a`, zeros of either sign as +0 (a Q4_0 weight d·(q − 8) is −0 where
    d < 0 and q = 8, d·q − 8d is +0: a zero product never changes the kernel's sums, which
    start at +0)."""
    return (np.asarray(a, np.float32) + 0).view(np.uint32)


def kernel(x, data):
    return jax.jit(cpu_matmul.matmul)(jnp.asarray(x), jnp.asarray(data))


@needs_kernel
@pytest.mark.parametrize("qtype,k,n", [c for t in TYPES
                                       for c in shapes(t, (32, 64), (64, 100), (576, 960))])
def test_blocks_give_the_bits_of_the_dequantized_weights(qtype, k, n):
    """The same bits as the fp32 panels of the weights gguf dequantizes, for 1 to 40 rows: every
    row-block size of the fused path (each weight dequantized into registers for up to 6 rows,
    up to 9 rows in all) and the fp32 copy of a panel that prefill-sized products use."""
    kind, q, d, m, dense = gguf_weight(qtype, k, n, seed=1)
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
    kind, q, d, m, dense = gguf_weight("Q4_1", 64, n, seed=3)
    data = quantized.pack(kind, q, d, m)
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
    for dtype in (np.float32, jnp.bfloat16):
        assert quantized.kind(jax.ShapeDtypeStruct((1, 64, 64), dtype)) is None
    assert not cpu_matmul.fits(x, np.zeros((1, 2, 1000), np.uint8))  # wrong block size
    assert not cpu_matmul.fits(x, np.zeros((1, 2, quantized.KINDS["q8_0"].bytes), np.uint8))
    assert not cpu_matmul.fits(jnp.zeros((2, 48), jnp.float32),  # K not a multiple of 32
                               np.zeros((1, 1, quantized.KINDS["q8_0"].bytes), np.int8))


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
