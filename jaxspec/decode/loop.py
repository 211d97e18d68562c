"""The fused decode loop: draft -> verify -> accept, many iterations in one XLA program.

With no draft (γ = 0) the same body is plain autoregressive decoding: the target verifies one
position and the "bonus" token is its ordinary next token.

Three modes share `step`:
  dynamic: `lax.while_loop` until every row is done (CPU, GPU, TPU);
  chunked: the same loop, stopped after at most N iterations; the host calls again (streaming:
           the CLI off Trainium);
  static:  a fixed number of iterations per call, done rows masked, the host calls again
           (Trainium: neuronx-cc needs static trip counts).
The body has no `cond` of its own (a draft may have one off Trainium: drafts.lookup_first),
no data-dependent shapes, no host callbacks and no sort.
A row is done at an EOS id, at max_new_tokens, or when its buffer has no room for another
iteration (which a spec sized with decode.sizing.loop_max_len never reaches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxspec.decode.sampling import (SamplingValues, first_argmax, next_token, probabilities,
                                     row_seeds, sample, uniforms)
from jaxspec.decode.rejection import leading_true
from jaxspec.decode.sizing import required_len
from jaxspec.decode.state import DecodeState, LoopSpec, Stats
from jaxspec.drafts.base import NO_PROPOSAL, Observation
from jaxspec.models import decoder, sharding
from jaxspec.models.cache import init_cache
from jaxspec.models.config import ModelConfig


def init_state(spec: LoopSpec, target_params, draft_params, prompt, prompt_lengths, key,
               values: SamplingValues, max_new_tokens) -> DecodeState:
    """Prefill both models and take the first new token from the target.

    Args: prompt [B, P] right-padded, prompt_lengths [B] (≥ 1), max_new_tokens [] (≥ 1),
    key a PRNG key (rows get distinct seeds derived from it and their row index; an "rbg"
    key keeps the whole program free of threefry, for Trainium) or integer seeds [B], one
    per row (sampling.row_seeds). Row b's uniforms depend only on its seed and the
    iteration: the first token draws at counter 0, iteration `step` at step + 1.
    """
    B, P = prompt.shape
    _check_room(spec, P, max_new_tokens)
    rows = jnp.arange(B)
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    cache = init_cache(spec.target, B, spec.max_len, spec.dtype, spec.layout)
    if spec.mesh is not None:
        cache = sharding.constrain_cache(cache, spec.mesh)
    hidden, captured, cache = decoder.run_layers(spec.target, target_params, prompt, positions,
                                                 cache, spec.hidden_layers, prefill=True)
    last_logits = decoder.logits(target_params, hidden[rows, prompt_lengths - 1])  # [B, V]
    seeds = row_seeds(key, B)  # [B, 2]
    first = next_token(spec.sampler, values, last_logits, uniforms(seeds, 0, 1)[:, 0])
    tokens = jnp.zeros((B, spec.max_len), jnp.int32).at[:, :P].set(prompt)
    tokens = tokens.at[rows, prompt_lengths].set(first)
    if spec.mesh is not None:
        tokens = jax.lax.with_sharding_constraint(tokens, sharding.rows(spec.mesh))
    draft_state = None
    if spec.draft is not None:
        draft_state = spec.draft.init_state(B, spec.max_len, spec.dtype, spec.layout)
        draft_state = spec.draft.prefill(draft_params, draft_state, prompt, prompt_lengths,
                                         captured)
    stats = Stats(iterations=jnp.zeros((B,), jnp.int32), proposed=jnp.zeros((B,), jnp.int32),
                  verified=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32),
                  accepted_per_position=jnp.zeros((B, spec.gamma), jnp.int32))
    max_new = jnp.asarray(max_new_tokens, jnp.int32)
    lengths = prompt_lengths + 1
    done = _is_eos(spec.target, first) | (max_new <= 1) | _full(spec, lengths)
    return DecodeState(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths,
                       max_new_tokens=max_new, done=done, target_cache=cache,
                       draft_state=draft_state, seeds=seeds, step=jnp.int32(0), stats=stats)


def _check_room(spec: LoopSpec, prompt_width: int, max_new_tokens) -> None:
    """Refuse a max_len too small for the prompt (and max_new_tokens, when it is concrete)."""
    try:
        new = int(max_new_tokens)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        new = 1  # traced: only the prompt can be checked here
    need = required_len(prompt_width, new, spec.gamma)
    if need > spec.max_len:
        raise ValueError(f"LoopSpec.max_len={spec.max_len} is too small: a prompt of width "
                         f"{prompt_width}, max_new_tokens={new} and γ={spec.gamma} need {need} "
                         "(use jaxspec.decode.sizing.loop_max_len)")


def _full(spec: LoopSpec, lengths: jax.Array) -> jax.Array:
    """[B] rows whose buffer cannot take another iteration's γ + 1 tokens."""
    return lengths + spec.gamma + 1 > spec.max_len


