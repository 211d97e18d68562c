"""The small-M matmul kernel for CPU (`cpu_matmul.cc`), built on first use and called by XLA
through JAX's FFI.

`x[M, K] @ w[K, N]` in fp32 for the few rows a decode step or a verify has, with w packed in
column panels (`models.layout.Panels`: [N / 64, K, 64]), fp32 or bf16 (widened exactly as
loaded: half the bytes, the same fp32 arithmetic): each panel is read once, in address order,
for up to 6 rows with AVX-512 and 9 with AVX2 (which takes them in turns over 8 KB blocks of
the panel), where XLA:CPU's dot on [K, N] takes a slower path for 2-16 rows; and a row's
result is bit-identical whatever M is. The CPU layout policy packs fp32 and bf16 weights when
the kernel is available, and the decoder sends every product on panels to it: for many rows
(prefill) it runs at XLA:CPU's GEMM speed (measured with AVX-512: 168-226 GFLOP/s on 2 cores for
M = 16 to 4096 at SmolLM2's [576, 3072], XLA 122-210), so there is no size at which to switch.
`matmul_indexed` is the same product with the weight chosen at run time among the layers'
panels (the decoder's scanned layer loop: each layer's buffer is read where it lies). Panels of
GGUF blocks (uint8 / int8 data of the kinds jaxspec.models.quantized packs) are dequantized as
gguf does while they are read: the bits of the fp32 panels of the same weights, a sixth to a
third of the bytes.

The same library holds the CPU attention kernels (`cpu_attention.cc` for decode steps and
verifies, `cpu_prefill_attention.cc` for a prompt's first forward: kernels.cpu_attention), the
SIMD helpers they share (`cpu_simd.h`) and the threading all share (`cpu_threads.h`). It is
compiled once with the system C++ compiler (`$CXX`, else `c++`) into `$JAXSPEC_CACHE/kernels/`,
under a name that hashes the sources, the jaxlib version and the compiler, so an upgrade
rebuilds it. Without a compiler, on a CPU without AVX2 + FMA, or when building or loading
fails, `available()` is False, one line on stderr says why, and the decoder uses XLA's dot. `JAXSPEC_CPU_MATMUL=xla`
turns the kernel off (the CPU layout then keeps plain weights), `JAXSPEC_CPU_MATMUL=avx2` keeps
it to AVX2 where AVX-512 is present (its results are bit-identical: every output accumulates in
the same order); `JAXSPEC_MATMUL_THREADS` sets its threads (default: the CPUs this process may
use, at most 8; XLA's intra-op pool runs them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ENV = "JAXSPEC_CPU_MATMUL"
THREADS_ENV = "JAXSPEC_MATMUL_THREADS"
TARGET = "jaxspec_small_m_matmul"
INDEXED_TARGET = "jaxspec_small_m_matmul_indexed"
ATTENTION_TARGET = "jaxspec_decode_attention"  # cpu_attention.cc (kernels.cpu_attention)
PREFILL_TARGET = "jaxspec_prefill_attention"  # cpu_prefill_attention.cc (the same module)
TARGETS = (TARGET, INDEXED_TARGET, ATTENTION_TARGET, PREFILL_TARGET)  # one per FFI handler
CACHE_FOLDER = "kernels"  # in $JAXSPEC_CACHE
PANEL = 64  # columns per panel (kPanel in the source; models.layout.PANEL)
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "cpu_matmul.cc")
SOURCES = (SOURCE, os.path.join(_HERE, "cpu_attention.cc"),
           os.path.join(_HERE, "cpu_prefill_attention.cc"))  # one library
HEADERS = (os.path.join(_HERE, "cpu_threads.h"), os.path.join(_HERE, "cpu_simd.h"))


def compiler() -> str | None:
    """The C++ compiler to build with ($CXX, else c++, g++ or clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]


