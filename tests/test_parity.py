"""Full-model logits of jaxspec vs Hugging Face transformers (torch fp32) on tiny random models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import KINDS, hf_logits, jaxspec_logits, random_tokens, tiny_hf_model

from jaxspec.checkpoint import convert, load_model

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


def test_tied_output_layer_without_the_transposed_copy(tmp_path):
    """The tied head reads the embedding itself when no lm_head copy was added (non-CPU)."""
    path = tiny_hf_model("llama", tmp_path)
    model = load_model(path)
    tied = dataclasses.replace(
        model, params={k: v for k, v in model.params.items() if k != "lm_head"})
    tokens = random_tokens(shape=(2, 12), seed=2)
    np.testing.assert_allclose(jaxspec_logits(tied, tokens), hf_logits(path, tokens),
                               atol=TOLERANCE, rtol=0)
