"""The draft protocol: what the loop asks of anything that proposes tokens.

A draft is a static, hashable object (part of the loop's jit-static spec) whose arrays live in
two places the loop carries: its params (an argument of the compiled loop, None for model-free
drafts) and its state (an opaque pytree: a KV cache, recent hidden states, nothing). Each
iteration the loop calls `propose`, verifies with the target, then calls `observe` with what
the target produced. Shapes: B rows, S buffer slots, γ drafts per iteration, V the target's
vocabulary, C = len(hidden_layers), D the target's hidden size.

Subclass `Draft` for the defaults (no hidden states, no-op prefill and observe), or give any
frozen dataclass every member, `hidden_layers` included (the protocol is runtime-checkable:
that is how the API tells a draft object from a loaded model). Optional: a draft whose
`propose` returns the state it was given sets `proposals_keep_state = True`, and a draft
combining others may then leave its proposals out of an iteration (drafts.lookup_first).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxspec import pytree

State = Any  # a pytree (or None), owned by the draft
NO_PROPOSAL = -1  # a draft token meaning "no proposal here" (see Draft.propose)


@pytree.dataclass
class Observation:
    """What one verify produced, as a draft's `observe` receives it."""

    n_accepted: jax.Array  # [B] drafts the target accepted (0..γ)
    tokens: jax.Array  # [B, γ+1] verified inputs: the last committed token, then the γ drafts
    #                    (NO_PROPOSAL where the draft declined)
    positions: jax.Array  # [B, γ+1] positions of `tokens`
    emitted: jax.Array  # [B, γ+1] output: emitted[b, :n+1] are the accepted drafts, then the
    #                     target's replacement or bonus token
    committed: jax.Array  # [B] how many of `emitted` the row keeps (≤ n + 1: cut after an EOS
    #                       and at max_new_tokens; 0 for rows that were already done)
    active: jax.Array  # [B] rows that were still generating in this iteration
    hidden: jax.Array | None  # [B, γ+1, C, D] target residual streams at `positions` entering
    #                           each layer in `hidden_layers` (None when it asks for none).
    #                           Rows of inputs past tokens[:, n] saw rejected drafts.


def confident(logits: jax.Array, threshold: float) -> jax.Array:
    """[B]: the draft's top probability (softmax of logits [B, V]) reaches `threshold`."""
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= threshold


def decline_unsure(draft_tokens: jax.Array, sure: jax.Array) -> jax.Array:
    """draft_tokens [B, γ] with NO_PROPOSAL from each row's first unsure position (sure [B, γ])
    on: the rule of drafts that stop proposing when unsure."""
    kept = jnp.cumprod(sure, axis=1).astype(bool)
    return jnp.where(kept, draft_tokens, NO_PROPOSAL)


@runtime_checkable
class Draft(Protocol):
    """Proposes γ tokens per iteration for the target to verify."""

    # Target layers whose input residual stream the draft receives (0 = embeddings, L = the last
    # layer's output), fixed statically: the target's forward captures them only when asked.
    hidden_layers: tuple[int, ...] = ()
    # Whether `propose` may decline (NO_PROPOSAL). The dynamic loop then verifies one position
    # instead of γ+1 in iterations where no active row proposes anything.
    declines: bool = False

    def init_state(self, batch: int, max_len: int, dtype, layout) -> State:
        """A fresh state for `batch` rows of `max_len` slots (layout: models.layout.Layout)."""
        return None

    def prefill(self, params, state: State, prompt: jax.Array, prompt_lengths: jax.Array,
                hidden: jax.Array | None) -> State:
        """Take in prompt[B, P] (right-padded to P, prompt_lengths[B] real tokens) and the
        target's hidden[B, P, C, D] at the prompt positions (None without hidden_layers).
        Positions at or past prompt_lengths[b] are padding: their hidden states are not the
        prompt's, and the buffer slots they occupy are overwritten later."""
        return state

    def propose(self, params, state: State, tokens: jax.Array, lengths: jax.Array, *,
                gamma: int, sampler, values, uniforms: jax.Array):
        """γ proposals after tokens[b, :lengths[b]] (tokens [B, S], lengths [B] ≥ 2).

        sampler/values: jaxspec.decode.sampling's Sampler and SamplingValues, to be applied to
        the draft's logits exactly as to the target's; uniforms [B, γ] for sampled drafting.
        Returns (draft_tokens [B, γ] int32, q [B, γ, V] the distributions they were drawn
        from, or None when greedy, new state). A row may decline from some position on by
        filling the rest of its row with NO_PROPOSAL (only drafts with `declines`): those
        positions are never accepted, and q there is ignored.
        """
        ...

    def observe(self, params, state: State, observation: Observation) -> State:
        """Update the state with what the target verified (see `Observation`)."""
        return state

    def forward_calls(self, gamma: int, iterations: int, state: State = None) -> int:
        """Forward passes the draft ran for a prefill and `iterations` iterations (statistics);
        `state`: its final state, for drafts whose count depends on the text (None: unknown)."""
        return 0
