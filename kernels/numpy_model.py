"""NumPy model of the NKI rejection kernels (`jaxspec.kernels.nki_rejection`), for CPU tests.

Each function here mirrors the kernel step of the same name: the same layout (the wrapper's
own `layout`, run with NumPy), the same free-axis tiles (`nki_rejection.tiles`, TILE fp32),
the same fp32 operations in the same order (one-hot masked sums for the gathers, sequential
scans within a tile from 0, the carry added after the scan, the same comparisons and the
same column arithmetic). Rows are vectorised: every kernel operation is per partition, so
how rows are grouped onto partitions and programs does not change a value.

np.cumsum on fp32 accumulates sequentially in fp32, as tensor_tensor_scan is documented to;
masked sums have one nonzero term, so their summation order does not matter.
"""

from __future__ import annotations

import numpy as np

from .nki_rejection import TILE, greedy_layout, layout, tiles

F32 = np.float32


def _zeros(rows: int) -> np.ndarray:
    return np.zeros(rows, F32)


def _scan(w: np.ndarray) -> np.ndarray:
    """Inclusive fp32 cumulative sum along the tile, sequential from 0 (tensor_tensor_scan)."""
    return np.cumsum(w, axis=-1, dtype=F32)


def _residual(pt: np.ndarray, qt: np.ndarray, flag: np.ndarray) -> np.ndarray:
    """max(p - q·flag, 0) on one tile [R, size]; flag [R] is 1 or 0."""
    return np.maximum(pt - qt * flag[:, None], F32(0))


def pass1(p2, q2, x):
    """p(x), q(x), tot_r (Σ tiles of max(p - q, 0)), tot_p (Σ tiles of p); each [R]."""
    rows, vocab = p2.shape
    iota, one = np.arange(TILE, dtype=F32), np.ones(rows, F32)
    px, qx, tot_r, tot_p = (_zeros(rows) for _ in range(4))
    for f0, size in tiles(vocab):
        pt, qt = p2[:, f0:f0 + size], q2[:, f0:f0 + size]
        mask = (iota[:size] == (x - F32(f0))[:, None]).astype(F32)
        px = px + np.sum(mask * pt, -1, dtype=F32)  # one nonzero term: exact
        qx = qx + np.sum(mask * qt, -1, dtype=F32)
        tot_r = tot_r + _scan(_residual(pt, qt, one))[:, -1]
        tot_p = tot_p + _scan(pt)[:, -1]
    return px, qx, tot_r, tot_p


def draw_params(tot_r, tot_p, u_draw):
    """(flag, threshold) [R]: flag = tot_r > 0, threshold = u_draw · total of the weights."""
    flag = (tot_r > 0).astype(F32)
    not_flag = F32(1) - flag
    return flag, u_draw * (tot_r * flag + tot_p * not_flag)


def pass2(p2, q2, flag, threshold):
    """Draw per row [R]: min(count(cdf <= threshold), last index of a positive weight)."""
    rows, vocab = p2.shape
    iota1 = np.arange(1, TILE + 1, dtype=F32)
    carry, below, last1 = _zeros(rows), _zeros(rows), _zeros(rows)
    for f0, size in tiles(vocab):
        w = _residual(p2[:, f0:f0 + size], q2[:, f0:f0 + size], flag)
        local = _scan(w)
        cdf = local + carry[:, None]
        below = below + np.sum((cdf <= threshold[:, None]).astype(F32), -1, dtype=F32)
        m = np.max((w > 0).astype(F32) * iota1[:size], -1)  # local index + 1, 0 if none
        last1 = np.maximum(last1, (m + F32(f0)) * (m > 0).astype(F32))
        carry = carry + local[:, -1]
    last = np.maximum(last1 - F32(1), F32(0))
    return np.minimum(below, last)


def argmax_pass(logits2):
    """First index of each row's maximum [R]: per tile max, first index of it, merged across
    tiles only when strictly greater."""
    rows, vocab = logits2.shape
    iota_shift = np.arange(TILE, 2 * TILE, dtype=F32)
    best = index = None
    for f0, size in tiles(vocab):
        t = logits2[:, f0:f0 + size]
        m = np.max(t, -1)
        key = (t == m[:, None]).astype(F32) * F32(-TILE) + iota_shift[:size]
        i = np.min(key, -1) + F32(f0)
        if f0 == 0:
            best, index = m, i
            continue
        greater = (m > best).astype(F32)
        index = index + (i - index) * greater
        best = np.maximum(best, m)
    return index


def leading(accept):
    """[B] number of leading accepts of accept [B, k] (1.0/0.0; column k-1 is always 0)."""
    k = accept.shape[1]
    return np.min(accept * F32(k) + np.arange(k, dtype=F32), -1)


def emit(n, draws, x):
    """[B, k] tokens: x before column n, draws[:, n] from n on."""
    iota = np.arange(x.shape[1], dtype=F32)
    last = np.sum((iota == n[:, None]).astype(F32) * draws, -1, dtype=F32)
    before = (iota < n[:, None]).astype(F32)
    return (x - last[:, None]) * before + last[:, None]


def sampled(draft_tokens, q, p, uniforms):
    """The kernel's (n [B], tokens [B, γ+1]) int32 for the rejection contract's inputs."""
    p2, q2, u2, x = layout(np.asarray(draft_tokens), np.asarray(q), np.asarray(p),
                           np.asarray(uniforms), xp=np)
    batch, k = x.shape
    px, qx, tot_r, tot_p = pass1(p2, q2, x.reshape(-1))
    accept = ((u2[:, 0] * qx) < px).astype(F32)
    flag, threshold = draw_params(tot_r, tot_p, u2[:, 1])
    draws = pass2(p2, q2, flag, threshold)
    n = leading(accept.reshape(batch, k))
    return n.astype(np.int32), emit(n, draws.reshape(batch, k), x).astype(np.int32)


def greedy_from_logits(draft_tokens, logits):
    """The greedy kernel's (n [B], argmaxes [B, γ+1]) int32."""
    logits2, x = greedy_layout(np.asarray(draft_tokens), np.asarray(logits), xp=np)
    batch, k = x.shape
    index = argmax_pass(logits2)
    accept = (x.reshape(-1) == index).astype(F32)
    return leading(accept.reshape(batch, k)).astype(np.int32), \
        index.reshape(batch, k).astype(np.int32)


def sample(weights, u):
    """The kernel's inverse-CDF draw alone: one index per row of weights [R, V] with u [R]
    (jaxspec.decode.sampling.sample's contract), through pass 1 and pass 2 with q = 0."""
    w = np.asarray(weights, F32)
    zeros = np.zeros_like(w)
    _, _, tot_r, tot_p = pass1(w, zeros, np.full(w.shape[0], -1, F32))
    flag, threshold = draw_params(tot_r, tot_p, np.asarray(u, F32))
    return pass2(w, zeros, flag, threshold).astype(np.int32)
