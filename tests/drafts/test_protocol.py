"""A draft written only against the protocol (jaxspec.drafts.base): it runs in the fused loop,
receives exactly the target's hidden states, and plain decoding pays nothing for the capture."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference, tiny_model

import jaxspec
from jaxspec.decode import sampling
from jaxspec.decode.sizing import loop_max_len
from jaxspec.drafts.base import Draft, Observation
from jaxspec.models import decoder, layout
from jaxspec.models.cache import init_cache

LAYERS = (1, 2)  # streams entering target layers 1 and 2 (of 3): C = 2
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13, 14, 15, 16]]  # B = 3, P = 7
MAX_NEW = 12
GENERATE = jax.jit(jaxspec.generate_tokens, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class HiddenEcho(Draft):
    """Proposes, γ times, the early-exit token read from the layer-2 stream at the last position
    the target verified. State: that stream [B, C, D], every stream received record[B, S, C, D]
    and where one was received, seen[B, S]."""

    vocab: int
    hidden: int  # D, the target's hidden size
    hidden_layers: tuple[int, ...] = LAYERS

    def init_state(self, batch, max_len, dtype, layout):
        C, D = len(self.hidden_layers), self.hidden
        return {"last": jnp.zeros((batch, C, D), jnp.float32),
                "record": jnp.zeros((batch, max_len, C, D), jnp.float32),
                "seen": jnp.zeros((batch, max_len), bool),
                "committed": jnp.zeros((batch,), jnp.int32)}  # tokens the loop kept, summed

    def _store(self, state, positions, hidden, mask):
        """Record hidden[B, T, C, D] at positions[B, T] where mask[B, T]; rows elementwise."""
        rows = jnp.arange(positions.shape[0])[:, None]
        old = state["record"][rows, positions]  # [B, T, C, D]
        record = state["record"].at[rows, positions].set(
            jnp.where(mask[..., None, None], hidden, old))
        seen = state["seen"].at[rows, positions].set(state["seen"][rows, positions] | mask)
        return record, seen

    def prefill(self, params, state, prompt, prompt_lengths, hidden):
        B, P = prompt.shape
        assert hidden.shape == (B, P, len(self.hidden_layers), self.hidden)  # [B, P, C, D]
        positions = jnp.broadcast_to(jnp.arange(P), (B, P))
        record, seen = self._store(state, positions, hidden, positions < prompt_lengths[:, None])
        last = hidden[jnp.arange(B), prompt_lengths - 1]  # [B, C, D]
        return {**state, "last": last, "record": record, "seen": seen}

    def propose(self, params, state, tokens, lengths, *, gamma, sampler, values, uniforms):
        stream = state["last"][:, 1]  # [B, D] entering layer 2
        # params: the target's; its own output layer reads the 2-layer stream
        logits = decoder.logits(params, decoder.rms_norm(stream, params["final_norm"], 1e-5))
        token = sampling.first_argmax(logits).astype(jnp.int32)  # [B]
        drafts = jnp.repeat(token[:, None], gamma, axis=1)  # [B, γ]
        q = None if sampler.greedy else jax.nn.one_hot(drafts, self.vocab)  # [B, γ, V]
        return drafts, q, state

    def observe(self, params, state, obs: Observation):
        B, T = obs.tokens.shape  # T = γ + 1
        assert obs.hidden.shape == (B, T, len(self.hidden_layers), self.hidden)  # [B, T, C, D]
        iota = jnp.arange(T)[None]
        # inputs 0..n saw only correct tokens; rows already done are left alone
        mask = obs.active[:, None] & (iota <= obs.n_accepted[:, None])  # [B, T]
        record, seen = self._store(state, obs.positions, obs.hidden, mask)
        newest = obs.hidden[jnp.arange(B), obs.n_accepted]  # [B, C, D]
        last = jnp.where(obs.active[:, None, None], newest, state["last"])
        return {"last": last, "record": record, "seen": seen,
                "committed": state["committed"] + obs.committed}

    def forward_calls(self, gamma, iterations, state=None):
        return 0  # no forward passes of its own


@functools.cache
def _target():
    # vocab 48, hidden 32; std 0.2 keeps the streams O(1) (|h| < 8; std 0.5 reaches 125, where
    # fp32 rounding alone exceeds atol 1e-4) and argmaxes still decisive
    return tiny_model(seed=12, layers=3, std=0.2)


def _toy():
    config = _target().config
    return HiddenEcho(vocab=config.vocab_size, hidden=config.hidden_size)


def _args(gamma, draft):
    """(spec, args of generate_tokens after spec): greedy, the toy's params = the target's."""
    target = _target()
    sampler, values = sampling.make(0.0)
    P = max(len(p) for p in PROMPTS)
    prompt = np.zeros((len(PROMPTS), P), np.int32)  # [B, P] right-padded
    for b, p in enumerate(PROMPTS):
        prompt[b, : len(p)] = p
    spec = jaxspec.LoopSpec(target=target.config, draft=draft, gamma=gamma, sampler=sampler,
                            max_len=loop_max_len(P, MAX_NEW, gamma))
    draft_params = target.params if draft is not None else None
    return spec, (target.params, draft_params, jnp.asarray(prompt),
                  jnp.asarray([len(p) for p in PROMPTS], jnp.int32), jax.random.key(0), values,
                  jnp.int32(MAX_NEW))


@functools.cache
def _generate(gamma):
    spec, args = _args(gamma, _toy())
    return GENERATE(spec, *args)


@pytest.mark.parametrize("gamma", [2, 3])
def test_protocol_draft_keeps_greedy_output(gamma):
    """The toy runs inside the pure loop and its output is plain greedy decoding's."""
    state = _generate(gamma)
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)  # [B, S], [B]
    starts = np.asarray(state.prompt_lengths)
    got = [tokens[b, starts[b]: lengths[b]].tolist() for b in range(len(PROMPTS))]
    assert got == greedy_reference(_target(), PROMPTS, MAX_NEW)
    assert np.asarray(state.stats.accepted).all()  # every row accepted drafts
    # observe's committed counts add up to every new token but the prefill's first one
    np.testing.assert_array_equal(state.draft_state["committed"], lengths - starts - 1)


