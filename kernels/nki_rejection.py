"""Speculative rejection sampling as one NKI kernel for Trainium2, and its JAX wrapper.

Status: written for NKI 0.6 (`import nki`, Neuron 2.32), tested through its NumPy model on
CPU, not yet run on Trainium hardware. The model (`jaxspec.kernels.numpy_model`: same tiles,
same order of operations) is checked against the jax.numpy reference; the kernel bodies
themselves run on CPU only through tests/kernels/fake_nki.py, a NumPy stand-in written from
the NKI documentation. `nki.simulate` needs the real nki package (Neuron SDK), which cannot be
installed here: tests/kernels/test_nki_simulate.py runs wherever it is. Assumed, unconfirmed:
Vector Engine fp32 arithmetic rounds like IEEE fp32 (as NumPy), the scan accumulates in fp32,
comparison operators write 1.0/0.0, tensor_reduce accepts nl.minimum, program_id is a Python
int at trace time, DMA through private HBM orders a write before the read of the same rows.

The contract is `jaxspec.decode.rejection.rejection`; the kernel computes it in fp32 for
vocabularies up to 2^24 (Qwen's 152,064 included).

Layout (`layout`, done by the wrapper in JAX): row r = b·(γ+1) + i, one per batch row b and
verified position i, goes on SBUF partition r (at most 128 per group of batch rows); the
vocabulary is the free axis, walked in tiles of TILE fp32. q gets a zero row at i = γ, so the
residual there is p_γ (the bonus distribution), and the draft token there is -1 (matches no
index). Every row draws its own candidate token from its residual with the row's u_γ; the
first rejected position n then picks its row's candidate, so no row selection happens on the
vocabulary axis.

Order of operations per group of rows (the NumPy model repeats it step by step):
  pass 1, per tile: one-hot mask (iota == x) -> p(x), q(x) by masked sums (one nonzero
    term: exact); residual r = max(p - q·1, 0); tile scans (tensor_tensor_scan, initial 0)
    of r and of p, whose last elements are added to the running totals tot_r, tot_p.
  accept = u_i·q(x) < p(x); flag = tot_r > 0 (else the zero-residual fallback to p);
    total = flag·tot_r + (1-flag)·tot_p; threshold = u_γ·total.
  pass 2, per tile: w = max(p - q·flag, 0) (r or p, bit for bit as in pass 1); local scan;
    cdf = local + carry; below += count(cdf <= threshold); last positive index via
    max((w > 0)·(index + 1)); carry += local[-1]. Because the carries are the pass-1 sums,
    cdf[-1] == total exactly and the cdf is monotone, as the reference's single cumsum is.
    draw = min(below, last positive).
  epilogue: accept and draw go to HBM scratch and come back as [batch rows, γ+1] (positions
    on the free axis); n = min_j(accept_j·(γ+1) + j) (the bonus column never accepts), the
    replacement is the draw at n (one-hot sum), tokens = drafts before n, the draw from n on.
The greedy kernel keeps the same layout: per tile max, then the first index of the max
(min over iota + TILE·(1 - is_max)), merged across tiles when strictly greater (the first
maximum wins ties); n counts leading drafts equal to the argmaxes.

Batch rows are split evenly over the programs of the launch grid kernel[lnc] (lnc from
NEURON_LOGICAL_NC_CONFIG, 2 by default on Trn2), then grouped by at most 128 // (γ+1).

Where fp32 summation order matters (the cumulative sum), the kernel's two-level order (scan
within a tile, then add the carry) differs from XLA's cumsum, so a draw can differ from the
reference only when u_γ·total lies within rounding of a CDF boundary (measured below 2e-6 of
the total at V = 152,064); n and everything else are exact.

Not tuned: each pass reads p and q from HBM, and the two passes issue 18 Vector Engine
full-tile instructions per tile: 9 in pass 1 (one-hot gathers, residual, two scans),
9 in pass 2 (residual, scan, carry, compares, reductions).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from jaxspec.decode.rejection import Rejection

try:  # the real package comes with the Neuron SDK; PyPI's `nki` is an empty placeholder
    import nki
    import nki.isa as nisa
    import nki.language as nl

    nki.jit  # noqa: B018 (raises AttributeError on the placeholder)
except (ImportError, AttributeError):
    nki = nisa = nl = None

AVAILABLE = nki is not None
TILE = 2048  # free-axis tile: fp32 elements per partition per instruction (8 KiB of SBUF)
PMAX = 128  # partitions


def tiles(vocab: int) -> list[tuple[int, int]]:
    """[(start, size)] of the free-axis tiles over a vocabulary; the last may be partial."""
    return [(f0, min(TILE, vocab - f0)) for f0 in range(0, vocab, TILE)]


def logical_cores() -> int:
    """The runtime's logical NeuronCore count (launch grid of the kernel); Trn2 default 2."""
    return int(os.environ.get("NEURON_LOGICAL_NC_CONFIG", "2"))