def library_path(cxx: str) -> str:
    """Where the library built from this source, jaxlib and compiler lives."""
    import jaxlib

    from jaxspec.paths import cache_dir

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            digest.update(f.read())
    digest.update(jaxlib.__version__.encode() + cxx.encode() + " ".join(FLAGS).encode())
    key = digest.hexdigest()
    return os.path.join(cache_dir(), CACHE_FOLDER, f"cpu_matmul-{key[:16]}.so")


def build(cxx: str, path: str) -> None:
    """Compile the library to `path`, in the cache's kernels/ folder (atomically: a failed build
    leaves nothing there); a cache that cannot be written raises UserError."""
    import jax

    from jaxspec.paths import writable_cache_dir

    writable_cache_dir(CACHE_FOLDER)
    print(f"jaxspec: building the CPU kernels (once, a few seconds) into {path}",
          file=sys.stderr, flush=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_HERE}", *SOURCES, "-o",
                   partial, "-lpthread"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{os.path.basename(cxx)} failed: {last}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def default_threads() -> int:
    value = os.environ.get(THREADS_ENV)
    if value:
        return max(1, int(value))
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)
    return max(1, min(usable, 8))


@functools.cache
def available() -> bool:
    """Build (if needed), load and register the kernel; False (said once) when it cannot be."""
    if os.environ.get(ENV, "kernel") == "xla":
        return False
    try:
        _load()
        return True
    except Exception as e:  # any failure means the fallback, never a broken generation
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"jaxspec: the CPU matmul kernel is unavailable ({reason}); using XLA's dot",
              file=sys.stderr, flush=True)
        return False


def isa() -> str | None:
    """The instruction set the loaded kernel runs ("avx512", "avx2"), None when unavailable."""
    if not available():
        return None
    return {2: "avx512", 1: "avx2"}[_load().jaxspec_small_m_isa()]


@functools.cache
def _load() -> ctypes.CDLL:
    import jax

    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler found; set CXX")
    path = library_path(cxx)
    if not os.path.exists(path):
        build(cxx, path)
    library = ctypes.CDLL(path)
    if os.environ.get(ENV) == "avx2":
        library.jaxspec_small_m_set_isa(1)
    if library.jaxspec_small_m_isa() == 0:
        raise OSError("this CPU lacks AVX2/FMA")
    library.jaxspec_small_m_set_threads(default_threads())
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                    platform="cpu")
    return library


def fits(x, panels) -> bool:
    """Whether x[M, K] @ panels is a product the kernel takes (shapes and dtypes: x fp32,
    panels fp32 or bf16 [J, K, 64], or GGUF blocks [J, K / 32, bytes] of a kind that
    jaxspec.models.quantized packs)."""
    import jax.numpy as jnp

    from jaxspec.models import quantized

    if not (x.dtype == jnp.float32 and x.ndim == 2 and x.shape[0] >= 1 and panels.ndim == 3):
        return False
    kind = quantized.kind(panels)
    if kind is not None:
        K = x.shape[1]
        return K % quantized.BLOCK == 0 and panels.shape[1] == K // quantized.BLOCK
    return (panels.dtype in (jnp.float32, jnp.bfloat16)
            and panels.shape[1:] == (x.shape[1], PANEL))


def matmul(x, panels):
    """x[M, K] @ panels[J, K, 64] -> [M, J * 64] (fp32; x fp32, panels fp32 or bf16) through
    the kernel, the panels being a [K, J * 64] weight's columns (models.layout.pack); call only
    when `available()`."""
    import jax

    out = jax.ShapeDtypeStruct((x.shape[0], panels.shape[0] * PANEL), x.dtype)
    return jax.ffi.ffi_call(TARGET, out)(x, panels)


def matmul_indexed(x, index, layers):
    """x[M, K] @ layers[index] -> [M, J * 64] (fp32): `layers` a sequence of panels
    [J, K, 64] of the same shape (one weight of each decoder layer), index an i32[] chosen at
    run time; each layer's buffer is read in place (no stacked copy). Call only when
    `available()`."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((x.shape[0], layers[0].shape[0] * PANEL), x.dtype)
    return jax.ffi.ffi_call(INDEXED_TARGET, out)(x, jnp.asarray(index, jnp.int32), *layers)