@pytest.mark.parametrize("gamma", [2, 3])
def test_draft_receives_teacher_forced_hidden_states(gamma):
    """prefill's and observe's hidden states (inputs 0..n of active rows) equal a teacher-forced
    forward's captured streams over the final sequence, at every position before the last."""
    state = _generate(gamma)
    config, params = _target().config, _target().params
    tokens = state.tokens  # [B, S]
    B, S = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    cache = init_cache(config, B, S, jnp.float32, layout.default())
    _, _, captured, _ = decoder.forward_capture(config, params, tokens, positions, cache, LAYERS)
    captured = np.asarray(captured)  # [B, S, C, D]
    record = np.asarray(state.draft_state["record"])  # [B, S, C, D]
    seen = np.asarray(state.draft_state["seen"])  # [B, S]
    assert record.shape == captured.shape == (B, S, len(LAYERS), config.hidden_size)
    # some iteration accepted all γ drafts, so inputs 0..γ of a verify are all compared
    assert np.asarray(state.stats.accepted_per_position)[:, -1].sum() > 0
    for b, length in enumerate(np.asarray(state.lengths)):
        assert seen[b, : length - 1].all(), f"row {b}: positions without hidden states"
        np.testing.assert_allclose(record[b, : length - 1], captured[b, : length - 1],
                                   atol=1e-4, rtol=0)


def test_plain_decoding_compiles_no_capture():
    """The capture exists only when a draft asks for hidden layers: plain decoding's compiled
    program has no capture_hidden op; the toy's does (positive control)."""
    texts = {}
    for name, draft, gamma in (("plain", None, 0), ("toy", _toy(), 2)):
        spec, args = _args(gamma, draft)
        texts[name] = GENERATE.lower(spec, *args).compile().as_text()
    assert "capture_hidden" in texts["toy"]
    assert "capture_hidden" not in texts["plain"]


def test_speculative_decoder_takes_a_protocol_object():
    """SpeculativeDecoder uses a Draft object as it is, with the draft_params given: exact
    greedy output, and the draft's own forward_calls in its stats (compared with ngram's 0 and
    a model draft's 1 + γ·iterations)."""
    target = _target()
    expected = greedy_reference(target, PROMPTS, 8)
    toy = _toy()
    decoder_ = jaxspec.SpeculativeDecoder(target, toy, num_speculative_tokens=2,
                                          draft_params=target.params)
    out = decoder_.generate(PROMPTS, max_new_tokens=8)
    assert out.tokens == expected
    assert out.stats["draft_forward_calls"] == toy.forward_calls(2, 1) == 0
    sampled = decoder_.generate(PROMPTS, max_new_tokens=8, temperature=1.0)  # one-hot q
    assert [len(t) for t in sampled.tokens] == [8] * len(PROMPTS)
    ngram = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens=2).generate(
        PROMPTS, max_new_tokens=8)
    assert ngram.stats["draft_forward_calls"] == 0
    skip = jaxspec.SpeculativeDecoder(target, "layerskip:1", num_speculative_tokens=2).generate(
        PROMPTS, max_new_tokens=8)
    assert skip.tokens == expected
    assert skip.stats["draft_forward_calls"] == 1 + 2 * (skip.stats["target_forward_calls"] - 1)