# --- layout (JAX and NumPy alike: the wrapper, the NumPy model and nki.simulate use it) -----

def layout(draft_tokens, q, p, uniforms, xp=jnp):
    """The sampled kernel's inputs from the contract's arguments.

    Returns p2 [R, V] and q2 [R, V] fp32 with R = B(γ+1) (q2 has a zero row at each i = γ),
    u2 [R, 2] = (u_accept, u_draw) (u_accept = uniforms[b, i], 0 at i = γ; u_draw =
    uniforms[b, γ]) and x [B, γ+1] fp32: the draft tokens, then -1.
    """
    batch, gamma = draft_tokens.shape
    vocab, f32 = p.shape[-1], xp.float32
    rows = batch * (gamma + 1)
    p2 = p.astype(f32).reshape(rows, vocab)
    q2 = xp.concatenate([q.astype(f32), xp.zeros((batch, 1, vocab), f32)], 1).reshape(rows, vocab)
    u = uniforms.astype(f32)
    u_accept = xp.concatenate([u[:, :gamma], xp.zeros((batch, 1), f32)], 1)  # [B, γ+1]
    u_draw = xp.broadcast_to(u[:, gamma:], (batch, gamma + 1))  # [B, γ+1]
    u2 = xp.stack([u_accept, u_draw], -1).reshape(rows, 2)
    return p2, q2, u2, _x(draft_tokens, xp)


def greedy_layout(draft_tokens, logits, xp=jnp):
    """The greedy kernel's inputs: logits2 [B(γ+1), V] fp32 and x [B, γ+1] (drafts, then -1)."""
    batch, k, vocab = logits.shape
    return logits.astype(xp.float32).reshape(batch * k, vocab), _x(draft_tokens, xp)


def _x(draft_tokens, xp):
    """[B, γ+1] fp32: the draft tokens (exact below 2^24), then -1 for the bonus position."""
    batch = draft_tokens.shape[0]
    return xp.concatenate([draft_tokens.astype(xp.float32),
                           xp.full((batch, 1), -1, xp.float32)], 1)


# --- kernel building blocks (run at trace time; they need nki) ------------------------------

def _sbuf(shape, dtype=None):
    return nl.ndarray(shape, dtype=dtype or nl.float32, buffer=nl.sbuf)


def _col(rows: int, value: float = 0.0):
    """[rows, 1] fp32 filled with value."""
    t = _sbuf((rows, 1))
    nisa.memset(dst=t, value=value)
    return t


def _iota(rows: int, start: int, size: int = TILE):
    """[rows, size] fp32, every row start, start + 1, ..."""
    t = _sbuf((rows, size))
    nisa.iota(dst=t, pattern=[[1, size]], offset=start, channel_multiplier=0)
    return t


def _filled(rows: int, value: float):
    t = _sbuf((rows, TILE))
    nisa.memset(dst=t, value=value)
    return t


def _load_tile(src, r0: int, rows: int, f0: int, size: int):
    """src[r0:r0+rows, f0:f0+size] into a [rows, TILE] SBUF tile (the tail is unused)."""
    t = _sbuf((rows, TILE))
    nisa.dma_copy(dst=t[0:rows, 0:size], src=src[r0:r0 + rows, f0:f0 + size])
    return t


