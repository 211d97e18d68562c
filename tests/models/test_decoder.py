"""Cached decode equals a teacher-forced forward (logits), with mixed prompt lengths; the
layer loop (unrolled, or one scan on the CPU layout) computes the same either way."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (causal_attention, full_logits, rows_unlike_steps, tiny_config, tiny_model,
                     tiny_params)

from jaxspec.kernels import cpu_matmul
from jaxspec.models import decoder, layout
from jaxspec.models.cache import init_cache
from jaxspec.models.layout import ACCELERATOR, CPU

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")


@pytest.mark.layouts
@pytest.mark.parametrize("layout", [CPU, ACCELERATOR], ids=lambda x: x.name)
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decode_equals_teacher_forced_forward(chunk, layout):
    """Prefill right-padded prompts of different lengths, then feed each row's continuation
    `chunk` tokens at a time at its own positions; every logit must match a no-cache forward
    over the whole sequence. Both value-cache layouts of the layout policy."""
    m = tiny_model(seed=5, layers=2)
    rng = np.random.default_rng(0)
    lengths, total = np.array([3, 7, 1, 5]), 16
    sequences = rng.integers(0, m.config.vocab_size, size=(4, total)).astype(np.int32)
    reference = full_logits(m.config, m.params, sequences)  # [B, total, V]

    prompt = np.where(np.arange(8) < lengths[:, None], sequences[:, :8], 0)  # [B, 8]
    positions = np.broadcast_to(np.arange(8), (4, 8))
    cache = init_cache(m.config, 4, 32, jnp.float32, layout)
    assert cache.v.shape[-1] == (32 if layout.values_slots_last else m.config.head_dim)
    logits, _, cache = decoder.forward(m.config, m.params, jnp.asarray(prompt), positions, cache)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], reference[b, :n], atol=1e-4, rtol=0)

    start = lengths.copy()
    while (start + chunk <= total).all():
        positions = start[:, None] + np.arange(chunk)  # [B, chunk], a different offset per row
        tokens = np.take_along_axis(sequences, positions, axis=1)
        logits, _, cache = decoder.forward(m.config, m.params, jnp.asarray(tokens),
                                           jnp.asarray(positions), cache)
        expected = np.take_along_axis(reference, positions[..., None], axis=1)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        start += chunk


@pytest.mark.layouts
@pytest.mark.parametrize("window", [None, 40, 200])
@pytest.mark.parametrize("placement", [CPU, ACCELERATOR], ids=lambda x: x.name)
def test_a_prefill_attends_to_its_own_keys_as_to_the_caches(placement, window):
    """run_layers(prefill=True) (attention over the prompt's own keys: on the CPU layout the
    prefill kernel, elsewhere causal blocks of 128 queries, none before a block's sliding
    window) computes what attention over every cache slot under the mask computes, for a
    300-token prompt (3 blocks), without and with sliding windows shorter and longer than a
    block: hidden states, captured streams and the cache."""
    config = dataclasses.replace(tiny_config(hidden=64, layers=2, max_positions=512),
                                 sliding_window=window)  # Dh 16: the kernel takes it
    params = layout.apply(placement, tiny_params(config, seed=3), tied=False)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 300)))
    positions = jnp.broadcast_to(jnp.arange(300), (2, 300))

    @functools.partial(jax.jit, static_argnums=0)
    def run(prefill, params):
        cache = init_cache(config, 2, 384, jnp.float32, placement)
        return decoder.run_layers(config, params, tokens, positions, cache, (0, 1, 2),
                                  prefill=prefill)

    kernel = "jaxspec_prefill_attention" in run.lower(True, params).as_text()
    assert kernel == (placement is CPU and cpu_matmul.available())
    own, cached = run(True, params), run(False, params)
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(cached), strict=True):
        scale = float(np.abs(b).max())  # the last layers' streams reach ~170 here
        # fp32 sums in another order, through two layers and norms (a wrong mask or window is
        # off by 1e-2 of the scale and more; the kernel alone is checked in float64)
        np.testing.assert_allclose(a, b, atol=5e-5 * scale, rtol=0)
    assert 300 > 2 * decoder.PREFILL_BLOCK


@pytest.mark.parametrize("window", [None, 40, 200])
def test_blocked_prefill_attention_equals_causal_softmax_attention(window):
    """_attention_prefill (the prefill's attention off the CPU kernel: blocks of 128 queries,
    each over the keys it may see) against float64 causal attention, 300 positions (3 blocks),
    sliding windows shorter and longer than a block."""
    config = dataclasses.replace(tiny_config(hidden=64), sliding_window=window)  # K 2, G 2
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 300, 2, 2, 16)).astype(np.float32) * 2
    k = rng.standard_normal((2, 300, 2, 16)).astype(np.float32) * 2
    v = rng.standard_normal((2, 300, 2, 16)).astype(np.float32)
    got = jax.jit(decoder._attention_prefill, static_argnums=0)(config, q, k, v)
    np.testing.assert_allclose(np.asarray(got), causal_attention(q, k, v, window), rtol=0,
                               atol=2e-5)


def test_a_program_traces_one_layer_of_a_uniform_stack(monkeypatch):
    """Layers of the same shapes share one traced `block` (the cold start's tracing cost), and
    the program computes what op-by-op execution of every layer computes."""
    import jax

    m = tiny_model(seed=2, layers=4)
    traced = []
    original = decoder.attention
    monkeypatch.setattr(decoder, "attention", lambda *a: traced.append(1) or original(*a))
    decoder.block.clear_cache()  # traces from earlier tests would be reused
    tokens, positions = jnp.asarray([[3, 1, 4, 1]]), jnp.arange(4)[None]

    def run(params):
        cache = init_cache(m.config, 1, 8, jnp.float32, CPU)
        return decoder.forward(m.config, params, tokens, positions, cache)[0]

    jitted = jax.jit(run)(m.params)
    assert len(traced) == 1
    with jax.disable_jit():
        eager = run(m.params)
    assert len(traced) == 1 + 4
    np.testing.assert_allclose(jitted, eager, atol=1e-4, rtol=0)  # fusion reorders sums


def packed(layers: int, **flags):
    """A tiny model's config and params in the CPU layout (projections in Panels)."""
    config = dataclasses.replace(tiny_config(layers=layers), **flags)
    return config, layout.apply(CPU, tiny_params(config, seed=3), tied=False)


def forward_program(config, capture=()):
    """A new jitted forward_capture (its own trace, so a monkeypatch between two is seen)."""
    def run(params, tokens, positions):
        cache = init_cache(config, tokens.shape[0], 16, jnp.float32, CPU)
        return decoder.forward_capture(config, params, tokens, positions, cache, capture)
    return jax.jit(run)


@needs_kernel
@pytest.mark.layouts
@pytest.mark.parametrize("flags", [{}, {"qk_norm": True, "attention_bias": True}],
                         ids=["llama", "qk-norm-bias"])
def test_scanned_layers_compute_what_unrolled_layers_compute(monkeypatch, flags):
    """Logits, the captured streams (the embeddings, a middle layer's input, the last layer's
    output) and the whole KV cache, with two rows at different positions."""
    config, params = packed(3, **flags)
    assert decoder.scannable(params["layers"])
    tokens = jnp.asarray([[5, 1, 4], [2, 7, 3]])
    positions = jnp.asarray([[0, 1, 2], [4, 5, 6]])
    scanned = forward_program(config, (0, 2, 3))(params, tokens, positions)
    monkeypatch.setattr(decoder, "scannable", lambda layers: False)
    unrolled = forward_program(config, (0, 2, 3))(params, tokens, positions)
    assert scanned[2].shape == (2, 3, 3, config.hidden_size)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@needs_kernel
@pytest.mark.layouts
def test_a_packed_stack_compiles_one_layer_of_kernels():
    """On the CPU layout the program's kernels do not grow with the number of layers (XLA
    compiles, and runs first, one layer's); unpacked params unroll the layers."""
    def kernels(config, params):
        text = forward_program(config).lower(params, jnp.ones((1, 2), jnp.int32),
                                              jnp.arange(2)[None]).compile().as_text()
        return len(re.findall(r"= \S+ (?:fusion|custom-call)\(", text))

    (c2, p2), (c5, p5) = packed(2), packed(5)
    assert kernels(c2, p2) == kernels(c5, p5)
    unpacked = layout.apply(layout.CPU_XLA, p5, tied=False)
    assert not decoder.scannable(unpacked["layers"])
    assert kernels(c5, unpacked) > kernels(c2, layout.apply(layout.CPU_XLA, p2, tied=False))


@needs_kernel
@pytest.mark.layouts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_verified_row_is_a_one_token_step_bit_for_bit(dtype):
    """Every position of a T-token forward (a verify) equals, bit for bit, the one-token step
    at that position (logits and the hidden state) for T = 2, 3, 4, 6 and 9, on the CPU layout
    with SmolLM2's attention shapes (3 query heads per key/value head of 64) and jaxspec's
    compiler options. A row's numbers then never depend on how many positions are verified
    with it, so greedy speculative output is greedy plain output, also at near-ties. With the
    queries and the attention weights as the attention products' left operands, the rows of
    every T differed in fp32 on an AVX2 AMD EPYC (2026-12-02)."""
    config = tiny_config(vocab=64, hidden=192, heads=3, kv_heads=1, layers=2, intermediate=128)
    params = layout.apply(CPU, tiny_params(config, seed=4, std=0.2), tied=False)
    params = jax.tree.map(lambda w: w.astype(dtype) if w.dtype == jnp.float32 else w, params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 40)), jnp.int32)
    Ts = (2, 3, 4, 6, 9)  # γ = 1, 2, 3, 5, 8
    differing = {T: rows_unlike_steps(config, params, tokens, 12, T, dtype) for T in Ts}
    assert differing == {T: [] for T in Ts}
