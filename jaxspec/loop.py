"""The fused decode loop: draft -> verify -> accept, many iterations in one XLA program.

With no draft (γ = 0) the same body is plain autoregressive decoding: the target verifies one
position and the "bonus" token is its ordinary next token.

Two modes share `step`:
  dynamic: `lax.while_loop` until every row is done (CPU, GPU, TPU);
  static:  a fixed number of iterations per call, done rows masked, the host calls again
           (Trainium: neuronx-cc needs static trip counts; also used for streaming).
The body has no `cond`, no data-dependent shapes, no host callbacks and no sort.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxspec import model
from jaxspec.cache import KVCache, init_cache
from jaxspec.config import ModelConfig
from jaxspec.rejection import rejection, rejection_greedy
from jaxspec.sampling import (Sampler, SamplingParams, first_argmax, next_token, probabilities,
                              uniforms)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about a compiled loop (hashable: a jit static argument)."""

    target: ModelConfig
    draft: Any = None  # a draft object (see jaxspec.drafts) or None for plain decoding
    gamma: int = 0  # speculative tokens per iteration (0 without a draft)
    sampler: Sampler = Sampler()
    max_len: int = 256  # token buffer and KV cache slots per row
    dtype: Any = jnp.float32  # KV cache dtype


@struct.dataclass
class Stats:
    """Per-row counters, updated inside the loop."""

    iterations: jax.Array  # [B] verify steps while the row was active
    accepted: jax.Array  # [B] draft tokens accepted by the target
    accepted_per_position: jax.Array  # [B, γ] iterations whose draft i was accepted


@struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, S] prompt then generated tokens
    lengths: jax.Array  # [B] tokens in the buffer
    prompt_lengths: jax.Array  # [B]
    max_new_tokens: jax.Array  # [] i32
    done: jax.Array  # [B] bool
    target_cache: KVCache
    draft_cache: KVCache | None
    rng: jax.Array  # u32[4] lax.rng_bit_generator state, advanced once per sampled iteration
    step: jax.Array  # [] i32 iterations run (any row active)
    stats: Stats


def init_state(spec: LoopSpec, target_params, draft_params, prompt, prompt_lengths, key,
               values: SamplingParams, max_new_tokens) -> DecodeState:
    """Prefill both models and take the first new token from the target.

    Args: prompt [B, P] right-padded, prompt_lengths [B] (≥ 1), max_new_tokens [] (≥ 1),
    key a PRNG key: it seeds the loop's rng_bit_generator state (an "rbg" key keeps the
    whole program free of threefry, for Trainium).
    """
    B, P = prompt.shape
    rows = jnp.arange(B)
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    cache = init_cache(spec.target, B, spec.max_len, spec.dtype)
    hidden, cache = model.hidden_states(spec.target, target_params, prompt, positions, cache)
    last_logits = model.logits(target_params, hidden[rows, prompt_lengths - 1])  # [B, V]
    rng, first_uniforms = uniforms(jax.random.bits(key, (4,), jnp.uint32), (B,))
    first = next_token(spec.sampler, values, last_logits, first_uniforms)
    tokens = jnp.zeros((B, spec.max_len), jnp.int32).at[:, :P].set(prompt)
    tokens = tokens.at[rows, prompt_lengths].set(first)
    draft_cache = None
    if spec.draft is not None:
        draft_cache = spec.draft.init_cache(B, spec.max_len, spec.dtype)
        draft_cache = spec.draft.prefill(draft_params, prompt, draft_cache)
    stats = Stats(iterations=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32),
                  accepted_per_position=jnp.zeros((B, spec.gamma), jnp.int32))
    max_new = jnp.asarray(max_new_tokens, jnp.int32)
    done = _is_eos(spec.target, first) | (max_new <= 1)
    return DecodeState(tokens=tokens, lengths=prompt_lengths + 1, prompt_lengths=prompt_lengths,
                       max_new_tokens=max_new, done=done, target_cache=cache,
                       draft_cache=draft_cache, rng=rng, step=jnp.int32(0), stats=stats)


def _is_eos(config: ModelConfig, tokens: jax.Array) -> jax.Array:
    is_eos = jnp.zeros(tokens.shape, bool)
    for eos in config.eos_token_ids:
        is_eos |= tokens == eos
    return is_eos


