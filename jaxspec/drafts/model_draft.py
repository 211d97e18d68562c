"""Draft = a smaller model sharing the target's tokenizer, with its own KV cache.

Each iteration the draft runs γ forwards. The first one feeds the last two tokens of the
sequence, so the draft cache is complete even after an iteration that accepted all γ drafts
plus a bonus token (the draft never saw its own last proposal, nor the bonus): re-feeding the
second-to-last token rewrites a slot that was either stale or already equal. No branch, any γ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.decode.sampling import Sampler, SamplingValues, first_argmax, probabilities, sample
from jaxspec.drafts.base import Draft, confident, decline_unsure
from jaxspec.models import decoder
from jaxspec.models.cache import KVCache, init_cache
from jaxspec.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelDraft(Draft):
    """State: the draft's KV cache. Params: the draft model's params.

    threshold > 0: a row stops proposing (NO_PROPOSAL from there on) at the first position
    where the draft's own top probability (softmax of its logits) is below it; the dynamic
    loop then skips the verify when no row proposes anything. The draft still runs its γ
    forwards. Output never depends on it (declined positions are never accepted).
    """

    config: ModelConfig
    target_vocab: int  # the draft's distributions are over the target's vocabulary
    threshold: float = 0.0

    @property
    def declines(self) -> bool:
        return self.threshold > 0

    def init_state(self, batch: int, max_len: int, dtype, layout) -> KVCache:
        return init_cache(self.config, batch, max_len, dtype, layout)

    def prefill(self, params, state: KVCache, prompt, prompt_lengths, hidden) -> KVCache:
        """Process prompt[B, P] (right-padded; pad slots are overwritten later)."""
        positions = jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape)
        _, _, state = decoder.run_layers(self.config, params, prompt, positions, state,
                                         prefill=True)
        return state

    def forward_calls(self, gamma: int, iterations: int, state=None) -> int:
        return 1 + gamma * iterations  # the prefill, then γ forwards per iteration

    def _logits(self, params, tokens, positions, cache):
        """Draft logits over the target vocabulary: ids the draft lacks get -inf."""
        hidden, cache = decoder.hidden_states(self.config, params, tokens, positions, cache)
        logits = decoder.logits(params, hidden[:, -1])[:, : self.target_vocab]  # [B, ≤V_t]
        missing = self.target_vocab - logits.shape[-1]
        if missing:
            logits = jnp.pad(logits, ((0, 0), (0, missing)), constant_values=-jnp.inf)
        return logits, cache

    def propose(self, params, state: KVCache, tokens, lengths, *, gamma: int,
                sampler: Sampler, values: SamplingValues, uniforms):
        """Propose γ tokens after tokens[b, :lengths[b]].

        Args: tokens [B, S] buffer, lengths [B] (≥ 2), uniforms [B, γ] for sampling.
        Returns (draft_tokens [B, γ], q [B, γ, V_t] or None when greedy, cache).
        """
        rows = jnp.arange(tokens.shape[0])
        positions = jnp.stack([lengths - 2, lengths - 1], axis=1)  # [B, 2]
        logits, cache = self._logits(params, tokens[rows[:, None], positions], positions, state)

        def choose(logits, u):
            sure = confident(logits, self.threshold) if self.declines else None  # [B]
            if sampler.greedy:
                return first_argmax(logits), None, sure
            q = probabilities(sampler, values, logits)
            return sample(q, u), q, sure

        def step(carry, u):
            cache, logits, position = carry
            token, q, sure = choose(logits, u)
            logits, cache = self._logits(params, token[:, None], position[:, None], cache)
            return (cache, logits, position + 1), (token, q, sure)

        (cache, logits, _), (drafted, qs, sures) = jax.lax.scan(
            step, (cache, logits, lengths), uniforms[:, : gamma - 1].T
        )
        token, q, sure = choose(logits, uniforms[:, gamma - 1])
        draft_tokens = jnp.concatenate([drafted.T, token[:, None]], axis=1)  # [B, γ]
        if self.declines:
            draft_tokens = decline_unsure(draft_tokens,
                                          jnp.concatenate([sures.T, sure[:, None]], axis=1))
        if sampler.greedy:
            return draft_tokens, None, cache
        return draft_tokens, jnp.concatenate([qs.transpose(1, 0, 2), q[:, None]], axis=1), cache
