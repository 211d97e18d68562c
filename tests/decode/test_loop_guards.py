"""Guards on the pure loop: LoopSpec refuses inconsistent drafts and γ, a max_len too small for
the request is refused, and a row whose buffer fills up stops (exactly) instead of writing past
its end. The sizing rule is one function that the API uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference, tiny_model

import jaxspec
from jaxspec.decode import sampling, sizing
from jaxspec.drafts.ngram import NgramDraft

VOCAB = 48
PROMPTS = [[5, 17, 3, 9], [40, 2]]


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, std=0.5, vocab=VOCAB)


def _args(target, max_new):
    prompt = np.zeros((len(PROMPTS), 4), np.int32)  # [B, P = 4]
    for b, p in enumerate(PROMPTS):
        prompt[b, : len(p)] = p
    _, values = sampling.make(0.0)
    return (target.params, None, jnp.asarray(prompt),
            jnp.asarray([len(p) for p in PROMPTS], jnp.int32), jax.random.key(0), values,
            max_new)


def test_spec_refuses_gamma_without_draft_and_draft_without_gamma(target):
    with pytest.raises(ValueError, match="needs a draft"):
        jaxspec.LoopSpec(target=target.config, gamma=2)
    with pytest.raises(ValueError, match="gamma >= 1"):
        jaxspec.LoopSpec(target=target.config, draft=NgramDraft(3, VOCAB), gamma=0)
    assert jaxspec.LoopSpec(target=target.config, draft=NgramDraft(3, VOCAB), gamma=2).gamma == 2


def test_max_len_too_small_is_refused(target):
    ngram = NgramDraft(3, VOCAB)
    spec = jaxspec.LoopSpec(target=target.config, draft=ngram, gamma=2, max_len=16)
    # prompt width 4 + 10 new + γ 2 + 1 = 17 > 16
    with pytest.raises(ValueError, match="loop_max_len"):
        jaxspec.generate_tokens(spec, *_args(target, 10))
    jax.block_until_ready(jaxspec.generate_tokens(spec, *_args(target, 9)))  # 16: fits
    # under jit max_new_tokens is traced, but a prompt wider than the buffer is still refused
    tiny = jaxspec.LoopSpec(target=target.config, draft=ngram, gamma=2, max_len=6)
    with pytest.raises(ValueError, match="too small"):
        jax.jit(jaxspec.generate_tokens, static_argnums=0)(tiny, *_args(target, jnp.int32(4)))


@pytest.mark.parametrize("gamma", [0, 3])
def test_rows_stop_exactly_when_the_buffer_is_full(target, gamma):
    """A traced max_new_tokens larger than the buffer: every row stops with room left for no
    further iteration, never past max_len, and its tokens are the greedy reference's."""
    draft = NgramDraft(3, VOCAB) if gamma else None
    spec = jaxspec.LoopSpec(target=target.config, draft=draft, gamma=gamma, max_len=20)
    state = jax.jit(jaxspec.generate_tokens, static_argnums=0)(spec, *_args(target,
                                                                             jnp.int32(100)))
    lengths, starts = np.asarray(state.lengths), np.asarray(state.prompt_lengths)
    assert np.all(np.asarray(state.done))
    assert np.all(lengths <= 20) and np.all(lengths + gamma + 1 > 20), lengths
    expected = greedy_reference(target, PROMPTS, 20)
    tokens = np.asarray(state.tokens)
    for b in range(len(PROMPTS)):
        new = tokens[b, starts[b]: lengths[b]].tolist()
        assert new == expected[b][: len(new)]


@pytest.mark.parametrize("prompt,max_new,gamma", [(1, 1, 0), (16, 200, 4), (17, 1, 32)])
def test_sizing_rule(prompt, max_new, gamma):
    width = sizing.prompt_width(prompt)
    assert width % 16 == 0 and prompt <= width < prompt + 16
    max_len = sizing.loop_max_len(prompt, max_new, gamma)
    assert max_len % 128 == 0
    assert sizing.required_len(width, max_new, gamma) <= max_len
    assert sizing.required_len(width, max_new, gamma) == width + max_new + gamma + 1
