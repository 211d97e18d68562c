"""GGUF-quantized weights kept as their blocks, in column panels for the CPU kernel.

A GGUF model's projections are stored as blocks of 32 weights along the input dimension:
Q4_1 (fp16 scale d, fp16 offset m, 32 4-bit quants q: w = d·q + m) and Q8_0 (fp16 scale d,
32 int8 quants: w = q·d). Converted to fp32 they are 4 bytes per weight, and decoding reads every
weight at every step. Kept as blocks, packed here in the panel layout of the CPU kernel
(kernels/cpu_matmul.cc: `quant_rows`, `dequant_panel`), they are 0.625 (Q4_1) or 1.06 (Q8_0)
bytes, and the kernel dequantizes them exactly as gguf's numpy code (`gguf.quants`) does — d·q
(exact in fp32: an fp16 d has 11 significant bits, q at most 8), then + m rounded to fp32 — so
every product and sum is the one it computes from the fp32 weights, bit for bit.

`Panels` of a [K, *O] weight with data uint8 [J, K / 32, 1280] (Q4_1) or int8
[J, K / 32, 2176] (Q8_0), J = ceil(N / 64), N = prod(O); block b of panel j holds panel rows
32b..32b+31:
    Q4_1   d[64] fp16, m[64] fp16, then for each of the 32 rows 32 bytes: byte 8g + l holds
           column 16g + l in its low nibble and column 16g + 8 + l in its high nibble
    Q8_0   d[64] fp16, then for each of the 32 rows 64 int8
(the columns' fp16 scales and offsets are raw bytes in the array).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BLOCK = 32  # weights per block along K (GGUF's Q4_1 and Q8_0)
PANEL = 64  # columns per panel (models.layout.PANEL)
DTYPES = {"q4_1": np.dtype(np.uint8), "q8_0": np.dtype(np.int8)}  # the data's dtype says which
BYTES = {"q4_1": 4 * PANEL + BLOCK * PANEL // 2, "q8_0": 2 * PANEL + BLOCK * PANEL}


def kind(dtype) -> str | None:
    """"q4_1" or "q8_0" for panel data of that dtype, None for fp32/bf16 panels."""
    for name, d in DTYPES.items():
        if np.dtype(dtype) == d:
            return name
    return None


def data_shape(kind_: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The data's shape for a [K, *O] weight."""
    n = int(np.prod(shape[1:]))
    return (-(-n // PANEL), shape[0] // BLOCK, BYTES[kind_])


def pack(kind_: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of a [K, N] weight -> panel data: q[K, N] its quants (0..15 or -128..127), d and m
    [K / 32, N] fp32 (fp16 values) its blocks' scales and offsets (m for Q4_1 only)."""
    K, N = q.shape
    pad = -N % PANEL
    q, d = np.pad(q, ((0, 0), (0, pad))), np.pad(d, ((0, 0), (0, pad)))
    J, KB = (N + pad) // PANEL, K // BLOCK

    def per_block(a):  # [KB, J * 64] -> [J, KB, 64 · 2 bytes] of fp16
        half = a.astype(np.float16)
        assert np.array_equal(half.astype(np.float32), a), "scales must be fp16 values"
        return np.ascontiguousarray(half.reshape(KB, J, PANEL).transpose(1, 0, 2)).view(np.uint8)

    quants = q.reshape(KB, BLOCK, J, PANEL).transpose(2, 0, 1, 3)  # [J, KB, 32, 64]
    if kind_ == "q8_0":
        return np.concatenate([per_block(d), quants.astype(np.uint8).reshape(J, KB, -1)],
                              axis=-1).view(np.int8)
    m = np.pad(m, ((0, 0), (0, pad)))
    nibbles = quants.astype(np.uint8).reshape(J, KB, BLOCK, 4, 2, 8)  # [.., g, low/high, l]
    packed = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # [J, KB, 32, 4, 8]
    return np.concatenate([per_block(d), per_block(m), packed.reshape(J, KB, -1)], axis=-1)


def _fields(data, xp):
    """(q [J, KB, 32, 64] fp32, d [J, KB, 1, 64] fp32, m or None) of panel data, with numpy or
    jax.numpy (`xp`)."""
    J, KB, _ = data.shape
    k = kind(data.dtype)
    raw = data.view(np.uint8) if xp is np else data.view(jnp.uint8)

    def halves(a):  # [J, KB, 128] bytes -> [J, KB, 1, 64] fp32
        return a.view(np.float16).reshape(J, KB, 1, PANEL).astype(np.float32)

    d = halves(raw[..., : 2 * PANEL])
    if k == "q8_0":
        q = data[..., 2 * PANEL:].reshape(J, KB, BLOCK, PANEL).astype(np.float32)
        return q, d, None
    m = halves(raw[..., 2 * PANEL: 4 * PANEL])
    b = raw[..., 4 * PANEL:].reshape(J, KB, BLOCK, 4, 1, 8)
    q = xp.concatenate([b & 15, b >> 4], axis=-2).reshape(J, KB, BLOCK, PANEL)
    return q.astype(np.float32), d, m


def dequantize_np(data: np.ndarray) -> np.ndarray:
    """Panel data -> fp32 panels [J, K, 64], as gguf.quants computes the weights."""
    q, d, m = _fields(np.asarray(data), np)
    w = q * d if m is None else (d * q) + m
    return w.reshape(w.shape[0], -1, PANEL)


def dequantize(data) -> jnp.ndarray:
    """The same in jax.numpy (for programs lowered where the kernel is not: XLA may round
    differently there)."""
    q, d, m = _fields(data, jnp)
    w = q * d if m is None else (d * q) + m
    return w.reshape(w.shape[0], -1, PANEL)


def quantize_q8_0(w) -> np.ndarray:
    """A [K, *O] fp32 weight (K a multiple of 32) quantized to Q8_0 panel data: per column and
    block of 32 rows along K, the scale d = max|w| / 127 rounded to fp16 and q = w / d rounded
    to the nearest integer in [-127, 127]. Lossy (for weights whose exact values do not decide
    the output, such as a draft's: rejection sampling keeps the output exact whatever it
    proposes)."""
    w = np.asarray(w, np.float32)
    K = w.shape[0]
    flat = w.reshape(K // BLOCK, BLOCK, -1)  # [KB, 32, N]
    d = (np.abs(flat).max(axis=1) / 127).astype(np.float16).astype(np.float32)  # [KB, N]
    inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(flat * inverse[:, None, :]), -127, 127).astype(np.int8)
    return pack("q8_0", q.reshape(K, -1), d)