def _binary(a, b, op, rows: int):
    """[rows, 1] a <op> b of two columns."""
    t = _sbuf((rows, 1))
    nisa.tensor_tensor(dst=t, data1=a, data2=b, op=op)
    return t


def _add_into(acc, x):
    nisa.tensor_tensor(dst=acc, data1=acc, data2=x, op=nl.add)


def _reduce(t, op, rows: int, size: int):
    """[rows, 1] reduction of t[:, :size] along the free axis."""
    out = _sbuf((rows, 1))
    nisa.tensor_reduce(dst=out, op=op, data=t[0:rows, 0:size], axis=1)
    return out


def _scan(w, ones, rows: int, size: int):
    """Inclusive cumulative sum of each row of w[:, :size], sequential from 0 (fp32)."""
    out = _sbuf((rows, TILE))
    nisa.tensor_tensor_scan(dst=out[0:rows, 0:size], data0=ones[0:rows, 0:size],
                            data1=w[0:rows, 0:size], initial=0.0, op0=nl.multiply, op1=nl.add)
    return out


def _residual(pt, qt, flag, rows: int, size: int):
    """max(p - q·flag, 0) on one tile: the residual (flag 1) or p itself (flag 0), exactly."""
    w = _sbuf((rows, TILE))
    nisa.scalar_tensor_tensor(dst=w[0:rows, 0:size], data=qt[0:rows, 0:size], op0=nl.multiply,
                              operand0=flag, op1=nl.subtract, operand1=pt[0:rows, 0:size],
                              reverse1=True)
    nisa.tensor_scalar(dst=w[0:rows, 0:size], data=w[0:rows, 0:size], op0=nl.maximum,
                       operand0=0.0)
    return w


def _masked_sums_into(sums, tiles_, iota, x, f0: int, rows: int, size: int):
    """sums[j] += sum(tiles_[j] where index == x): the gather of p(x), q(x) on one tile."""
    x_local = _sbuf((rows, 1))
    nisa.tensor_scalar(dst=x_local, data=x, op0=nl.subtract, operand0=float(f0))
    mask = _sbuf((rows, TILE))
    nisa.tensor_scalar(dst=mask[0:rows, 0:size], data=iota[0:rows, 0:size], op0=nl.equal,
                       operand0=x_local)
    for acc, t in zip(sums, tiles_):
        prod = _sbuf((rows, TILE))
        nisa.tensor_tensor(dst=prod[0:rows, 0:size], data1=mask[0:rows, 0:size],
                           data2=t[0:rows, 0:size], op=nl.multiply)
        _add_into(acc, _reduce(prod, nl.add, rows, size))


def _scan_end_into(total, w, ones, rows: int, size: int):
    """total += the last element of the tile's scan of w (the tile sum, in scan order)."""
    s = _scan(w, ones, rows, size)
    _add_into(total, s[0:rows, size - 1:size])


# --- the per-row phases ---------------------------------------------------------------------

def _pass1(p, q, r0: int, rows: int, x, vocab: int):
    """p(x), q(x), tot_r = Σ tiles of max(p - q, 0), tot_p = Σ tiles of p; each [rows, 1]."""
    iota, ones, one = _iota(rows, 0), _filled(rows, 1.0), _col(rows, 1.0)
    px, qx, tot_r, tot_p = _col(rows), _col(rows), _col(rows), _col(rows)
    for f0, size in tiles(vocab):
        pt, qt = _load_tile(p, r0, rows, f0, size), _load_tile(q, r0, rows, f0, size)
        _masked_sums_into((px, qx), (pt, qt), iota, x, f0, rows, size)
        _scan_end_into(tot_r, _residual(pt, qt, one, rows, size), ones, rows, size)
        _scan_end_into(tot_p, pt, ones, rows, size)
    return px, qx, tot_r, tot_p


def _draw_params(tot_r, tot_p, u_draw, rows: int):
    """flag = tot_r > 0; threshold = u_draw · (flag·tot_r + (1 - flag)·tot_p); [rows, 1]."""
    flag, not_flag = _sbuf((rows, 1)), _sbuf((rows, 1))
    nisa.tensor_scalar(dst=flag, data=tot_r, op0=nl.greater, operand0=0.0)
    nisa.tensor_scalar(dst=not_flag, data=flag, op0=nl.subtract, operand0=1.0, reverse0=True)
    total = _binary(_binary(tot_r, flag, nl.multiply, rows),
                    _binary(tot_p, not_flag, nl.multiply, rows), nl.add, rows)
    return flag, _binary(u_draw, total, nl.multiply, rows)


