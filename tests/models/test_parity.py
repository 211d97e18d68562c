"""Full-model logits of jaxspec vs Hugging Face transformers (torch fp32) on tiny random models."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KINDS, hf_logits, jaxspec_logits, random_tokens, tiny_hf_model

from jaxspec.checkpoint import convert, load_model
from jaxspec.kernels import cpu_matmul
from jaxspec.models import decoder, layout
from jaxspec.models.cache import init_cache

TOLERANCE = 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
    path = tiny_hf_model(kind, tmp_path)
    tokens = random_tokens(shape=(2, 12))  # longer than mistral's sliding window (4)
    model = load_model(path)
    ours, ref = jaxspec_logits(model, tokens), hf_logits(path, tokens)
    assert ours.shape == ref.shape == (2, 12, 100)
    assert np.abs(ref).max() > 1.0  # weights are large enough for errors to show
    np.testing.assert_allclose(ours, ref, atol=TOLERANCE, rtol=0)


@pytest.mark.skipif(not (layout.default().panels and cpu_matmul.available()),
                    reason="the CPU layout with its matmul kernel is not in use")
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_through_the_cpu_kernel(kind, tmp_path):
    """12 rows: every projection and the output layer on the kernel (load_model packs them)."""
    path = tiny_hf_model(kind, tmp_path)
    tokens = random_tokens(shape=(1, 12))
    model = load_model(path)
    assert model.layout == layout.CPU and isinstance(model.params["lm_head"], layout.Panels)
    ours, ref = jaxspec_logits(model, tokens), hf_logits(path, tokens)
    np.testing.assert_allclose(ours, ref, atol=TOLERANCE, rtol=0)


def test_config_flags_follow_the_family(tmp_path):
    configs = {kind: load_model(tiny_hf_model(kind, tmp_path)).config for kind in KINDS}
    assert configs["llama"].tie_word_embeddings and configs["llama3"].rope_scaling is not None
    assert configs["mistral"].sliding_window == 4
    assert configs["qwen2"].attention_bias and configs["qwen2"].sliding_window is None
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32


def test_logits_match_after_orbax_round_trip(tmp_path):
    path = tiny_hf_model("llama3", tmp_path)
    dst = convert(path, str(tmp_path / "converted"))
    tokens = random_tokens(shape=(2, 12), seed=1)
    np.testing.assert_allclose(jaxspec_logits(load_model(dst), tokens), hf_logits(path, tokens),
                               atol=TOLERANCE, rtol=0)


@pytest.mark.layouts
@pytest.mark.parametrize("policy", [layout.CPU, layout.ACCELERATOR], ids=lambda x: x.name)
def test_tied_output_layer_in_each_layout(tmp_path, policy):
    """The tied head reads the policy's lm_head copy (CPU) or the embedding itself."""
    path = tiny_hf_model("llama", tmp_path)
    model = load_model(path)
    params = layout.apply(policy, model.params, tied=True)
    assert ("lm_head" in params) == policy.output_copy
    tied = dataclasses.replace(model, params=params, layout=policy)
    tokens = random_tokens(shape=(2, 12), seed=2)
    np.testing.assert_allclose(jaxspec_logits(tied, tokens), hf_logits(path, tokens),
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_captured_hidden_states_match_transformers(kind, tmp_path):
    """forward_capture's residual streams entering layers 0 (embeddings) and 1 equal
    transformers' output_hidden_states; the final hidden equals its last (normed) entry."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_hf_model(kind, tmp_path)
    model = load_model(path)
    tokens = random_tokens(shape=(2, 12), seed=3)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    cache = init_cache(model.config, 2, 128, jnp.float32, model.layout)
    _, hidden, captured, _ = decoder.forward_capture(model.config, model.params,
                                                     jnp.asarray(tokens), positions, cache, (0, 1))
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        streams = hf(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
    assert captured.shape == (2, 12, 2, model.config.hidden_size)
    for i in (0, 1):
        np.testing.assert_allclose(captured[:, :, i], streams[i].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(hidden, streams[-1].numpy(), atol=1e-4, rtol=0)