def _is_eos(config: ModelConfig, tokens: jax.Array) -> jax.Array:
    is_eos = jnp.zeros(tokens.shape, bool)
    for eos in config.eos_token_ids:
        is_eos |= tokens == eos
    return is_eos


def step(spec: LoopSpec, target_params, draft_params, values: SamplingValues,
         state: DecodeState, *, one_position: bool = False, proposal=None) -> DecodeState:
    """One iteration for every row: propose γ, verify γ+1 positions, accept, observe, commit.

    A draft may decline positions (NO_PROPOSAL from the first declined one on). With
    `one_position` (for iterations where no active row proposes anything: see run_dynamic) the
    target verifies the first position only, a plain decoding step. `proposal`: this
    iteration's (draft_tokens, q, uniforms), already proposed from `state`, whose draft state
    is then the one that proposal left (see `_proposed`).
    """
    B, gamma = state.lengths.shape[0], spec.gamma
    # 1. draft: γ tokens per row and their distributions q [B, γ, V]; uniforms [B, 2γ+1]
    if proposal is None:
        draft_tokens, q, draft_state, u = _propose(spec, draft_params, values, state)
    else:
        (draft_tokens, q, u), draft_state = proposal, state.draft_state
    proposed = proposal_lengths(draft_tokens)  # [B]
    # 2-3. verify the last token and the drafts at γ+1 positions, accept: n [B] drafts accepted,
    # out [B, γ+1] tokens (n + 1 valid per row), captured [B, γ+1, C, D] or None
    last = state.tokens[jnp.arange(B), state.lengths - 1]
    verify = jnp.concatenate([last[:, None], draft_tokens], axis=1)  # [B, γ+1]
    positions = state.lengths[:, None] - 1 + jnp.arange(gamma + 1)  # [B, γ+1]
    verify_positions = _verify_one if one_position else _verify
    n, out, captured, target_cache = verify_positions(
        spec, target_params, values, state.target_cache, verify, positions, proposed, q, u)
    count, eos_stop = _appended(spec, state, n, out)
    # 4. the draft sees what the target made of its proposals
    if spec.draft is not None:
        draft_state = spec.draft.observe(draft_params, draft_state, Observation(
            n_accepted=n, tokens=verify, positions=positions, emitted=out,
            committed=count, active=~state.done, hidden=captured))
    # 5. commit with masks; caches are not copied or rolled back
    state = state.replace(target_cache=target_cache, draft_state=draft_state)
    verified = 1 if one_position else gamma + 1  # positions the target computed per row
    return _commit(spec, state, n, out, count, eos_stop, proposed, verified)


def _propose(spec: LoopSpec, draft_params, values, state: DecodeState):
    """(draft_tokens [B, γ], q [B, γ, V] or None, draft state, uniforms [B, 2γ+1]): γ for the
    draft, γ + 1 to accept (zeros when greedy); a pure function of the state."""
    B, gamma = state.lengths.shape[0], spec.gamma
    u = jnp.zeros((B, 2 * gamma + 1), jnp.float32)
    if not spec.sampler.greedy:
        u = uniforms(state.seeds, state.step + 1, 2 * gamma + 1)
    if spec.draft is None:
        return jnp.zeros((B, 0), jnp.int32), None, state.draft_state, u
    draft_tokens, q, draft_state = spec.draft.propose(
        draft_params, state.draft_state, state.tokens, state.lengths, gamma=gamma,
        sampler=spec.sampler, values=values, uniforms=u[:, :gamma])
    return draft_tokens, q, draft_state, u


def proposal_lengths(draft_tokens: jax.Array) -> jax.Array:
    """[B] proposals per row: draft_tokens[B, γ] up to the first NO_PROPOSAL."""
    return leading_true(draft_tokens != NO_PROPOSAL)


