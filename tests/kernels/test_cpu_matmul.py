"""The CPU small-M matmul kernel (kernels/cpu_matmul.cc through jax.ffi).

It must equal XLA's fp32 dot to rounding for any shape the decoder gives it, give each row the
same bits whatever the number of rows (so a verify computes what single steps compute), and
fall back to XLA's dot, with one line on stderr, whenever it cannot be built or loaded.
Generation with it on and off is checked here; the rest of the suite runs with it on (the CPU
layout policy's default).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference, perturbed, tiny_model

import jaxspec
from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")


@jax.jit
def kernel(x, w):
    """x[M, K] @ w[K, N] through the kernel on w's panels."""
    return cpu_matmul.matmul(x, layout.pack(w).data)[:, : w.shape[1]]


def operands(m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)


@needs_kernel
@pytest.mark.parametrize("m", [*range(1, 17), 41, 100])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (64, 64), (130, 67), (33, 300), (576, 1000)])
def test_equals_xla_dot_to_fp32_rounding(m, k, n):
    """Shapes off the vector width (8 or 16 lanes) and the 64-column panel (zero-padded)."""
    x, w = operands(m, k, n)
    expected = np.dot(x.astype(np.float64), w.astype(np.float64))
    got = np.asarray(kernel(x, w))
    xla = np.asarray(jnp.dot(x, w, precision="highest"))
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)  # error bound's scale
    tolerance = 4 * k * np.finfo(np.float32).eps * scale + 1e-30
    assert np.all(np.abs(got - expected) <= tolerance)
    assert np.all(np.abs(xla - expected) <= tolerance)  # the same bound holds for XLA's dot


@needs_kernel
@pytest.mark.parametrize("k,n", [(130, 67), (576, 3072)])
def test_each_row_is_bit_identical_whatever_the_number_of_rows(k, n):
    """Also across the AVX2 path's switch from streaming rows (up to 9) to register blocks."""
    x, w = operands(16, k, n, seed=1)
    alone = np.concatenate([np.asarray(kernel(x[i:i + 1], w)) for i in range(16)])
    for m in (2, 5, 7, 9, 10, 16):
        np.testing.assert_array_equal(np.asarray(kernel(x[:m], w)), alone[:m])


@needs_kernel
@pytest.mark.parametrize("k,n", [(130, 67), (576, 3072)])
def test_bf16_panels_multiply_in_fp32_and_rows_stay_independent(k, n):
    """bf16 weights are widened exactly: the result is the fp32 product with the bf16 weights
    (to fp32 rounding), and a row's bits do not depend on the number of rows."""
    x, w = operands(16, k, n, seed=3)
    w16 = jnp.asarray(w, jnp.bfloat16)
    wide = np.asarray(w16.astype(jnp.float32)).astype(np.float64)
    got = np.asarray(kernel(x, w16))
    scale = np.abs(x).astype(np.float64) @ np.abs(wide)
    assert np.all(np.abs(got - x.astype(np.float64) @ wide)
                  <= 4 * k * np.finfo(np.float32).eps * scale + 1e-30)
    alone = np.concatenate([np.asarray(kernel(x[i:i + 1], w16)) for i in range(16)])
    np.testing.assert_array_equal(got, alone)
    for m in (3, 9):  # AVX2: rows after the first read the block the first one widened
        np.testing.assert_array_equal(np.asarray(kernel(x[:m], w16)), alone[:m])


@needs_kernel
def test_the_indexed_product_reads_the_layer_it_is_given():
    """matmul_indexed(x, i, layers) == matmul(x, layers[i]) bit for bit; an index outside the
    layers is refused."""
    x, _ = operands(5, 130, 1)
    weights = [operands(1, 130, 67, seed=s)[1] for s in range(3)]
    panels = [layout.pack(w).data for w in weights]
    indexed = jax.jit(cpu_matmul.matmul_indexed)
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(np.asarray(indexed(x, i, panels))[:, :67],
                                      np.asarray(kernel(x, w)))
    with pytest.raises(Exception, match="index out of range"):
        jax.block_until_ready(indexed(x, 3, panels))


@needs_kernel
@pytest.mark.parametrize("env", [{cpu_matmul.THREADS_ENV: "1"}, {cpu_matmul.ENV: "avx2"}],
                         ids=["one-thread", "avx2"])
def test_threads_and_instruction_sets_do_not_change_the_bits(tmp_path, env):
    """One thread (this process uses up to 8: panels are split across threads from 4 per
    thread, so n = 4099, 65 panels, is split here) or the AVX2 path (where this process uses
    AVX-512) in a subprocess gives the same bits (AVX2 streams 7 rows, blocks 12)."""
    x, w = operands(12, 300, 4099, seed=2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    script = ("import sys, numpy as np, jax; from jaxspec.kernels import cpu_matmul as c; "
              "from jaxspec.models.layout import pack; print(c.isa()); d = sys.argv[1]; "
              "w = pack(np.load(d + '/w.npy')).data; "
              "x = np.load(d + '/x.npy'); f = jax.jit(c.matmul); "
              "np.save(d + '/out.npy', np.concatenate([f(x[:7], w), f(x, w)]))")
    used = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, **env}, check=True).stdout.strip()
    assert used == ("avx2" if env.get(cpu_matmul.ENV) == "avx2" else cpu_matmul.isa())
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy")[:, :4099],
                                  np.concatenate([kernel(x[:7], w), kernel(x, w)]))


