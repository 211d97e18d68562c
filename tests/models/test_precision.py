"""Matmul precision is explicit: fp32 models ask for full fp32 products (XLA on GPU would
otherwise use TF32), bf16 models keep the default. Checked on the lowered program, so it holds
on every backend without a GPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_model

from jaxspec.models import decoder, layout
from jaxspec.models.cache import init_cache


@pytest.mark.parametrize("dtype,expected", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")])
@pytest.mark.parametrize("policy", [layout.CPU, layout.ACCELERATOR], ids=lambda x: x.name)
def test_every_product_states_its_precision(dtype, expected, policy):
    m = tiny_model(layers=2, tied=True)
    params = layout.apply(policy, jax.tree.map(lambda a: a.astype(dtype), m.params), tied=True)
    cache = init_cache(m.config, 2, 32, dtype, policy)  # [L, B=2, K, S=32, Dh]
    tokens, positions = jnp.ones((2, 3), jnp.int32), jnp.broadcast_to(jnp.arange(3), (2, 3))

    def forward(params, cache):
        return decoder.forward(m.config, params, tokens, positions, cache)[0]

    text = jax.jit(forward).lower(params, cache).as_text()
    precisions = re.findall(r"stablehlo\.dot_general .*?precision = \[(\w+), (\w+)\]", text)
    assert len(precisions) == 6 * 2 + 1  # qkv, scores, values, wo, gate/up, down; the logits
    assert set(precisions) == {(expected, expected)}
