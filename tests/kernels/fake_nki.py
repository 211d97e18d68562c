"""A NumPy stand-in for the part of the NKI 0.6 API that kernels/nki_rejection.py uses.

Not the real nki and not its simulator: each operation does what the NKI 0.6 documentation
says it does, in fp32, so the kernel bodies can run on CPU here (their plumbing: offsets,
partition groups, the launch grid, the HBM round trip, the epilogue). It also checks the
rules the kernel relies on: at most 128 partitions in SBUF, compute only on SBUF tiles,
operands of shape [partitions, 1] or scalars, equal shapes for DMA and elementwise ops.
Fresh memory is filled with NaN (ints: INT_GARBAGE), as nki.simulate does, and converting
a non-integral value to int32 fails, so a read of memory never written shows up.

    outputs = launch(kernel_body, lnc, *numpy_arrays)   # with nl, nisa patched in
"""

from __future__ import annotations

import types

import numpy as np

F32 = np.float32
INT_GARBAGE = -(2**31)
SBUF, PSUM, SHARED_HBM, PRIVATE_HBM = "sbuf", "psum", "shared_hbm", "private_hbm"


class Tensor:
    """A view of a NumPy array that remembers its memory (buffer)."""

    def __init__(self, array: np.ndarray, buffer: str):
        if buffer in (SBUF, PSUM):
            assert array.ndim >= 1 and array.shape[0] <= 128, f"{array.shape}: > 128 partitions"
        self.array, self.buffer = array, buffer

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    def __getitem__(self, index):
        view = self.array[index]
        assert np.shares_memory(view, self.array), "not a view"
        return Tensor(view, self.buffer)

    def reshape(self, shape):
        view = self.array.reshape(shape)
        assert np.shares_memory(view, self.array), "reshape copies"
        return Tensor(view, self.buffer)


class _Launch:
    n_programs, program, grid = 1, 0, False
    shared: list = []
    count = 0


def launch(body, lnc: int, *arrays):
    """Run body once per program of a kernel[lnc] grid; shared_hbm outputs are shared."""
    _Launch.shared, _Launch.grid, _Launch.n_programs = [], True, lnc
    inputs = [Tensor(np.ascontiguousarray(a), SHARED_HBM) for a in arrays]
    try:
        for program in range(lnc):
            _Launch.program, _Launch.count = program, 0
            outs = body(*inputs)
    finally:
        _Launch.grid = False
    return [o.array.copy() for o in outs]


def _ndarray(shape, dtype=F32, buffer=SBUF):
    if buffer == SHARED_HBM and _Launch.count < len(_Launch.shared):  # another program's
        t = _Launch.shared[_Launch.count]
        assert t.shape == tuple(shape) and t.dtype == dtype
    else:
        fill = np.nan if np.issubdtype(dtype, np.floating) else INT_GARBAGE
        t = Tensor(np.full(shape, fill, dtype), buffer)
        if buffer == SHARED_HBM:
            _Launch.shared.append(t)
    if buffer == SHARED_HBM:
        _Launch.count += 1
    return t


def _on_chip(*tensors):
    for t in tensors:
        if isinstance(t, Tensor):
            assert t.buffer in (SBUF, PSUM), f"compute on {t.buffer}"


def _value(x, data: Tensor):
    """A scalar, or a [partitions, 1] operand broadcast along the free axis."""
    if isinstance(x, Tensor):
        _on_chip(x)
        assert x.shape == (data.shape[0], 1), f"operand {x.shape} for data {data.shape}"
        return x.array.astype(F32)
    return F32(x)


def _apply(op, a, b, reverse=False):
    a, b = (b, a) if reverse else (a, b)
    return np.asarray(op(a, b)).astype(F32)


def _write(dst: Tensor, values):
    values = np.asarray(values)
    assert dst.shape == values.shape, f"dst {dst.shape} for values {values.shape}"
    if np.issubdtype(dst.dtype, np.integer):
        assert np.all(values == np.round(values)), f"non-integral to {dst.dtype}: {values}"
    dst.array[...] = values.astype(dst.dtype)


def memset(dst, value):
    _on_chip(dst)
    dst.array[...] = value


def iota(dst, pattern, offset=0, channel_multiplier=0):
    _on_chip(dst)
    ((step, count),) = pattern
    assert dst.shape[1:] == (count,)
    free = offset + step * np.arange(count)
    part = channel_multiplier * np.arange(dst.shape[0])[:, None]
    _write(dst, (free[None] + part).astype(F32))


def dma_copy(dst, src):
    assert dst.shape == src.shape, f"dma {src.shape} -> {dst.shape}"
    dst.array[...] = src.array


def tensor_copy(dst, src):
    _on_chip(dst, src)
    _write(dst, src.array.astype(F32))


def tensor_tensor(dst, data1, data2, op):
    _on_chip(dst, data1, data2)
    assert data1.shape == data2.shape
    _write(dst, _apply(op, data1.array.astype(F32), data2.array.astype(F32)))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None,
                  reverse1=False):
    _on_chip(dst, data)
    out = _apply(op0, data.array.astype(F32), _value(operand0, data), reverse0)
    if op1 is not None:
        out = _apply(op1, out, _value(operand1, data), reverse1)
    _write(dst, out)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False,
                         reverse1=False):
    _on_chip(dst, data, operand1)
    assert operand1.shape == data.shape
    out = _apply(op0, data.array.astype(F32), _value(operand0, data), reverse0)
    _write(dst, _apply(op1, out, operand1.array.astype(F32), reverse1))


def tensor_reduce(dst, op, data, axis):
    _on_chip(dst, data)
    assert axis == 1 and data.array.ndim == 2
    _write(dst, op.reduce(data.array.astype(F32), axis=1, dtype=F32)[:, None])


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1):
    """result[:, i] = op1(op0(data0[:, i], result[:, i-1]), data1[:, i]), from `initial`."""
    _on_chip(dst, data0, data1)
    assert data0.shape == data1.shape
    prev = np.broadcast_to(_value(initial, data0), (data0.shape[0], 1))[:, 0].astype(F32)
    a, b = data0.array.astype(F32), data1.array.astype(F32)
    if op0 is np.multiply and op1 is np.add and np.all(a == 1):  # a cumsum: the same, faster
        _write(dst, np.cumsum(np.concatenate([prev[:, None], b], 1), 1, dtype=F32)[:, 1:])
        return
    out = np.empty(a.shape, F32)
    for i in range(a.shape[1]):
        prev = _apply(op1, _apply(op0, a[:, i], prev), b[:, i])
        out[:, i] = prev
    _write(dst, out)


nl = types.SimpleNamespace(
    ndarray=_ndarray, float32=F32, int32=np.int32,
    sbuf=SBUF, psum=PSUM, shared_hbm=SHARED_HBM, private_hbm=PRIVATE_HBM,
    add=np.add, subtract=np.subtract, multiply=np.multiply, maximum=np.maximum,
    minimum=np.minimum, equal=np.equal, less=np.less, less_equal=np.less_equal,
    greater=np.greater,
    program_ndim=lambda: 1 if _Launch.grid else 0,
    num_programs=lambda axes=0: _Launch.n_programs,
    program_id=lambda axis=0: _Launch.program,
)
nisa = types.SimpleNamespace(
    memset=memset, iota=iota, dma_copy=dma_copy, tensor_copy=tensor_copy,
    tensor_tensor=tensor_tensor, tensor_scalar=tensor_scalar,
    scalar_tensor_tensor=scalar_tensor_tensor, tensor_reduce=tensor_reduce,
    tensor_tensor_scan=tensor_tensor_scan,
)
