"""Cached decode equals a teacher-forced forward (logits), with mixed prompt lengths."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import full_logits, tiny_model

from jaxspec.models import decoder
from jaxspec.models.cache import init_cache
from jaxspec.models.layout import ACCELERATOR, CPU


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
