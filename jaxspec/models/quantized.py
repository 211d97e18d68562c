"""GGUF-quantized weights kept as their blocks, in column panels for the CPU kernel.

A GGUF model's projections are stored as blocks of weights along the input dimension, each
weight w = d·q + m or q·d: 4-bit (Q4_0, Q4_1, Q4_K) or wider quants q, with per-block scales d
(and offsets m). Converted to fp32 they are 4 bytes per weight, and decoding reads every weight
at every step. Kept as blocks, packed here in the panel layout of the CPU kernel
(kernels/cpu_matmul.cc: `quant_rows`, `dequant_panel`), they are 0.6-1.5 bytes, and the kernel
dequantizes them exactly as gguf's numpy code (`gguf.quants`) does: every product d·q below is
exact in fp32 (at most 23 significant bits), so d·q + m rounds once, as one FMA does, and every
product and sum is the one the kernel computes from the fp32 weights, bit for bit.

Five kinds of panel data, [J, K / 32, bytes] with J = ceil(N / 64), N = prod(O); block b of
panel j holds panel rows 32b..32b+31, a header of per-column scales (and offsets) then the
quants row by row; the data's dtype and bytes per block say which kind:

    kind   dtype  bytes  header                             quants per row          from GGUF
    q4_1   uint8  1280   d[64] fp16, m[64] fp16             32 bytes of nibbles     Q4_1, Q4_0
    q8_0   int8   2176   d[64] fp16                         64 int8                 Q8_0, Q5_0
    q4_k   uint8  1536   d[64] fp32, m[64] fp32             32 bytes of nibbles     Q4_K
    q6_k   int8   2560   d[64] fp32 rows 0-15, d[64] 16-31  64 int8                 Q6_K
    q8_dm  int8   3072   d[2][64] fp32, m[2][64] fp32       64 int8                 Q5_1, Q5_K,
                         (rows 0-15, 16-31)                                         any mix

Nibbles: byte 8g + l of a row holds column 16g + l in its low nibble and column 16g + 8 + l in
its high one. A Q4_0 weight d·(q − 8) is stored as q4_1 with m = −8d, a Q5_0 weight
d·(q − 16) as q8_0 with the quant q − 16, a Q4_K sub-block's d·sc and −dmin·m (exact products
of an fp16 and a 6-bit integer) as q4_k's fp32 scale and offset, a Q6_K sub-block of 16 weights
with its scale d·sc (fp16 times int8) and quants q − 32 as q6_k. q8_dm holds any of them
exactly (`widen`): a fused weight whose parts differ in kind (llama.cpp's Q4_K_M quantizes some
layers' value projections as Q6_K and their queries and keys as Q4_K), and Q5_1 and Q5_K (5-bit
quants with offsets).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

BLOCK = 32  # panel rows per block (GGUF's Q4_1 and Q8_0 blocks, a K-quant's 32 weights)
PANEL = 64  # columns per panel (models.layout.PANEL)


class Kind(NamedTuple):
    dtype: np.dtype  # the data's dtype
    nibbles: bool  # 4-bit quants (else int8)
    scale: np.dtype  # the scales' (and offsets') dtype in the header
    offsets: bool  # w = d·q + m (else q·d)
    groups: int  # scale rows per block: a scale per column for every 32 / groups rows

    @property
    def bytes(self) -> int:
        header = self.groups * (2 if self.offsets else 1) * PANEL * self.scale.itemsize
        return header + BLOCK * PANEL // (2 if self.nibbles else 1)


KINDS = {
    "q4_1": Kind(np.dtype(np.uint8), True, np.dtype(np.float16), True, 1),
    "q8_0": Kind(np.dtype(np.int8), False, np.dtype(np.float16), False, 1),
    "q4_k": Kind(np.dtype(np.uint8), True, np.dtype(np.float32), True, 1),
    "q6_k": Kind(np.dtype(np.int8), False, np.dtype(np.float32), False, 2),
    "q8_dm": Kind(np.dtype(np.int8), False, np.dtype(np.float32), True, 2),
}


def widen(q: np.ndarray, d: np.ndarray, m: np.ndarray | None):
    """The quants, scales and offsets of any kind (or 5-bit quants) as the same weights in
    q8_dm: ("q8_dm", q, d, m), w = d·q + m (m = 0 where the kind has none: d·q + 0 rounds as
    d·q)."""
    return "q8_dm", q.astype(np.int8), d, np.zeros_like(d) if m is None else m


def kind(data) -> str | None:
    """The kind of panel data (an array or ShapeDtypeStruct [J, K / 32, bytes]), None for fp32
    or bf16 panels."""
    for name, k in KINDS.items():
        if np.dtype(data.dtype) == k.dtype and data.shape[-1] == k.bytes:
            return name
    return None


def data_shape(kind_: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The data's shape for a [K, *O] weight."""
    n = int(np.prod(shape[1:]))
    return (-(-n // PANEL), shape[0] // BLOCK, KINDS[kind_].bytes)


def pack(kind_: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks of a [K, N] weight -> panel data: q[K, N] its quants (0..15, or int8), d and m
    [K, N] fp32 each weight's scale and offset (m for the kinds with offsets), constant over
    each group of 32 / groups rows and representable in the kind's scale dtype."""
    spec = KINDS[kind_]
    K, N = q.shape
    pad = -N % PANEL
    J, KB, G = (N + pad) // PANEL, K // BLOCK, spec.groups

    def header(a):  # [K, N] -> [J, KB, G · 64 scales] as bytes
        a = np.pad(a, ((0, 0), (0, pad)))[:: BLOCK // G]  # [KB · G, J · 64]
        narrow = a.astype(spec.scale)
        assert np.array_equal(narrow.astype(np.float32), a), f"scales must be {spec.scale}"
        return np.ascontiguousarray(narrow.reshape(KB, G, J, PANEL).transpose(2, 0, 1, 3)
                                    ).reshape(J, KB, -1).view(np.uint8)

    quants = np.pad(q, ((0, 0), (0, pad))).reshape(KB, BLOCK, J, PANEL).transpose(2, 0, 1, 3)
    quants = quants.astype(np.uint8)  # [J, KB, 32, 64] (int8 as their bytes)
    if spec.nibbles:
        nibbles = quants.reshape(J, KB, BLOCK, 4, 2, 8)  # [.., g, low/high, l]
        quants = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # [J, KB, 32, 4, 8]
    parts = [header(d)] + ([header(m)] if spec.offsets else []) + [quants.reshape(J, KB, -1)]
    return np.concatenate(parts, axis=-1).view(spec.dtype)


def _fields(data, xp):
    """(q, d, m or None) of panel data, each [J, KB, 32, 64] fp32, with numpy or jax.numpy
    (`xp`)."""
    J, KB, _ = data.shape
    spec = KINDS[kind(data)]
    raw = data.view(np.uint8) if xp is np else data.view(jnp.uint8)
    G = spec.groups
    size = G * PANEL * spec.scale.itemsize  # bytes of the scales (and of the offsets)

    def scales(a):  # [J, KB, G · 64 scales as bytes] -> [J, KB, 32, 64] fp32, one per row
        s = a.view(spec.scale).reshape(J, KB, G, 1, PANEL).astype(np.float32)
        return xp.broadcast_to(s, (J, KB, G, BLOCK // G, PANEL)).reshape(J, KB, BLOCK, PANEL)

    d = scales(raw[..., :size])
    m = scales(raw[..., size: 2 * size]) if spec.offsets else None
    body = raw[..., (2 if spec.offsets else 1) * size:]
    if not spec.nibbles:
        q = body.view(np.int8) if xp is np else body.view(jnp.int8)
        return q.reshape(J, KB, BLOCK, PANEL).astype(np.float32), d, m
    b = body.reshape(J, KB, BLOCK, 4, 1, 8)
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
    return pack("q8_0", q.reshape(K, -1), np.repeat(d, BLOCK, axis=0))
