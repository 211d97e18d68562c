"""Prompt lookup first, a draft head elsewhere (drafts.lookup_first): which draft proposes for a
row, exact greedy output, and the names that build it ("DRAFT+ngram[:N]")."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference

from jaxspec import devices
from jaxspec.api import SpeculativeDecoder, resolve_draft
from jaxspec.checkpoint import head_store
from jaxspec.decode import sampling
from jaxspec.drafts import head as heads
from jaxspec.drafts.base import Draft
from jaxspec.drafts.lookup_first import LookupFirst
from jaxspec.drafts.ngram import NgramDraft

VOCAB = 40
PROMPTS = [[5, 9, 3, 5, 9, 3, 5], [4, 4], [30, 2, 17, 8, 1, 6, 22], [7, 8, 7, 8]]


@dataclasses.dataclass(frozen=True)
class Constant(Draft):
    """Proposes token 39 everywhere, with q uniform over the vocabulary."""

    def propose(self, params, state, tokens, lengths, *, gamma, sampler, values, uniforms):
        draft_tokens = jnp.full((tokens.shape[0], gamma), 39, jnp.int32)
        q = None if sampler.greedy else jnp.full((tokens.shape[0], gamma, VOCAB), 1 / VOCAB)
        return draft_tokens, q, state


def _propose(draft, rows, gamma=3, greedy=True):
    width = max(map(len, rows))
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows], jnp.int32)
    lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
    sampler, values = sampling.make(0.0 if greedy else 1.0, 0, 1.0)
    uniforms = jnp.zeros((len(rows), gamma))
    state = draft.init_state(len(rows), width, jnp.float32, None)
    return draft.propose(None, state, tokens, lengths, gamma=gamma, sampler=sampler,
                         values=values, uniforms=uniforms)


@pytest.mark.parametrize("min_match,expected", [
    (2, [[7, 5, 6], [39, 39, 39], [9, 8, 9]]),
    (1, [[7, 5, 6], [2, 3, 4], [9, 8, 9]])])
def test_a_row_takes_the_lookup_where_its_suffix_matched(min_match, expected):
    """Rows whose last min_match+ tokens occurred before continue that text (periodically
    past the present); the others take the fallback's proposals. q: one-hot for a lookup, the
    fallback's for the rest."""
    draft = LookupFirst(Constant(), NgramDraft(3, VOCAB), min_match=min_match)
    rows = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 1], [8, 9, 8, 9, 8]]
    draft_tokens, q, _ = _propose(draft, rows)
    assert np.asarray(draft_tokens).tolist() == expected and q is None
    _, q, _ = _propose(draft, rows, greedy=False)
    q = np.asarray(q)
    for b, row in enumerate(expected):
        if row[0] == 39:
            np.testing.assert_allclose(q[b], 1 / VOCAB)
        else:
            np.testing.assert_array_equal(q[b], np.eye(VOCAB)[row])


@pytest.fixture(scope="module")
def target(successor_target):
    assert successor_target.config.vocab_size == VOCAB
    return successor_target


@pytest.fixture(scope="module")
def head(successor_trained):
    config, params, *_ = successor_trained
    return config, params


@pytest.mark.parametrize("gamma,mode", [(2, "dynamic"), (4, "dynamic"), (3, "static"),
                                        (3, "chunked")])
def test_greedy_output_equals_plain_greedy(target, head, gamma, mode):
    """Token for token with the trained head as the fallback, on prompts that repeat (the
    lookup proposes) and prompts that do not (the head does), rows of different lengths."""
    config, params = head
    draft = LookupFirst(heads.HeadDraft(config), NgramDraft(3, VOCAB))
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=gamma, mode=mode,
                                 draft_params={"head": params, "embed": target.params["embed"]})
    out = decoder.generate(PROMPTS, max_new_tokens=24)
    assert out.tokens == greedy_reference(target, PROMPTS, 24)
    assert out.stats["draft_tokens_accepted"] > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_leaving_the_head_out_changes_no_token(target, head, temperature):
    """In iterations where every row looks up, the head's proposals are left out (the
    draft's forward passes say how often: γ fewer each) and nothing else changes: the same
    tokens, greedy and sampled with the same seed, as a LookupFirst that always runs it."""
    config, params = head
    draft_params = {"head": params, "embed": target.params["embed"]}
    prompt = [[30, 2, 17, 8, 1, 6, 22]]
    out = {}
    for skip in (True, False):
        draft = LookupFirst(heads.HeadDraft(config), NgramDraft(3, VOCAB), skip_fallback=skip)
        decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=2,
                                     draft_params=draft_params)
        out[skip] = decoder.generate(prompt, max_new_tokens=32, temperature=temperature, seed=3)
    assert out[True].tokens == out[False].tokens
    iterations = out[False].stats["target_forward_calls"] - 1
    assert out[True].stats["target_forward_calls"] - 1 == iterations
    every = out[False].stats["draft_forward_calls"]
    assert every == heads.HeadDraft(config).forward_calls(2, iterations) == 1 + 3 * iterations
    skipped, rest = divmod(every - out[True].stats["draft_forward_calls"], 2)
    assert rest == 0 and 0 < skipped < iterations


def test_trainium_gets_a_lookup_first_without_a_conditional(tmp_path, target, head,
                                                            monkeypatch):
    """neuronx-cc takes no `lax.cond`: the API builds the draft that never leaves the head
    out for a Neuron device (the program is checked in tests/decode/test_neuron_hlo.py)."""
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="float32",
                    gamma=2, threshold=0.0, training={})
    assert resolve_draft(f"{path}+ngram", target)[0].skip_fallback
    monkeypatch.setattr(devices, "platform", lambda device=None: devices.NEURON)
    assert not resolve_draft(f"{path}+ngram", target)[0].skip_fallback


def test_names_build_lookup_first(tmp_path, target, head):
    """"HEAD_DIR+ngram:2" is the head with lookup first (the head's recorded γ);
    "default+ngram" for a target without a shipped head is the n-gram draft alone."""
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="bfloat16",
                    gamma=3, threshold=0.0, training={})
    decoder = SpeculativeDecoder(target, f"{path}+ngram:2")
    assert isinstance(decoder.draft, LookupFirst) and decoder.gamma == 3
    assert decoder.draft.lookup == NgramDraft(2, VOCAB)
    assert isinstance(decoder.draft.fallback, heads.HeadDraft)
    assert decoder.draft_cost_source[0] is decoder.draft.fallback  # the head's cost
    assert decoder.generate(PROMPTS, max_new_tokens=16).tokens == greedy_reference(
        target, PROMPTS, 16)
    assert SpeculativeDecoder(target, "default+ngram").draft == NgramDraft(3, VOCAB)
