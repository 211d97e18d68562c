"""Model-free draft: n-gram lookup over the row's own tokens (prompt lookup decoding).

The last n tokens of each row are searched for earlier in the same row (prompt and generated
text); the tokens that followed the most recent match are proposed. Sizes n, n-1, ..., 1 are
tried in that order. A continuation that runs into the present repeats the matched text
periodically (after [1 2 1 2], [1 2] matched two tokens back: 1 2 1 2 ...). No match declines
(NO_PROPOSAL): the dynamic loop then runs a plain one-position step instead of verifying γ + 1
guesses. The draft's distribution q is one-hot, so acceptance is u < p(x) and exactness holds
whatever is proposed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.drafts.base import NO_PROPOSAL, Draft


@dataclasses.dataclass(frozen=True)
class NgramDraft(Draft):
    """No params, no state, no forward passes."""

    max_ngram: int  # longest suffix to match (≥ 1)
    target_vocab: int
    declines = True

    def _latest_match(self, tokens: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
        """[B] end index j < L-1 of the latest earlier occurrence of the last `size` tokens,
        or -1."""
        B, S = tokens.shape
        rows, iota = jnp.arange(B)[:, None], jnp.arange(S)[None]
        match = (iota >= size - 1) & (iota <= lengths[:, None] - 2)  # [B, S]
        for i in range(size):  # tokens[j - i] == tokens[L - 1 - i]
            suffix = tokens[rows, jnp.maximum(lengths[:, None] - 1 - i, 0)]  # [B, 1]
            match &= jnp.roll(tokens, i, axis=1) == suffix
        return jnp.max(jnp.where(match, iota, -1), axis=1)

    def match(self, tokens: jax.Array, lengths: jax.Array, min_size: int = 1) -> jax.Array:
        """[B] end index of the latest earlier occurrence of the longest suffix of each row,
        of max_ngram down to min_size tokens, or -1 (no such match)."""
        best = jnp.full(lengths.shape, -1, jnp.int32)
        for size in range(self.max_ngram, min_size - 1, -1):  # prefer the longest suffix
            best = jnp.where(best < 0, self._latest_match(tokens, lengths, size), best)
        return best

    @staticmethod
    def continuation(tokens: jax.Array, lengths: jax.Array, best: jax.Array,
                     gamma: int) -> jax.Array:
        """[B, γ] the tokens that followed the match ending at best[B] (NO_PROPOSAL where
        best < 0)."""
        last = lengths[:, None] - 1  # [B, 1]
        follow = best[:, None] + 1 + jnp.arange(gamma)  # [B, γ] positions after the match
        period = jnp.maximum(last - best[:, None], 1)  # the match ended `period` tokens back
        follow = jnp.where(follow > last, last - period + 1 + (follow - last - 1) % period,
                           follow)  # past the present: the matched text again, periodically
        draft_tokens = jnp.take_along_axis(tokens, jnp.clip(follow, 0, last), axis=1)
        return jnp.where(best[:, None] < 0, NO_PROPOSAL, draft_tokens)

    def propose(self, params, state, tokens, lengths, *, gamma: int, sampler, values, uniforms):
        """Args: tokens [B, S], lengths [B]. Returns (draft_tokens [B, γ], one-hot q or None,
        state)."""
        draft_tokens = self.continuation(tokens, lengths, self.match(tokens, lengths), gamma)
        if sampler.greedy:
            return draft_tokens, None, state
        return draft_tokens, self.one_hot(draft_tokens), state

    def one_hot(self, draft_tokens: jax.Array) -> jax.Array:
        """q [B, γ, V] of proposals [B, γ]: all mass on the proposed token."""
        return jax.nn.one_hot(jnp.maximum(draft_tokens, 0), self.target_vocab)