# --- fallback --------------------------------------------------------------------------------

FALLBACK_SCRIPT = """
import jax.numpy as jnp, numpy as np
from jaxspec.kernels import cpu_matmul
from jaxspec.models import decoder, layout
ok = cpu_matmul.available()
x, w = np.ones((3, 8), np.float32), np.ones((8, 5), np.float32)
out = decoder.dense(jnp.asarray(x), layout.pack(jnp.asarray(w)))  # must work either way
assert np.array_equal(np.asarray(out), x @ w)
print("available" if ok else "fallback")
"""


def run_fallback(tmp_path, **env):
    """FALLBACK_SCRIPT in a fresh process with its own (empty) kernel cache."""
    full = {**os.environ, "JAXSPEC_CACHE": str(tmp_path / "cache"), **env}
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=full,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    messages = [line for line in result.stderr.splitlines() if line.startswith("jaxspec:")]
    return result.stdout.strip(), messages


def test_no_compiler_falls_back_with_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    out, messages = run_fallback(tmp_path, PATH=str(bin_dir), CXX="")
    assert out == "fallback"
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "XLA's dot" in messages[0]


def test_failing_build_falls_back_with_one_line(tmp_path):
    out, messages = run_fallback(tmp_path, CXX="false")
    assert out == "fallback"
    assert [m for m in messages if "unavailable" in m] == [messages[-1]]
    assert "false failed" in messages[-1]
    assert not any(name.endswith(".so") for _, _, files in os.walk(tmp_path / "cache")
                   for name in files)  # no half-written library left behind


def test_corrupt_library_falls_back_with_one_line(tmp_path):
    cxx = cpu_matmul.compiler()
    if cxx is None:
        pytest.skip("no compiler")
    env = {"JAXSPEC_CACHE": str(tmp_path / "cache")}
    path = subprocess.run(
        [sys.executable, "-c", "from jaxspec.kernels import cpu_matmul as c; "
         f"print(c.library_path({cxx!r}))"], env={**os.environ, **env}, capture_output=True,
        text=True, check=True).stdout.strip()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a shared library")
    out, messages = run_fallback(tmp_path)
    assert out == "fallback" and len(messages) == 1 and "unavailable" in messages[0]


def test_env_turns_the_kernel_off_silently(tmp_path):
    out, messages = run_fallback(tmp_path, **{cpu_matmul.ENV: "xla"})
    assert (out, messages) == ("fallback", [])


@needs_kernel
def test_first_use_builds_once_with_a_progress_line(tmp_path):
    out, messages = run_fallback(tmp_path)
    assert out == "available" and len(messages) == 1 and "building" in messages[0]
    out, messages = run_fallback(tmp_path)  # the second process loads the cached library
    assert (out, messages) == ("available", [])


# --- generation with the kernel on and off ------------------------------------------------------

PROMPTS = [[5, 17, 3], [40, 2, 9, 33, 21, 8, 11], [7]]
MAX_NEW = 20


@pytest.fixture(scope="module")
def models():
    target = tiny_model(0, std=0.5, vocab=48, layers=2)
    return target, perturbed(target, noise=0.02)


@pytest.mark.parametrize("policy", [layout.CPU, layout.CPU_XLA], ids=lambda p: p.name)
def test_greedy_speculative_equals_autoregressive_and_reference(models, policy):
    """The reference runs the unpacked params (XLA's dot), without a cache."""
    target, draft = (dataclasses.replace(m, layout=policy) for m in models)
    reference = greedy_reference(target, PROMPTS, MAX_NEW)
    plain = jaxspec.SpeculativeDecoder(target).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert plain.tokens == reference
    for mode in ("dynamic", "static"):
        spec = jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=3, mode=mode,
                                          static_iterations=4)
        assert spec.generate(PROMPTS, max_new_tokens=MAX_NEW).tokens == reference


def test_bf16_greedy_speculative_equals_plain_on_the_kernel(models):
    """bf16 weights on the kernel (a row's products independent of how many rows are verified
    with it) and an fp32 cache: greedy speculative output is plain greedy output."""
    target, draft = (dataclasses.replace(m, layout=layout.CPU, params=jax.tree.map(
        lambda a: a.astype(jnp.bfloat16), m.params)) for m in models)
    plain = jaxspec.SpeculativeDecoder(target).generate(PROMPTS, max_new_tokens=MAX_NEW)
    for mode in ("dynamic", "static"):
        spec = jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=3, mode=mode,
                                          static_iterations=4)
        assert spec.generate(PROMPTS, max_new_tokens=MAX_NEW).tokens == plain.tokens


@pytest.mark.parametrize("policy", [layout.CPU, layout.CPU_XLA], ids=lambda p: p.name)
def test_sampled_static_equals_dynamic(models, policy):
    target, draft = (dataclasses.replace(m, layout=policy) for m in models)
    outs = [jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=3, mode=mode,
                                       static_iterations=4).generate(
        PROMPTS, max_new_tokens=MAX_NEW, temperature=0.9, top_k=20, seed=3).tokens
            for mode in ("dynamic", "static")]
    assert outs[0] == outs[1]