def _verify(spec: LoopSpec, target_params, values, cache, verify, positions, proposed, q, u):
    """The target on all γ+1 positions, then rejection sampling of the proposals.

    Declined positions are never accepted: greedily, NO_PROPOSAL equals no argmax; sampled, a
    row whose n reaches its proposal count takes its next token from p there (the bonus of a
    γ = proposed[b] iteration; the rejection kernel sees token 0 in declined slots).
    """
    B, gamma = verify.shape[0], verify.shape[1] - 1
    draft_tokens = verify[:, 1:]
    logits, _, captured, cache = decoder.forward_capture(
        spec.target, target_params, verify, positions, cache, spec.hidden_layers)
    if spec.sampler.greedy:
        n, out = spec.rejection.greedy(draft_tokens, logits)
        return n, out, captured, cache
    p = probabilities(spec.sampler, values, logits)  # [B, γ+1, V]
    q = q if q is not None else jnp.zeros((B, 0, p.shape[-1]), p.dtype)
    n, out = spec.rejection.sampled(jnp.maximum(draft_tokens, 0), q, p, u[:, gamma:])
    if gamma:
        stop = n >= proposed  # [B] every proposal accepted (or none made)
        bonus = sample(jnp.take_along_axis(p, proposed[:, None, None], axis=1)[:, 0],
                       u[:, 2 * gamma])  # the rejection's replacement uniform
        n = jnp.where(stop, proposed, n)
        iota = jnp.arange(gamma + 1, dtype=jnp.int32)[None]
        out = jnp.where(stop[:, None] & (iota == proposed[:, None]), bonus[:, None], out)
    return n, out, captured, cache


def _verify_one(spec: LoopSpec, target_params, values, cache, verify, positions, proposed, q,
                u):
    """`_verify` when no row proposed anything: the target on the first position only."""
    B, width = verify.shape
    logits, _, captured, cache = decoder.forward_capture(
        spec.target, target_params, verify[:, :1], positions[:, :1], cache, spec.hidden_layers)
    if spec.sampler.greedy:
        token = first_argmax(logits)[:, 0]
    else:
        token = sample(probabilities(spec.sampler, values, logits)[:, 0],
                       u[:, 2 * (width - 1)])  # as _verify's replacement
    if captured is not None:  # [B, 1, C, D] -> [B, γ+1, C, D]
        captured = jnp.pad(captured, ((0, 0), (0, width - 1), (0, 0), (0, 0)))
    out = jnp.broadcast_to(token[:, None], (B, width)).astype(jnp.int32)
    return jnp.zeros((B,), jnp.int32), out, captured, cache


def _appended(spec: LoopSpec, state: DecodeState, n, out):
    """(count [B], eos_stop [B]): each row appends up to n + 1 of out's tokens, cut after its
    first EOS and at max_new_tokens (0 for rows already done); eos_stop: the cut was an EOS."""
    width = out.shape[1]
    iota = jnp.arange(width, dtype=jnp.int32)[None]  # [1, γ+1]
    eos = _is_eos(spec.target, out) & (iota <= n[:, None])
    first_eos = jnp.min(jnp.where(eos, iota, width), axis=-1)
    room = state.max_new_tokens - (state.lengths - state.prompt_lengths)
    count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), room)
    count = jnp.where(state.done, 0, count)
    return count, first_eos < count


def _commit(spec: LoopSpec, state: DecodeState, n, out, count, eos_stop, proposed,
            verified: int) -> DecodeState:
    """Append count[b] of out's tokens to row b; update lengths, done flags and statistics
    (`verified`: the positions the target computed per row this iteration)."""
    B, width = out.shape
    iota = jnp.arange(width, dtype=jnp.int32)[None]  # [1, γ+1]
    active = ~state.done
    rows = jnp.arange(B)[:, None]
    slots = state.lengths[:, None] + iota  # [B, γ+1] where this iteration's tokens go
    tokens = state.tokens.at[rows, slots].set(
        jnp.where(iota < count[:, None], out, state.tokens[rows, slots]))
    lengths = state.lengths + count
    generated = lengths - state.prompt_lengths
    done = (state.done | eos_stop | (generated >= state.max_new_tokens)
            | _full(spec, lengths))
    stats = state.stats
    stats = Stats(
        iterations=stats.iterations + active,
        proposed=stats.proposed + jnp.where(active, proposed, 0),
        verified=stats.verified + jnp.where(active, verified, 0),
        accepted=stats.accepted + jnp.where(active, n, 0),
        accepted_per_position=stats.accepted_per_position
        + (active[:, None] & (iota[:, :-1] < n[:, None])),
    )
    return state.replace(tokens=tokens, lengths=lengths, done=done, step=state.step + 1,
                         stats=stats)


def run_dynamic(spec: LoopSpec, target_params, draft_params, values, state) -> DecodeState:
    """Iterate until every row is done (one `lax.while_loop`).

    With a draft that declines, each iteration of the outer loop is one γ+1-position step and
    then an inner loop of one-position steps while no active row proposes anything. The next
    iteration's proposal is made once, after each step, and carried (the inner loop's
    condition reads it). Two loops rather than a `lax.cond` between the widths: XLA copies the
    KV cache into and out of a conditional (measured: about 10% of an n-gram run on a
    copy-heavy prompt).
    """
    carry = start_chunks(spec, draft_params, values, state)
    return _iterate(spec, target_params, draft_params, values, carry, limit=None)[0]


