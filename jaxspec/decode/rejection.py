"""Exact speculative rejection sampling (the reference for backend kernels).

Contract (DESIGN.md): given γ draft tokens with the draft's distributions q and the target's
distributions p at the γ+1 verified positions, token i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the replacement is drawn from
norm(max(0, p_i - q_i)); if all γ are accepted, a bonus token is drawn from p_γ. The output then
follows p exactly, whatever q is. Uniforms are an explicit input so that kernels can be checked
against this function on identical inputs.

Pure jax.numpy, vectorised over rows, no Python loop over positions, no host sync.

`Rejection` is the seam: the loop's static spec names the implementation it calls
(`LoopSpec.rejection`, default `REFERENCE`); `jaxspec.kernels` holds the others and picks one
per backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxspec.decode.sampling import first_argmax, sample


def leading_true(accept: jax.Array) -> jax.Array:
    """Number of leading True values per row of accept[B, γ] -> [B] (first False via iota/min)."""
    gamma = accept.shape[-1]
    iota = jnp.arange(gamma, dtype=jnp.int32)
    return jnp.min(jnp.where(accept, gamma, iota), axis=-1, initial=gamma).astype(jnp.int32)


def _row(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x[B, N, V], index[B] -> [B, V]."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def rejection(draft_tokens, q, p, uniforms):
    """Accept or reject the draft; return (n_accepted[B], tokens[B, γ+1]).

    Args:
      draft_tokens: [B, γ] int32, the draft's proposals (drawn from q).
      q: [B, γ, V] draft probabilities (one-hot for model-free drafts).
      p: [B, γ+1, V] target probabilities at the γ+1 verified positions.
      uniforms: [B, γ+1] in [0, 1): columns 0..γ-1 decide acceptance, column γ draws the
        replacement (or bonus) token.

    tokens[b, :n[b]] are the accepted drafts and tokens[b, n[b]] is the replacement or bonus
    token; entries after n[b] are unspecified. Every row emits n[b] + 1 tokens.
    """
    gamma = draft_tokens.shape[1]
    # 1. probabilities of each draft token under both models: [B, γ]
    p_x = jnp.take_along_axis(p[:, :gamma], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    # 2. accept while u < p/q, written without a division
    n = leading_true(uniforms[:, :gamma] * q_x < p_x)
    # 3. residual at the first rejected position (q is zero past the drafts: the bonus is p_γ)
    p_n = _row(p, n)
    q_n = _row(q, jnp.minimum(n, gamma - 1)) * (n < gamma)[:, None] if gamma else 0.0
    residual = jnp.maximum(p_n - q_n, 0.0)
    # 4. a zero residual can only come from p == q up to rounding: fall back to p itself
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    last = sample(residual, uniforms[:, gamma])
    return n, _emit(draft_tokens, n, last)


def rejection_greedy(draft_tokens, target_tokens):
    """Greedy limit: accept while the draft equals the target's argmax.

    Args:
      draft_tokens: [B, γ]; target_tokens: [B, γ+1] argmax of the target at each position.
    Returns (n_accepted[B], tokens[B, γ+1]); the tokens are the target's own argmaxes.
    """
    gamma = draft_tokens.shape[1]
    n = leading_true(draft_tokens == target_tokens[:, :gamma])
    return n, target_tokens


def greedy_from_logits(draft_tokens, logits):
    """The greedy seam: draft_tokens [B, γ], the target's logits [B, γ+1, V] -> (n [B],
    tokens [B, γ+1]), the first argmax at each position (a backend kernel may take it)."""
    return rejection_greedy(draft_tokens, first_argmax(logits))


def _emit(draft_tokens: jax.Array, n: jax.Array, last: jax.Array) -> jax.Array:
    """[B, γ+1]: draft tokens before position n, `last` from position n on."""
    padded = jnp.concatenate([draft_tokens, last[:, None]], axis=1)
    iota = jnp.arange(padded.shape[1], dtype=jnp.int32)
    return jnp.where(iota[None] < n[:, None], padded, last[:, None]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One implementation of the rejection contract (hashable: part of the loop's static spec).

    sampled(draft_tokens[B, γ], q[B, γ, V], p[B, γ+1, V], uniforms[B, γ+1])
        -> (n[B], tokens[B, γ+1])
    greedy(draft_tokens[B, γ], logits[B, γ+1, V]) -> (n[B], tokens[B, γ+1])
    """

    name: str
    sampled: Callable
    greedy: Callable


REFERENCE = Rejection("reference", sampled=rejection, greedy=greedy_from_logits)
