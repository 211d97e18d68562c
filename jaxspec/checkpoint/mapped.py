"""Params laid out for the CPU, kept as one flat file per checkpoint under
`$JAXSPEC_CACHE/params` that later processes map into memory.

Loading a converted checkpoint on the CPU restores it with Orbax, copies it into XLA's buffers
and lays it out (the output-layer copy, packing into panels: jaxspec.models.layout): about
1.3 s and three copies of the weights for the default model. XLA:CPU uses host memory in place
when it is 64-byte aligned, so a file holding the laid-out params, mapped read-only, is the
params: no copy, pages shared with the page cache. The first load saves the file (in a
background thread; `wait` joins it), later loads map it.

    file   [8 bytes: header length, little-endian][header: JSON][zeros to 4 KiB]
           [leaf 0][zeros to 64 bytes][leaf 1] ...   (offsets from the 4 KiB boundary)
    header {"format": FORMAT, "key": the file's key, "leaves": [[dtype, shape, offset], ...],
            "bytes": the data's size}

A file is keyed by the checkpoint (its absolute path, and the size and modification time of
each of its params and quantized blocks files), the dtype, the layout, the CPU kernel's and
the blocks' settings and the source of this module and of models/layout.py (the packing). Its
leaves must match the expected abstract laid-out params one by one and the file its recorded
size (a truncated mapping would fault at first touch); otherwise it is removed and the
checkpoint restored as before. Without a file nothing is done before the restore (a damaged
checkpoint fails first).
Files are written atomically; the folder keeps its most recently used files under MAX_BYTES
(params larger than that are not saved).
`JAXSPEC_PARAMS_CACHE=0` turns it off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import mmap
import os
from collections.abc import Callable

import jax
import numpy as np

from jaxspec.errors import UserError
from jaxspec.models import layout as layouts
from jaxspec.paths import prune, writable_cache_dir, write_atomically

ENV = "JAXSPEC_PARAMS_CACHE"
FORMAT = 1
MAX_BYTES = 4 << 30  # the default model in fp32: 0.65 GB laid out for the CPU
MAX_HEADER = 16 << 20  # bytes of JSON: ~60 per leaf
DATA_ALIGN, LEAF_ALIGN = 4096, 64  # the data starts on a page; XLA:CPU aliases 64-byte aligned
_writes: list[concurrent.futures.Future] = []


def key(path: str, dtype: str, layout: layouts.Layout) -> str:
    """sha256 of what the laid-out params depend on (module doc)."""
    from jaxspec.checkpoint import blocks
    from jaxspec.kernels import cpu_matmul

    digest = hashlib.sha256()
    for part in ("params", blocks.FOLDER):
        for folder, subfolders, files in sorted(os.walk(os.path.join(os.path.abspath(path),
                                                                     part))):
            subfolders.sort()
            for name in sorted(files):
                info = os.stat(os.path.join(folder, name))
                digest.update(f"{os.path.join(folder, name)} {info.st_size} "
                              f"{info.st_mtime_ns}\n".encode())
    digest.update(f"{FORMAT} {dtype} {layout} {os.environ.get(cpu_matmul.ENV)} "
                  f"{os.environ.get(blocks.ENV)}".encode())
    for module in (__file__, layouts.__file__):
        with open(module, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _file(name: str) -> str | None:
    """$JAXSPEC_CACHE/params/name.bin, None when the cache is off or not writable."""
    if not enabled():
        return None
    try:
        return os.path.join(writable_cache_dir("params"), f"{name}.bin")
    except UserError:
        return None


def laid_out(path: str, dtype: str, layout: layouts.Layout, abstract: Callable,
             restore: Callable, device=None):
    """The params of checkpoint `path` in dtype and layout on a CPU `device`: mapped when an
    earlier process saved them (`abstract()`: their expected ShapeDtypeStructs, asked only
    then), else `restore()` (laid out, placed), saved for the next one."""
    if enabled():
        params = load(key(path, dtype, layout), abstract, device)
        if params is not None:
            return params
    params = restore()
    if enabled():  # keyed again: restoring may have repaired (rewritten) the checkpoint
        save_later(key(path, dtype, layout), params)
    return params


def load(name: str, abstract: Callable, device=None):
    """The params saved under key `name`, mapped and placed on `device` without a copy (they
    must match `abstract()`, the expected ShapeDtypeStructs, asked only when there is a file);
    None when there is no usable file (a damaged one is removed)."""
    path = _file(name)
    if path is None or not os.path.exists(path):
        return None
    abstract = abstract()
    try:
        leaves = _map(path, name, jax.tree.leaves(abstract))
    except (OSError, ValueError, KeyError, TypeError):  # damaged: its header does not read
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: the last to be pruned
    return jax.device_put(jax.tree.unflatten(jax.tree.structure(abstract), leaves), device)


def _map(path: str, name: str, expected: list) -> list[np.ndarray]:
    """The file's leaves as read-only arrays over one mapping; ValueError when it does not
    hold exactly `expected` (dtypes and shapes) under key `name`."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > MAX_HEADER:
            raise ValueError("not a params file")
        header = json.loads(f.read(size))
        start = _round_up(8 + size, DATA_ALIGN)
        if header.get("format") != FORMAT or header.get("key") != name:
            raise ValueError("another format or key")
        if os.fstat(f.fileno()).st_size != start + header["bytes"]:
            raise ValueError("truncated")
        specs = [(str(a.dtype), list(a.shape)) for a in expected]
        if [(d, s) for d, s, _ in header["leaves"]] != specs:
            raise ValueError("other leaves")
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    return [np.frombuffer(mapping, a.dtype, int(np.prod(a.shape, dtype=np.int64)),
                          start + offset).reshape(a.shape)
            for a, (_, _, offset) in zip(expected, header["leaves"])]


def save_later(name: str, params) -> None:
    """Write params (laid out, on the CPU) under key `name` in a background thread (`wait`
    joins it); nothing when the cache is off or not writable, or the params alone would
    exceed MAX_BYTES. Failures leave no file."""
    path = _file(name)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    if path is None or os.path.exists(path) or size > MAX_BYTES:
        return
    _writes.append(_background().submit(_save, path, name, jax.tree.leaves(params)))


def _save(path: str, name: str, leaves: list) -> None:
    arrays = [np.asarray(leaf) for leaf in leaves]
    offsets, end = [], 0
    for a in arrays:
        offsets.append(_round_up(end, LEAF_ALIGN))
        end = offsets[-1] + a.nbytes
    header = json.dumps({"format": FORMAT, "key": name, "bytes": end, "leaves": [
        [str(a.dtype), list(a.shape), o] for a, o in zip(arrays, offsets)]}).encode()
    start = _round_up(8 + len(header), DATA_ALIGN)

    def write(f):
        f.write(len(header).to_bytes(8, "little") + header)
        for a, offset in zip(arrays, offsets):
            f.seek(start + offset)
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # bf16 too
        f.truncate(start + end)

    try:
        write_atomically(path, write)
    except Exception:  # a cache that cannot be written only costs time later
        return
    prune(os.path.dirname(path), MAX_BYTES)


def wait() -> None:
    """Wait for the files being saved (before a process ends without its interpreter's
    teardown, which would leave them unwritten)."""
    while _writes:
        _writes.pop().result()


@functools.cache
def _background() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxspec-params")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
