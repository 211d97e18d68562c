"""Minimal numpy encoders for GGUF K-quant blocks (Q4_K, Q5_K, Q6_K), for tests.

``gguf.quants.quantize`` does not implement K-quants, so tests that write
K-quantized GGUF files use these. Quants are rounded to nearest; the block
scales are rounded *up* (to the next fp16 / integer) so that every weight lies
inside its sub-block's grid, which bounds the error by half a quantization
step. Block scales must fit fp16 (|w| up to ~5e5 for Q4_K, ~2e8 for Q6_K).
"""
import numpy as np

QK_K = 256


def _f16_up(x):
    """Round float32 ``x >= 0`` up to the nearest float16 (as float32)."""
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    assert np.isfinite(h).all(), "block scale overflows fp16"
    return h.astype(np.float32)


def _div(a, b):
    """a / b, with 0 where b == 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, np.float32), where=b != 0)


def _blocks(w):
    w = np.asarray(w, np.float32)
    assert w.ndim == 2 and w.shape[1] % QK_K == 0, w.shape
    return w.reshape(-1, QK_K)


def _q4_k_fields(w, top=15):
    """Per super-block d, dmin (fp16 values); per 32-sub-block sc, m (0..63); q (0..top: 15 for
    Q4_K, 31 for Q5_K)."""
    x = _blocks(w).reshape(-1, 8, 32)
    off = -np.minimum(x.min(-1), 0)  # offset -dmin*m <= 0 must reach down to the minimum
    dmin = _f16_up(off.max(-1) / 63)
    m = np.clip(np.ceil(_div(off, dmin[:, None])), 0, 63)
    s = np.maximum((x.max(-1) + dmin[:, None] * m) / top, 0)  # step needed to reach the max
    d = _f16_up(s.max(-1) / 63)
    sc = np.clip(np.ceil(_div(s, d[:, None])), 0, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(_div(x + (dmin[:, None] * m)[..., None], step)), 0, top)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8).reshape(-1, QK_K)


def _q6_k_fields(w):
    """Per super-block d (fp16 value); per 16-sub-block sc (int8); q (0..63, weight = d*sc*(q-32))."""
    x = _blocks(w).reshape(-1, 16, 16)
    v = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    sgn = np.where(v < 0, -1.0, 1.0).astype(np.float32)
    # The largest-magnitude weight maps to q-32 = -32; the other side must stay within +31.5.
    s = np.maximum(np.abs(v) / 32, (-sgn[..., None] * x).max(-1) / 31.5)
    d = _f16_up(s.max(-1) / 127)
    sc = -sgn * np.clip(np.ceil(_div(s, d[:, None])), 0, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round(_div(x, step)), -32, 31) + 32
    return d, sc.astype(np.int8), q.astype(np.uint8).reshape(-1, QK_K)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Encode float32 [rows, cols] (cols % 256 == 0) as Q4_K bytes [rows, cols // 256 * 144]."""
    return _k_blocks(w, *_q4_k_fields(w))


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """Encode float32 [rows, cols] (cols % 256 == 0) as Q5_K bytes [rows, cols // 256 * 176]:
    Q4_K's fields with 5-bit quants, the 5th bits in 32 bytes (bit s of byte i: quant 32s + i)."""
    d, dmin, sc, m, q = _q4_k_fields(w, top=31)
    high = (q >> 4).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]
    return _k_blocks(w, d, dmin, sc, m, q & 15, np.bitwise_or.reduce(high, axis=1))


def _k_blocks(w, d, dmin, sc, m, q, qh=None):
    """Q4_K (or, given the 5th bits qh [n, 32], Q5_K) bytes of the fields."""
    scales = np.concatenate([
        sc[:, :4] | (sc[:, 4:] >> 4) << 6,
        m[:, :4] | (m[:, 4:] >> 4) << 6,
        (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4,
    ], axis=1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)
    out = np.concatenate([
        d.astype(np.float16)[:, None].view(np.uint8),
        dmin.astype(np.float16)[:, None].view(np.uint8),
        scales, *([] if qh is None else [qh]), qs,
    ], axis=1)
    return out.reshape(len(w), -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Encode float32 [rows, cols] (cols % 256 == 0) as Q6_K bytes [rows, cols // 256 * 210]."""
    d, sc, q = _q6_k_fields(w)
    lo = (q & 15).reshape(-1, 2, 2, 64)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    ql = (lo[:, :, 0] | lo[:, :, 1] << 4).reshape(-1, 128)
    qh = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16)[:, None].view(np.uint8)], axis=1)
    return out.reshape(len(w), -1)


if __name__ == "__main__":
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 512)).astype(np.float32)
    w[6] = 0
    w[7] = rng.uniform(0.5, 1.5, 512)
    wide = w * np.float32(10.0) ** np.arange(-3, 5, dtype=np.float32)[:, None]  # rows 1e-3 .. 1e4
    for name, x in [("std0.3", w), ("wide", wide)]:
        for qt, enc, fields, sub in [(T.Q4_K, quantize_q4_k, _q4_k_fields, 32),
                                     (T.Q5_K, quantize_q5_k, lambda x: _q4_k_fields(x, 31), 32),
                                     (T.Q6_K, quantize_q6_k, _q6_k_fields, 16)]:
            y = dequantize(enc(x), qt)
            assert y.shape == x.shape and np.isfinite(y).all()
            err = np.abs(y - x).reshape(-1, sub)
            xs = x.reshape(-1, sub)
            rng_ = xs.max(-1) - xs.min(-1)
            assert (err[rng_ == 0] == 0).all()
            f = fields(x)
            d, sc, q = f[0], f[2 if qt != T.Q6_K else 1], f[-1]
            step = np.abs(d[:, None] * sc.astype(np.float32)).reshape(-1, 1)
            slack = 1e-6 * np.abs(xs).max(-1, keepdims=True)
            assert (err <= 0.5 * step * (1 + 1e-5) + slack).all(), f"{name} {qt.name}: error above half a step"
            rel = (err.max(-1)[rng_ > 0] / rng_[rng_ > 0]).max()
            print(f"{name:7s} {qt.name}: max |err| / sub-block range = {rel:.4f}, q values used = {len(np.unique(q))}")
            if name == "std0.3":
                assert len(np.unique(q)) == {T.Q4_K: 16, T.Q5_K: 32, T.Q6_K: 64}[qt]
                assert np.abs(sc.astype(int)).max() == (127 if qt == T.Q6_K else 63)
                assert qt == T.Q6_K or f[3].max() == 63
    print("ok")