def _count_below_into(below, local, carry, threshold, rows: int, size: int):
    """below += count(local + carry <= threshold) on one tile."""
    cdf = _sbuf((rows, TILE))
    nisa.tensor_scalar(dst=cdf[0:rows, 0:size], data=local[0:rows, 0:size], op0=nl.add,
                       operand0=carry)
    nisa.tensor_scalar(dst=cdf[0:rows, 0:size], data=cdf[0:rows, 0:size], op0=nl.less_equal,
                       operand0=threshold)
    _add_into(below, _reduce(cdf, nl.add, rows, size))


def _last_positive_into(last1, w, iota1, f0: int, rows: int, size: int):
    """last1 = max(last1, 1 + the tile's last index with w > 0 (global), or 0 if none)."""
    pos = _sbuf((rows, TILE))
    nisa.tensor_scalar(dst=pos[0:rows, 0:size], data=w[0:rows, 0:size], op0=nl.greater,
                       operand0=0.0)
    nisa.tensor_tensor(dst=pos[0:rows, 0:size], data1=pos[0:rows, 0:size],
                       data2=iota1[0:rows, 0:size], op=nl.multiply)
    m = _reduce(pos, nl.maximum, rows, size)  # local index + 1, 0 if no positive weight
    found = _sbuf((rows, 1))
    nisa.tensor_scalar(dst=found, data=m, op0=nl.greater, operand0=0.0)
    nisa.tensor_scalar(dst=m, data=m, op0=nl.add, operand0=float(f0))
    nisa.tensor_tensor(dst=last1, data1=last1, data2=_binary(m, found, nl.multiply, rows),
                       op=nl.maximum)


def _pass2(p, q, r0: int, rows: int, flag, threshold, vocab: int):
    """Inverse-CDF draw per row: min(count(cdf <= threshold), last positive index); [rows, 1]."""
    iota1, ones = _iota(rows, 1), _filled(rows, 1.0)
    carry, below, last1 = _col(rows), _col(rows), _col(rows)
    for f0, size in tiles(vocab):
        pt, qt = _load_tile(p, r0, rows, f0, size), _load_tile(q, r0, rows, f0, size)
        w = _residual(pt, qt, flag, rows, size)
        local = _scan(w, ones, rows, size)
        _count_below_into(below, local, carry, threshold, rows, size)
        _last_positive_into(last1, w, iota1, f0, rows, size)
        _add_into(carry, local[0:rows, size - 1:size])
    last = _sbuf((rows, 1))
    nisa.tensor_scalar(dst=last, data=last1, op0=nl.subtract, operand0=1.0, op1=nl.maximum,
                       operand1=0.0)
    return _binary(below, last, nl.minimum, rows)


def _argmax_pass(logits, r0: int, rows: int, vocab: int):
    """First index of the row maximum, [rows, 1]: per tile max, then min over
    iota + TILE·(1 - is_max); a later tile replaces the running one only if strictly greater."""
    iota_shift = _iota(rows, TILE)  # iota + TILE
    best, index = _sbuf((rows, 1)), _sbuf((rows, 1))
    for f0, size in tiles(vocab):
        t = _load_tile(logits, r0, rows, f0, size)
        m = _reduce(t, nl.maximum, rows, size)
        key = _sbuf((rows, TILE))
        nisa.tensor_scalar(dst=key[0:rows, 0:size], data=t[0:rows, 0:size], op0=nl.equal,
                           operand0=m)
        nisa.scalar_tensor_tensor(dst=key[0:rows, 0:size], data=key[0:rows, 0:size],
                                  op0=nl.multiply, operand0=-float(TILE), op1=nl.add,
                                  operand1=iota_shift[0:rows, 0:size])
        i = _reduce(key, nl.minimum, rows, size)
        nisa.tensor_scalar(dst=i, data=i, op0=nl.add, operand0=float(f0))
        if f0 == 0:
            nisa.tensor_copy(dst=best, src=m)
            nisa.tensor_copy(dst=index, src=i)
            continue
        greater = _binary(m, best, nl.greater, rows)
        step = _binary(_binary(i, index, nl.subtract, rows), greater, nl.multiply, rows)
        _add_into(index, step)  # index + greater·(i - index)
        nisa.tensor_tensor(dst=best, data1=best, data2=m, op=nl.maximum)
    return index


