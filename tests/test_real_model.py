"""End-to-end exactness on the real default model, SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import jax
import pytest
from helpers import transformers_gguf_model

from jaxspec import SpeculativeDecoder, load_model
from jaxspec.models.decoder import init_params
from jaxspec.models.loaded import Model

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    return [smollm2.tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"]
            for c in chat]


@pytest.fixture(scope="module")
def greedy(smollm2, prompt_ids):
    """jaxspec plain greedy decoding, both prompts in one batch."""
    return SpeculativeDecoder(smollm2, None).generate(prompt_ids, max_new_tokens=NEW_TOKENS).tokens


@pytest.mark.slow
def test_greedy_matches_transformers_generate(smollm2_gguf, prompt_ids, greedy):
    import torch

    reference = transformers_gguf_model(smollm2_gguf)
    for ids, ours in zip(prompt_ids, greedy):
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, eos_token_id=2, pad_token_id=2)
        assert ours == out[0, len(ids):].tolist()
    assert min(len(t) for t in greedy) >= 5 and max(len(t) for t in greedy) == NEW_TOKENS


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [3, 5])
def test_weak_draft_keeps_greedy_output(smollm2, prompt_ids, greedy, gamma):
    """A tiny random draft over the same 49,152-token vocabulary almost never agrees with the
    target, yet the speculative output must be the target's greedy output exactly."""
    draft_config = smollm2.config.__class__(**{
        **smollm2.config.to_dict(), "num_layers": 1, "hidden_size": 64, "intermediate_size": 128,
        "num_heads": 2, "num_kv_heads": 1, "head_dim": 32, "rope_scaling": None})
    draft = Model(config=draft_config, params=init_params(draft_config, jax.random.key(1)),
                  tokenizer=None, path="random-draft")
    out = SpeculativeDecoder(smollm2, draft, num_speculative_tokens=gamma).generate(
        prompt_ids, max_new_tokens=NEW_TOKENS)
    assert out.tokens == greedy
    assert out.stats["draft_tokens_proposed"] > 0


@pytest.mark.slow
def test_layerskip_self_draft_keeps_greedy_output(smollm2, prompt_ids, greedy):
    out = SpeculativeDecoder(smollm2, "layerskip:24", num_speculative_tokens=4).generate(
        prompt_ids, max_new_tokens=NEW_TOKENS)
    assert out.tokens == greedy
    assert out.stats["draft_tokens_accepted"] > 0  # 24 of 30 layers agree sometimes


@pytest.mark.slow
def test_ngram_draft_on_code_echo(smollm2):
    """Prompt lookup on a prompt whose answer repeats it: exact, and most drafts accepted."""
    code = "def f(a, b):\n    c = a + b\n    d = c * a\n    return d + c\n"
    ids = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Rewrite this code with better names:\n" + code}],
        add_generation_prompt=True)["input_ids"]
    plain = SpeculativeDecoder(smollm2, None).generate([ids], max_new_tokens=NEW_TOKENS)
    out = SpeculativeDecoder(smollm2, "ngram", num_speculative_tokens=4).generate(
        [ids], max_new_tokens=NEW_TOKENS)
    assert out.tokens == plain.tokens
    assert out.stats["acceptance_rate"] > 0.5
    assert out.stats["target_forward_calls"] < NEW_TOKENS / 2
