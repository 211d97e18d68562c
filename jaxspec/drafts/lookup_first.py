"""Prompt lookup first, a model draft elsewhere: per row and iteration, the n-gram draft's
proposals where the row's last tokens occurred earlier in it (at least `min_match` of them),
the model draft's (e.g. the trained head) where they did not.

Small models repeat themselves and copy from their prompts (code, extraction, summaries);
there a lookup continues a repeat further than a learned draft predicts it, and costs no
forward pass. With the shipped head as the fallback, on the benchmark's 32 prompts: 1.27–1.37×
plain decoding against the head alone's 1.05×, at least 1.21× in every category (README,
"Prompt lookup first").

Exactness: which draft proposes for a row is a function of its committed tokens only, so the
proposal's distribution q is well defined: one-hot for a lookup, the model draft's own q
otherwise; rejection sampling keeps the target's distribution either way. The model draft
observes every verify, so its state is the one it would have alone. Where every row looks up,
a model draft whose proposals keep its state (the head: `proposals_keep_state`) is left out
of the iteration (`lax.cond`; its state is the same either way, so are the tokens); others
propose every iteration. `skip_fallback=False` never leaves it out: no `cond` in the program,
for Trainium, whose compiler takes none (api.resolve_draft sets it from the device).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxspec import pytree
from jaxspec.drafts.base import Draft
from jaxspec.drafts.ngram import NgramDraft

MIN_MATCH = 2  # measured: with 1 token chat loses, with 3 the other categories (README)


@pytree.dataclass
class LookupState:
    fallback: Any  # the fallback's own state
    skipped: jax.Array  # [] i32 iterations in which the fallback's proposals were left out


@dataclasses.dataclass(frozen=True)
class LookupFirst(Draft):
    """`lookup`'s proposals where a suffix of at least `min_match` tokens matched, else
    `fallback`'s. `gamma`: the γ measured best for the pair (the API's default)."""

    fallback: Draft
    lookup: NgramDraft
    min_match: int = MIN_MATCH
    gamma: int = 4
    skip_fallback: bool = True  # leave the fallback out where every row looks up (if it can)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(self.fallback.hidden_layers)

    @property
    def declines(self) -> bool:
        return bool(self.fallback.declines)

    @property
    def _skips(self) -> bool:
        return self.skip_fallback and getattr(self.fallback, "proposals_keep_state", False)

    def init_state(self, batch, max_len, dtype, layout) -> LookupState:
        return LookupState(self.fallback.init_state(batch, max_len, dtype, layout),
                           jnp.int32(0))

    def prefill(self, params, state: LookupState, prompt, prompt_lengths, hidden):
        inner = self.fallback.prefill(params, state.fallback, prompt, prompt_lengths, hidden)
        return state.replace(fallback=inner)

    def observe(self, params, state: LookupState, observation):
        return state.replace(fallback=self.fallback.observe(params, state.fallback, observation))

    def forward_calls(self, gamma: int, iterations: int, state: LookupState = None) -> int:
        """The fallback's passes, less those of the iterations that left its proposals out
        (counted in `state`; without it, as if none had)."""
        calls = self.fallback.forward_calls(gamma, iterations)
        if state is None:
            return calls
        skipped = int(state.skipped)
        return calls - (self.fallback.forward_calls(gamma, skipped)
                        - self.fallback.forward_calls(0, skipped))

    def propose(self, params, state: LookupState, tokens, lengths, *, gamma: int, sampler,
                values, uniforms):
        """(draft_tokens [B, γ], q [B, γ, V] or None, state): a row's lookup where it matched,
        the fallback's proposals elsewhere."""
        best = self.lookup.match(tokens, lengths, min(self.min_match, self.lookup.max_ngram))
        found = best >= 0  # [B]
        looked = self.lookup.continuation(tokens, lengths, best, gamma)  # [B, γ]

        def fallback(inner):
            return self.fallback.propose(params, inner, tokens, lengths, gamma=gamma,
                                         sampler=sampler, values=values, uniforms=uniforms)

        if self._skips:  # the state comes back as given: only the tokens and q
            proposals = lambda inner: fallback(inner)[:2]  # noqa: E731
            left_out = lambda inner: jax.tree.map(  # noqa: E731  zeros of the same shapes
                lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(proposals, inner))
            every = jnp.all(found)
            drafted, q = jax.lax.cond(every, left_out, proposals, state.fallback)
            state = state.replace(skipped=state.skipped + every)
        else:
            drafted, q, inner = fallback(state.fallback)
            state = state.replace(fallback=inner)
        draft_tokens = jnp.where(found[:, None], looked, drafted)
        if q is not None:
            q = jnp.where(found[:, None, None], self.lookup.one_hot(looked), q)
        return draft_tokens, q, state