# --- the epilogue: positions move from partitions to the free axis --------------------------

def _to_batch_rows(col, scratch, b0: int, bg: int, k: int):
    """A [bg·k, 1] column (row r = b·k + i) as [bg, k], through HBM scratch [B·k, 1]."""
    nisa.dma_copy(dst=scratch[b0 * k:(b0 + bg) * k, 0:1], src=col)
    out = _sbuf((bg, k))
    nisa.dma_copy(dst=out, src=scratch.reshape((scratch.shape[0] // k, k))[b0:b0 + bg, 0:k])
    return out


def _leading(accept, bg: int, k: int):
    """n = min_j(accept_j·k + j): the number of leading accepts (column k-1 never accepts)."""
    key = _sbuf((bg, k))
    nisa.scalar_tensor_tensor(dst=key, data=accept, op0=nl.multiply, operand0=float(k),
                              op1=nl.add, operand1=_iota(bg, 0, k))
    return _reduce(key, nl.minimum, bg, k)


def _emit(n, draws, x, bg: int, k: int):
    """[bg, k] tokens: x before column n, draws[n] from n on (as the reference's _emit)."""
    iota = _iota(bg, 0, k)
    pick = _sbuf((bg, k))
    nisa.tensor_scalar(dst=pick, data=iota, op0=nl.equal, operand0=n)
    nisa.tensor_tensor(dst=pick, data1=pick, data2=draws, op=nl.multiply)
    last = _reduce(pick, nl.add, bg, k)  # draws[n] (one nonzero term: exact)
    before = _sbuf((bg, k))
    nisa.tensor_scalar(dst=before, data=iota, op0=nl.less, operand0=n)
    tokens = _sbuf((bg, k))
    nisa.scalar_tensor_tensor(dst=tokens, data=x, op0=nl.subtract, operand0=last,
                              op1=nl.multiply, operand1=before)
    nisa.tensor_scalar(dst=tokens, data=tokens, op0=nl.add, operand0=last)
    return tokens


def _store_int(dst, src, shape):
    t = _sbuf(shape, nl.int32)
    nisa.tensor_copy(dst=t, src=src)  # exact integers in fp32
    nisa.dma_copy(dst=dst, src=t)


def _outputs(batch: int, k: int):
    """n [B, 1] and tokens [B, k] int32 (returned), accept/value scratch [B·k, 1] fp32."""
    return (nl.ndarray((batch, 1), dtype=nl.int32, buffer=nl.shared_hbm),
            nl.ndarray((batch, k), dtype=nl.int32, buffer=nl.shared_hbm),
            nl.ndarray((batch * k, 1), dtype=nl.float32, buffer=nl.private_hbm),
            nl.ndarray((batch * k, 1), dtype=nl.float32, buffer=nl.private_hbm))


def _finish(accept, values, x, b0: int, bg: int, k: int, outs, greedy: bool):
    """Leading count and tokens of batch rows b0..b0+bg, written to the outputs."""
    n_out, tokens_out, accept_hbm, values_hbm = outs
    accept_rows = _to_batch_rows(accept, accept_hbm, b0, bg, k)
    values_rows = _to_batch_rows(values, values_hbm, b0, bg, k)
    n = _leading(accept_rows, bg, k)
    tokens = values_rows if greedy else _emit(n, values_rows, _load_x(x, b0, bg, k), bg, k)
    _store_int(n_out[b0:b0 + bg, 0:1], n, (bg, 1))
    _store_int(tokens_out[b0:b0 + bg, 0:k], tokens, (bg, k))


def _load_x(x, b0: int, bg: int, k: int):
    t = _sbuf((bg, k))
    nisa.dma_copy(dst=t, src=x[b0:b0 + bg, 0:k])
    return t


def _x_column(x, b0: int, bg: int, k: int):
    """x[b0:b0+bg] as a [bg·k, 1] column (row r = b·k + i on partitions)."""
    t = _sbuf((bg * k, 1))
    nisa.dma_copy(dst=t, src=x.reshape((x.shape[0] * k, 1))[b0 * k:(b0 + bg) * k, 0:1])
    return t


def _batch_groups(batch: int, k: int) -> list[tuple[int, int]]:
    """(b0, bg) groups of this program's batch rows with bg·k <= PMAX partitions.

    Batch rows are split evenly over the launch grid's programs (kernel[lnc]); a program
    with no rows does nothing.
    """
    n_prog, pid = (nl.num_programs(axes=0), nl.program_id(axis=0)) \
        if nl.program_ndim() else (1, 0)
    per = -(-batch // n_prog)
    lo, hi = pid * per, min(batch, (pid + 1) * per)
    step = PMAX // k
    return [(b0, min(step, hi - b0)) for b0 in range(lo, hi, step)]


# --- the kernels ----------------------------------------------------------------------------

def _sampled_body(p, q, u, x):
    """(p [R, V], q [R, V], u [R, 2], x [B, k]) -> (n [B, 1], tokens [B, k]) int32, R = B·k."""
    batch, k = x.shape
    vocab = p.shape[1]
    outs = _outputs(batch, k)
    for b0, bg in _batch_groups(batch, k):
        r0, rows = b0 * k, bg * k
        us = _sbuf((rows, 2))
        nisa.dma_copy(dst=us, src=u[r0:r0 + rows, 0:2])
        u_accept, u_draw = us[0:rows, 0:1], us[0:rows, 1:2]
        px, qx, tot_r, tot_p = _pass1(p, q, r0, rows, _x_column(x, b0, bg, k), vocab)
        accept = _binary(_binary(u_accept, qx, nl.multiply, rows), px, nl.less, rows)
        flag, threshold = _draw_params(tot_r, tot_p, u_draw, rows)
        draws = _pass2(p, q, r0, rows, flag, threshold, vocab)
        _finish(accept, draws, x, b0, bg, k, outs, greedy=False)
    return outs[0], outs[1]


def _greedy_body(logits, x):
    """(logits [R, V], x [B, k]) -> (n [B, 1], tokens [B, k]) int32: tokens are the argmaxes."""
    batch, k = x.shape
    outs = _outputs(batch, k)
    for b0, bg in _batch_groups(batch, k):
        r0, rows = b0 * k, bg * k
        index = _argmax_pass(logits, r0, rows, logits.shape[1])
        accept = _binary(_x_column(x, b0, bg, k), index, nl.equal, rows)
        _finish(accept, index, x, b0, bg, k, outs, greedy=True)
    return outs[0], outs[1]


sampled_kernel = nki.jit(_sampled_body) if AVAILABLE else None
greedy_kernel = nki.jit(_greedy_body) if AVAILABLE else None


# --- JAX wrappers ---------------------------------------------------------------------------

def sampled(draft_tokens, q, p, uniforms):
    """The rejection contract (`jaxspec.decode.rejection.rejection`) through the NKI kernel."""
    if not AVAILABLE:
        raise RuntimeError("the NKI kernel needs the real nki package (Neuron SDK)")
    n, tokens = sampled_kernel[logical_cores()](*layout(draft_tokens, q, p, uniforms))
    return n[:, 0], tokens


def greedy_from_logits(draft_tokens, logits):
    """Greedy acceptance from the target's logits [B, γ+1, V]: (n [B], argmaxes [B, γ+1]),
    equal to rejection_greedy(draft_tokens, first_argmax(logits)), with the argmax in NKI."""
    if not AVAILABLE:
        raise RuntimeError("the NKI kernel needs the real nki package (Neuron SDK)")
    n, tokens = greedy_kernel[logical_cores()](*greedy_layout(draft_tokens, logits))
    return n[:, 0], tokens


NKI = Rejection("nki", sampled=sampled, greedy=greedy_from_logits) if AVAILABLE else None