def step(spec: LoopSpec, target_params, draft_params, values: SamplingParams,
         state: DecodeState) -> DecodeState:
    """One iteration for every row: propose γ, verify γ+1 positions, accept, commit."""
    B, gamma = state.lengths.shape[0], spec.gamma
    # uniforms [B, 2γ+1]: γ for the draft, γ + 1 to accept (greedy decoding draws none)
    rng, u = state.rng, jnp.zeros((B, 2 * gamma + 1), jnp.float32)
    if not spec.sampler.greedy:
        rng, u = uniforms(state.rng, (B, 2 * gamma + 1))
    # 1. draft: γ tokens per row and their distributions q [B, γ, V]
    draft_tokens, q, draft_cache = jnp.zeros((B, 0), jnp.int32), None, state.draft_cache
    if spec.draft is not None:
        draft_tokens, q, draft_cache = spec.draft.propose(
            draft_params, draft_cache, state.tokens, state.lengths, gamma=gamma,
            sampler=spec.sampler, values=values, uniforms=u[:, :gamma])
    # 2. verify: the target reads the last token and the drafts at γ+1 positions
    last = state.tokens[jnp.arange(B), state.lengths - 1]
    verify = jnp.concatenate([last[:, None], draft_tokens], axis=1)  # [B, γ+1]
    positions = state.lengths[:, None] - 1 + jnp.arange(gamma + 1)  # [B, γ+1]
    logits, _, target_cache = model.forward(spec.target, target_params, verify, positions,
                                            state.target_cache)
    # 3. accept: n [B] drafts accepted, out [B, γ+1] tokens (n + 1 valid per row)
    if spec.sampler.greedy:
        n, out = rejection_greedy(draft_tokens, first_argmax(logits))
    else:
        p = probabilities(spec.sampler, values, logits)
        q = q if q is not None else jnp.zeros((B, 0, p.shape[-1]), p.dtype)
        n, out = rejection(draft_tokens, q, p, u[:, gamma:])
    # 4. commit with masks; caches are not copied or rolled back
    state = state.replace(target_cache=target_cache, draft_cache=draft_cache, rng=rng)
    return _commit(spec, state, n, out)


def _commit(spec: LoopSpec, state: DecodeState, n, out) -> DecodeState:
    """Append up to n + 1 tokens per row, cut at the first EOS and at max_new_tokens."""
    B, width = out.shape
    iota = jnp.arange(width, dtype=jnp.int32)[None]  # [1, γ+1]
    active = ~state.done
    eos = _is_eos(spec.target, out) & (iota <= n[:, None])
    first_eos = jnp.min(jnp.where(eos, iota, width), axis=-1)
    room = state.max_new_tokens - (state.lengths - state.prompt_lengths)
    count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), room)
    count = jnp.where(active, count, 0)  # [B] tokens appended
    rows = jnp.arange(B)[:, None]
    slots = state.lengths[:, None] + iota  # [B, γ+1] where this iteration's tokens go
    tokens = state.tokens.at[rows, slots].set(
        jnp.where(iota < count[:, None], out, state.tokens[rows, slots]))
    lengths = state.lengths + count
    generated = lengths - state.prompt_lengths
    done = state.done | (first_eos < count) | (generated >= state.max_new_tokens)
    stats = state.stats
    stats = Stats(
        iterations=stats.iterations + active,
        accepted=stats.accepted + jnp.where(active, n, 0),
        accepted_per_position=stats.accepted_per_position
        + (active[:, None] & (iota[:, :-1] < n[:, None])),
    )
    return state.replace(tokens=tokens, lengths=lengths, done=done, step=state.step + 1,
                         stats=stats)


def run_dynamic(spec: LoopSpec, target_params, draft_params, values, state) -> DecodeState:
    """Iterate until every row is done (one `lax.while_loop`)."""
    body = lambda s: step(spec, target_params, draft_params, values, s)  # noqa: E731
    return jax.lax.while_loop(lambda s: jnp.any(~s.done), body, state)


def run_static(spec: LoopSpec, target_params, draft_params, values, state, *,
               iterations: int) -> DecodeState:
    """Run exactly `iterations` iterations; rows already done are left unchanged."""
    body = lambda _, s: step(spec, target_params, draft_params, values, s)  # noqa: E731
    return jax.lax.fori_loop(0, iterations, body, state)


def generate(spec: LoopSpec, target_params, draft_params, prompt, prompt_lengths, key,
             values: SamplingParams, max_new_tokens) -> DecodeState:
    """The whole generation as one pure function (prefill + dynamic loop).

    Users may wrap it in their own `jax.jit` with `spec` static. Shapes: prompt [B, P]
    right-padded, prompt_lengths [B]; the result's tokens[b, prompt_lengths[b]:lengths[b]]
    are row b's new tokens.
    """
    state = init_state(spec, target_params, draft_params, prompt, prompt_lengths, key, values,
                       max_new_tokens)
    return run_dynamic(spec, target_params, draft_params, values, state)