def init_chunks(spec: LoopSpec, target_params, draft_params, prompt, prompt_lengths, key,
                values: SamplingValues, max_new_tokens):
    """init_state, as the carry of run_chunk (chunked mode's first program)."""
    state = init_state(spec, target_params, draft_params, prompt, prompt_lengths, key, values,
                       max_new_tokens)
    return start_chunks(spec, draft_params, values, state)


def start_chunks(spec: LoopSpec, draft_params, values, state: DecodeState):
    """The carry of `run_chunk`: (state, the next iteration's proposal, or None for a draft
    that never declines)."""
    if not getattr(spec.draft, "declines", False):
        return state, None
    return _proposed(spec, draft_params, values, state)


def run_chunk(spec: LoopSpec, target_params, draft_params, values, carry, *,
              iterations: int):
    """`run_dynamic` for at most `iterations` iterations (fewer when every row is done first):
    chunked mode, the host calls again with the returned carry (start_chunks). The carried
    proposal, and resuming inside run_dynamic's inner loop where a chunk stopped in it, make
    the chunks' iterations exactly those of one run_dynamic."""
    limit = carry[0].step + iterations
    return _iterate(spec, target_params, draft_params, values, carry, limit=limit)


def _iterate(spec: LoopSpec, target_params, draft_params, values, carry, limit):
    """run_dynamic's loops over carry (state, proposal) until every row is done or the
    state's step count reaches `limit` (None: no limit, from the first iteration; else
    resuming after `carry[0].step` iterations)."""
    body = functools.partial(step, spec, target_params, draft_params, values)

    def active(s):
        running = jnp.any(~s.done)
        return running if limit is None else running & (s.step < limit)

    if carry[1] is None:
        return jax.lax.while_loop(lambda c: active(c[0]), lambda c: (body(c[0]), None), carry)
    proposed = functools.partial(_proposed, spec, draft_params, values)

    def nothing_proposed(carry):
        s, (draft_tokens, _, _) = carry
        return active(s) & ~jnp.any(~s.done & (proposal_lengths(draft_tokens) > 0))

    def one_position(carry):
        s, p = carry
        return proposed(body(s, one_position=True, proposal=p))

    def outer(carry):
        s, p = carry
        return jax.lax.while_loop(nothing_proposed, one_position, proposed(body(s, proposal=p)))

    if limit is not None:  # after a step, run_dynamic is in (or tests) its inner loop
        carry = jax.lax.while_loop(lambda c: (c[0].step > 0) & nothing_proposed(c),
                                   one_position, carry)
    return jax.lax.while_loop(lambda c: active(c[0]), outer, carry)


def _proposed(spec: LoopSpec, draft_params, values, state: DecodeState):
    """(state with the draft state its proposal leaves, (draft_tokens, q, uniforms))."""
    draft_tokens, q, draft_state, u = _propose(spec, draft_params, values, state)
    return state.replace(draft_state=draft_state), (draft_tokens, q, u)


def run_static(spec: LoopSpec, target_params, draft_params, values, state, *,
               iterations: int) -> DecodeState:
    """Run exactly `iterations` iterations; rows already done are left unchanged."""
    body = lambda _, s: step(spec, target_params, draft_params, values, s)  # noqa: E731
    return jax.lax.fori_loop(0, iterations, body, state)


def generate_tokens(spec: LoopSpec, target_params, draft_params, prompt, prompt_lengths, key,
                    values: SamplingValues, max_new_tokens) -> DecodeState:
    """The whole generation as one pure function (prefill + dynamic loop), public as
    `jaxspec.generate_tokens`.

    Users may wrap it in their own `jax.jit` with `spec` static (and
    `compiler_options=jaxspec.compiler_options()` for the numerics of jaxspec's own programs,
    jaxspec.xla_options). Shapes: prompt [B, P] right-padded, prompt_lengths [B]; key a PRNG
    key (rows get distinct streams derived from it and their index) or integer seeds [B], one
    per row, so that a row's sampled tokens do not depend on what else is in its batch (see
    init_state); the result's
    tokens[b, prompt_lengths[b]:lengths[b]] are row b's new tokens. spec.max_len must be at
    least decode.sizing.required_len(P, max_new_tokens, spec.gamma): checked when
    max_new_tokens is a Python int; a traced one that does not fit stops rows when their
    buffer is full.
    """
    state = init_state(spec, target_params, draft_params, prompt, prompt_lengths, key, values,
                       max_new_tokens)
    return run_dynamic(spec, target_params, draft_params, values, state)
