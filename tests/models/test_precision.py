"""Matmul precision is explicit: fp32 models ask for full fp32 products (XLA on GPU would
otherwise use TF32), bf16 models keep the default. Checked on the lowered program, so it holds
on every backend without a GPU."""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_model

from jaxspec.kernels import cpu_attention, cpu_matmul
from jaxspec.models import decoder, layout
from jaxspec.models.cache import init_cache


@pytest.mark.parametrize("dtype,expected", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")])
@pytest.mark.parametrize("policy", [layout.CPU_XLA, layout.ACCELERATOR], ids=lambda x: x.name)
def test_every_product_states_its_precision(dtype, expected, policy):
    """Attention reads an fp32 cache where the policy keeps one (CPU): its two products are
    then fp32 ones, in bf16 models too."""
    text = lowered_forward(policy, dtype)
    precisions = re.findall(r"stablehlo\.dot_general .*?precision = \[(\w+), (\w+)\]", text)
    assert len(precisions) == 6 * 2 + 1  # qkv, scores, values, wo, gate/up, down; the logits
    fp32_attention = 2 * 2 if policy.fp32_cache or dtype == jnp.float32 else 0
    assert precisions.count(("HIGHEST", "HIGHEST")) == (
        13 if dtype == jnp.float32 else fp32_attention)
    assert precisions.count((expected, expected)) == (
        13 if dtype == jnp.float32 else 13 - fp32_attention)


def lowered_forward(policy, dtype, tokens_per_row=3):
    """The StableHLO text of a tiny 2-layer forward of 2 rows in `policy`."""
    m = tiny_model(layers=2, tied=True)
    params = layout.apply(policy, jax.tree.map(lambda a: a.astype(dtype), m.params), tied=True)
    cache = init_cache(m.config, 2, 64, dtype, policy)  # [L, B=2, K, S=64, Dh]
    shape = (2, tokens_per_row)
    tokens, positions = jnp.ones(shape, jnp.int32), jnp.broadcast_to(jnp.arange(shape[1]), shape)

    def forward(params, cache):
        return decoder.forward(m.config, params, tokens, positions, cache)[0]

    return jax.jit(forward).lower(params, cache).as_text()


@pytest.mark.skipif(not cpu_matmul.available(), reason="the CPU matmul kernel is unavailable")
@pytest.mark.parametrize("tokens_per_row", [1, 9, cpu_attention.MAX_POSITIONS + 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_cpu_policy_sends_projections_to_the_kernel(tokens_per_row, dtype):
    """Every projection and the output layer go through the matmul kernel (fp32 and bf16
    weights); attention through the decode-attention kernel up to MAX_POSITIONS positions (a
    step or a verify), XLA's two dots for a longer prefill. The layers are one scanned body:
    its 4 projections pick their layer's panels at run time."""
    text = lowered_forward(layout.CPU, dtype, tokens_per_row)
    calls = re.findall(r"@(jaxspec_\w*)\(", text)
    decode = tokens_per_row <= cpu_attention.MAX_POSITIONS
    assert Counter(calls) == {cpu_matmul.INDEXED_TARGET: 4, cpu_matmul.TARGET: 1,
                              **({cpu_matmul.ATTENTION_TARGET: 1} if decode else {})}
    dots = len(re.findall(r"stablehlo\.dot_general", text))
    assert dots == (0 if decode else 2)  # scores, values


def test_other_policies_never_use_the_kernel():
    """The accelerator policy never packs; cpu-xla keeps XLA's dots (attention's too)."""
    for policy, dtype in ((layout.ACCELERATOR, jnp.float32), (layout.CPU_XLA, jnp.bfloat16),
                          (layout.CPU_XLA, jnp.float32)):
        text = lowered_forward(policy, dtype, 1)
        assert "@jaxspec_" not in text
