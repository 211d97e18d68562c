"""The fused decode loop through the public API (and the pure function underneath).

Greedy speculative decoding must reproduce greedy autoregressive decoding token for token,
which in turn must reproduce a naive reference (the full sequence re-run without a cache at
every step). Tiny random models (1 layer, vocabulary 48) keep every compile to a few seconds;
decoders are cached per module so each compiled loop is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import full_logits, greedy_reference, perturbed, resized_vocab, tiny_model

import jaxspec
from jaxspec.decode import sampling
from jaxspec.drafts.model_draft import ModelDraft
from jaxspec.errors import UserError
from jaxspec.models import layout

VOCAB = 48
PROMPTS = [[5, 17, 3], [40, 2, 9, 33, 21, 8, 11], [7], [12, 44, 30, 1, 19]]  # mixed lengths
MAX_NEW = 24
SAMPLED = dict(temperature=0.8, top_k=12, top_p=0.9)  # one sampled compile shared by tests


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, std=0.5, vocab=VOCAB)


@pytest.fixture(scope="module")
def draft(target):
    """Agrees with the target's argmax about half the time (noise on every weight)."""
    return perturbed(target, noise=0.02)


@pytest.fixture(scope="module")
def reference(target):
    ref = greedy_reference(target, PROMPTS, MAX_NEW)
    assert all(len(set(row)) >= 5 for row in ref), "degenerate reference: pick another seed"
    return ref


@pytest.fixture(scope="module")
def decoders():
    """decoders(target, draft, γ, **kwargs): one SpeculativeDecoder per combination."""
    made = {}

    def get(target, draft, gamma=4, **kwargs):
        key = (id(target), id(draft), gamma, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=gamma,
                                                   **kwargs)
        return made[key]

    return get


def check_stats(out, gamma: int, max_new: int, chunk: int | None = None):
    """Invariants between the statistics and the tokens, overall and per row.

    chunk: iterations per call in static mode (None: dynamic mode).
    """
    stats = out.stats
    rows = stats["rows"]
    assert len(rows) == len(out.tokens)
    for row, tokens in zip(rows, out.tokens):
        iterations = row["target_forward_calls"] - 1
        assert row["new_tokens"] == len(tokens) <= max_new
        assert row["draft_tokens_proposed"] == gamma * iterations
        assert row["target_positions_verified"] == (gamma + 1) * iterations
        assert 0 <= row["draft_tokens_accepted"] <= row["draft_tokens_proposed"]
        hist = row["accepted_per_position"]
        assert len(hist) == gamma and sum(hist) == row["draft_tokens_accepted"]
        assert all(a >= b for a, b in zip(hist, hist[1:])), hist  # non-increasing
        assert all(0 <= h <= iterations for h in hist)
        # every verify step of an active row appends 1..(accepted + 1) tokens; the first new
        # token comes from the prefill
        assert 1 + iterations <= len(tokens) <= 1 + iterations + row["draft_tokens_accepted"]
        if iterations:
            assert row["mean_accepted_length"] == pytest.approx(
                (row["draft_tokens_accepted"] + iterations) / iterations)
            if gamma:
                assert row["acceptance_rate"] == pytest.approx(
                    row["draft_tokens_accepted"] / row["draft_tokens_proposed"])
    assert stats["new_tokens"] == sum(len(t) for t in out.tokens)
    assert stats["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    for key in ("draft_tokens_proposed", "draft_tokens_accepted", "target_positions_verified"):
        assert stats[key] == sum(r[key] for r in rows)
    assert stats["accepted_per_position"] == [sum(col) for col in
                                              zip(*(r["accepted_per_position"] for r in rows))]
    iterations = sum(r["target_forward_calls"] - 1 for r in rows)
    if iterations:
        assert stats["mean_accepted_length"] == pytest.approx(
            (stats["draft_tokens_accepted"] + iterations) / iterations)
    # the batch runs one verify per iteration while any row is active (in static mode, up to
    # the end of the chunk in which the last row finished)
    needed = max(r["target_forward_calls"] - 1 for r in rows)
    ran = stats["target_forward_calls"] - 1
    if chunk is None:
        assert ran == needed
    else:
        assert needed <= ran < needed + chunk and ran % chunk == 0
    assert stats["draft_forward_calls"] == (1 + gamma * ran if gamma else 0)
    assert stats["num_speculative_tokens"] == gamma


# --- greedy equivalences ------------------------------------------------------------------

def test_autoregressive_equals_naive_reference(target, reference, decoders):
    out = decoders(target, None).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == reference
    check_stats(out, 0, MAX_NEW)
    assert out.stats["draft_tokens_proposed"] == 0
    assert [r["target_forward_calls"] for r in out.stats["rows"]] == [MAX_NEW] * len(PROMPTS)


def test_pure_generate_under_user_jit_equals_naive_reference(target, reference):
    """jaxspec.generate_tokens (loop.generate) inside the user's own jax.jit."""
    sampler, values = sampling.make(0.0)
    width = max(map(len, PROMPTS))
    prompt = np.zeros((len(PROMPTS), width), np.int32)
    for b, p in enumerate(PROMPTS):
        prompt[b, : len(p)] = p
    spec = jaxspec.LoopSpec(target=target.config, sampler=sampler, max_len=width + MAX_NEW + 1)
    run = jax.jit(jaxspec.generate_tokens, static_argnums=0)
    state = run(spec, target.params, None, jnp.asarray(prompt),
                jnp.asarray([len(p) for p in PROMPTS], jnp.int32), jax.random.key(0), values,
                jnp.int32(MAX_NEW))
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
    got = [tokens[b, len(p): lengths[b]].tolist() for b, p in enumerate(PROMPTS)]
    assert got == reference
    assert bool(np.all(np.asarray(state.done)))


@pytest.mark.parametrize("gamma", range(1, 9))
def test_greedy_speculative_equals_autoregressive(target, draft, reference, decoders, gamma):
    out = decoders(target, draft, gamma).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == reference
    check_stats(out, gamma, MAX_NEW)
    # the draft is neither useless nor perfect: both acceptance and rejection were exercised
    assert 0 < out.stats["draft_tokens_accepted"] < out.stats["draft_tokens_proposed"]


def test_draft_equal_to_target_accepts_everything(target, reference, decoders):
    out = decoders(target, target, 3).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == reference
    check_stats(out, 3, MAX_NEW)
    assert out.stats["acceptance_rate"] == 1.0
    for row in out.stats["rows"]:
        iterations = row["target_forward_calls"] - 1
        assert row["accepted_per_position"] == [iterations] * 3
        assert iterations == math.ceil((MAX_NEW - 1) / 4)  # 4 new tokens per verify step


@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 10])
def test_max_new_tokens_not_a_multiple_of_gamma_plus_one(target, reference, decoders, max_new):
    # With draft == target every iteration accepts all 3 drafts and wants to append 4 tokens;
    # the last iteration must be cut at max_new (the first token comes from the prefill).
    out = decoders(target, target, 3).generate(PROMPTS, max_new_tokens=max_new)
    assert out.tokens == [row[:max_new] for row in reference]
    check_stats(out, 3, max_new)
    for row in out.stats["rows"]:
        assert row["target_forward_calls"] - 1 == math.ceil((max_new - 1) / 4)


# --- EOS ------------------------------------------------------------------------------------

def _eos_inside_first_run(reference, gamma):
    """(row, index, token): a reference token at index 2..γ-1 that did not occur before it.

    Index 0 comes from the prefill and indices 1..γ are the first iteration's drafts, so with
    a draft that is always accepted, an EOS at such an index ends the row inside an accepted
    run: accepted drafts after it and the bonus token must be dropped.
    """
    for j in range(2, gamma):
        for b, row in enumerate(reference):
            if row[j] not in row[:j]:
                return b, j, row[j]
    raise AssertionError("no usable EOS candidate in the reference")


def test_eos_inside_an_accepted_run_stops_the_row(target, reference, decoders):
    gamma = 4
    b, j, eos = _eos_inside_first_run(reference, gamma)
    with_eos = dataclasses.replace(target, config=dataclasses.replace(target.config,
                                                                      eos_token_ids=(eos,)))
    expected = greedy_reference(with_eos, PROMPTS, MAX_NEW)
    assert expected[b] == reference[b][: j + 1]
    out = decoders(with_eos, with_eos, gamma).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == expected  # every row: cut after its first EOS, EOS kept
    row = out.stats["rows"][b]
    # one verify step that accepted all γ drafts, yet only j of its γ + 1 tokens were kept
    assert row["target_forward_calls"] - 1 == 1
    assert row["draft_tokens_accepted"] == gamma
    assert row["new_tokens"] == j + 1 < 1 + gamma + 1
    check_stats(out, gamma, MAX_NEW)
    assert any(len(t) == MAX_NEW and eos not in t for t in out.tokens), "no row ran to the end"


def test_eos_in_sampled_mode(target, draft, reference, decoders):
    eos = max(set(reference[0]), key=reference[0].count)  # a frequent token
    with_eos = dataclasses.replace(target, config=dataclasses.replace(target.config,
                                                                      eos_token_ids=(eos,)))
    draft_eos = dataclasses.replace(draft, config=with_eos.config)
    out = decoders(with_eos, draft_eos, 3).generate(PROMPTS * 2, max_new_tokens=MAX_NEW,
                                                    temperature=0.7, seed=1)
    stopped = 0
    for tokens in out.tokens:
        assert 1 <= len(tokens) <= MAX_NEW
        assert eos not in tokens[:-1]  # nothing after an EOS
        stopped += tokens[-1] == eos and len(tokens) < MAX_NEW
        if tokens[-1] != eos:
            assert len(tokens) == MAX_NEW
    assert stopped >= 1, "EOS never ended a row early: not exercised"
    check_stats(out, 3, MAX_NEW)


# --- static mode, seeds, statistics --------------------------------------------------------

@pytest.mark.parametrize("mode", ["static", "chunked"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_chunks_equal_dynamic_mode(target, draft, reference, decoders, sampled, mode):
    """Static and chunked modes (3 iterations per call) make the dynamic loop's tokens and
    statistics; chunked mode also runs its iterations exactly (none after the last row is
    done), and both stream prefixes of the final tokens."""
    kwargs = dict(SAMPLED, seed=5) if sampled else {}
    dynamic = decoders(target, draft, 3).generate(PROMPTS, max_new_tokens=MAX_NEW, **kwargs)
    updates = []
    chunks = decoders(target, draft, 3, mode=mode, static_iterations=3).generate(
        PROMPTS, max_new_tokens=MAX_NEW, on_update=updates.append, **kwargs)
    assert chunks.tokens == dynamic.tokens
    if not sampled:
        assert chunks.tokens == reference
    for key in ("rows", "accepted_per_position", "draft_tokens_accepted", "new_tokens"):
        assert chunks.stats[key] == dynamic.stats[key], key
    check_stats(chunks, 3, MAX_NEW, chunk=3 if mode == "static" else None)
    check_stats(dynamic, 3, MAX_NEW)
    if mode == "chunked":
        for key in ("target_forward_calls", "draft_forward_calls"):
            assert chunks.stats[key] == dynamic.stats[key], key
    # streaming: several chunks, each a prefix of the final tokens, the last one complete
    iterations = dynamic.stats["target_forward_calls"] - 1
    assert len(updates) == 2 + (iterations - 1) // 3  # after the prefill and every chunk
    for update in updates:
        assert all(final[: len(part)] == part for part, final in zip(update, chunks.tokens))
    assert updates[-1] == chunks.tokens


def test_chunked_mode_runs_exactly_the_dynamic_loop(target):
    """The whole final state (statistics and KV caches included) of chunks of 1 and 3
    iterations equals the dynamic loop's, with a draft that declines some iterations: a chunk
    that stops inside the loop of one-position steps resumes there (the positions verified
    count the full-width verify of an empty proposal it would run instead)."""
    from jaxspec.api import seed_key
    from jaxspec.decode import loop
    from jaxspec.decode.sizing import prompt_width

    decoder = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens=3)
    sampler, values = sampling.make(0.0, 0, 1.0)
    prompts = [[5, 17, 3, 5, 17, 3, 5]]  # one row: its empty proposals are the batch's
    prompt = np.zeros((len(prompts), prompt_width(7)), np.int32)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = p
    spec = decoder._loop_spec(prompts, MAX_NEW, sampler)
    args = decoder._inputs(jnp.asarray(prompt), jnp.asarray([len(p) for p in prompts]),
                           seed_key(0), values, jnp.int32(MAX_NEW))
    dynamic = jax.jit(loop.generate_tokens, static_argnums=0)(spec, *args)
    iterations, verified = int(dynamic.stats.iterations[0]), int(dynamic.stats.verified[0])
    assert iterations < verified < 4 * iterations  # some iterations verified one position
    for iterations in (1, 3):
        chunk = jax.jit(functools.partial(loop.run_chunk, iterations=iterations),
                        static_argnums=0)
        carry = jax.jit(loop.init_chunks, static_argnums=0)(spec, *args)
        calls = 0
        while not bool(np.all(carry[0].done)):
            carry, calls = chunk(spec, args[0], args[1], values, carry), calls + 1
        assert calls >= int(dynamic.step) // iterations
        for a, b in zip(jax.tree.leaves(dynamic), jax.tree.leaves(carry[0]), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_seeds(target, draft, decoders):
    dec = decoders(target, draft, 3)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # same shapes as PROMPTS
    a = dec.generate(prompts, max_new_tokens=MAX_NEW, seed=7, **SAMPLED)
    b = dec.generate(prompts, max_new_tokens=MAX_NEW, seed=7, **SAMPLED)
    c = dec.generate(prompts, max_new_tokens=MAX_NEW, seed=8, **SAMPLED)
    assert a.tokens == b.tokens and a.stats["rows"] == b.stats["rows"]
    assert a.tokens != c.tokens
    assert a.tokens[0] != a.tokens[1]  # identical prompts in one batch are sampled apart
    assert all(0 <= t < VOCAB for row in a.tokens + c.tokens for t in row)


def test_statistics_are_consistent_when_sampling(target, draft, decoders):
    out = decoders(target, draft, 3).generate(PROMPTS, max_new_tokens=MAX_NEW, seed=3,
                                              **SAMPLED)
    check_stats(out, 3, MAX_NEW)
    assert all(len(t) == MAX_NEW for t in out.tokens)  # no EOS configured
    assert 0 < out.stats["draft_tokens_accepted"] < out.stats["draft_tokens_proposed"]


# --- drafts whose vocabulary differs from the target's ----------------------------------------

def _propose(draft_model, sampler_kwargs, gamma=3):
    """Prefill the draft with each prompt plus one token, run ModelDraft.propose once.

    Returns (draft tokens [B, γ], q [B, γ, 48] or None when greedy).
    """
    draft = ModelDraft(draft_model.config, VOCAB)
    sampler, values = sampling.make(**sampler_kwargs)
    buffer = np.zeros((len(PROMPTS), 64), np.int32)
    for b, p in enumerate(PROMPTS):
        buffer[b, : len(p) + 1] = p + [45]  # 45: the "first new token", unknown to small drafts
    lengths = jnp.asarray([len(p) + 1 for p in PROMPTS], jnp.int32)
    uniforms = jax.random.uniform(jax.random.key(0), (len(PROMPTS), gamma))

    @jax.jit
    def run(params, buffer, values, uniforms):
        state = draft.init_state(len(PROMPTS), 64, jnp.float32, layout.default())
        state = draft.prefill(params, state, buffer[:, :16], lengths - 1, None)
        return draft.propose(params, state, buffer, lengths, gamma=gamma, sampler=sampler,
                             values=values, uniforms=uniforms)[:2]

    tokens, q = run(draft_model.params, jnp.asarray(buffer), values, uniforms)
    return np.asarray(tokens), None if q is None else np.asarray(q)


@pytest.fixture(scope="module")
def small_vocab_draft(draft):
    return resized_vocab(draft, 40)


@pytest.fixture(scope="module")
def large_vocab_draft(draft):
    """Padded to 64 ids whose output columns are 5x copies of ids 0..15: if the padding were
    not masked, the draft would nearly always prefer an id >= 48."""
    big = resized_vocab(draft, 64)
    params = dict(big.params)
    params["lm_head"] = params["lm_head"].at[:, VOCAB:].set(5 * params["lm_head"][:, :16])
    return dataclasses.replace(big, params=params)


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_draft_that_stops_when_unsure_keeps_greedy_output(target, draft, reference, threshold):
    """ModelDraft(threshold): rows stop proposing at the draft's first unsure position."""
    decoder = jaxspec.SpeculativeDecoder(
        target, ModelDraft(draft.config, VOCAB, threshold=threshold), num_speculative_tokens=4,
        draft_params=draft.params)
    out = decoder.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == reference
    iterations = sum(r["target_forward_calls"] - 1 for r in out.stats["rows"])
    assert out.stats["draft_tokens_proposed"] < 4 * iterations  # some positions declined


def test_small_vocab_draft_proposes_only_its_ids(small_vocab_draft):
    tokens, _ = _propose(small_vocab_draft, dict(temperature=0.0))
    assert tokens.max() < 40
    tokens, q = _propose(small_vocab_draft, dict(temperature=1.0))
    assert tokens.max() < 40
    assert q.shape[-1] == VOCAB and np.all(q[..., 40:] == 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)


def test_large_vocab_draft_proposes_only_target_ids(large_vocab_draft):
    # guard: read at its full width, the padded draft's argmax after every prompt is >= 48
    for prompt in PROMPTS:
        logits = full_logits(large_vocab_draft.config, large_vocab_draft.params, [prompt])
        assert int(np.argmax(logits[0, -1])) >= VOCAB
    tokens, _ = _propose(large_vocab_draft, dict(temperature=0.0))
    assert tokens.max() < VOCAB
    tokens, q = _propose(large_vocab_draft, dict(temperature=1.0))
    assert tokens.max() < VOCAB and q.shape[-1] == VOCAB
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("which", ["small_vocab_draft", "large_vocab_draft"])
def test_draft_with_other_vocab_size_keeps_greedy_output(target, reference, decoders, which,
                                                         request):
    other = request.getfixturevalue(which)
    out = decoders(target, other, 3).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert out.tokens == reference
    check_stats(out, 3, MAX_NEW)
    assert out.stats["draft_tokens_accepted"] > 0
    # the target emits ids the small draft cannot propose: they came from rejections/bonuses
    assert any(t >= 40 for row in reference for t in row)


def test_small_vocab_draft_sampling_stays_valid(target, small_vocab_draft, decoders):
    out = decoders(target, small_vocab_draft, 3).generate(
        PROMPTS * 2, max_new_tokens=MAX_NEW, temperature=1.0, seed=2)
    assert all(len(t) == MAX_NEW for t in out.tokens)
    flat = [t for row in out.tokens for t in row]
    assert all(0 <= t < VOCAB for t in flat)
    assert any(t >= 40 for t in flat)  # ids only the target knows still appear
    check_stats(out, 3, MAX_NEW)
    assert out.stats["draft_tokens_accepted"] > 0


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0, -1, 33, 100])
def test_bad_num_speculative_tokens(target, draft, gamma):
    with pytest.raises(UserError, match="num_speculative_tokens"):
        jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=gamma)


def test_num_speculative_tokens_limits_accepted(target, draft):
    for gamma in (1, 32):
        dec = jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=gamma)
        assert dec.gamma == gamma
    assert jaxspec.SpeculativeDecoder(target, None).gamma == 0
    for gamma in (0, 33):  # refused with or without a draft, as the CLI refuses them
        for d in (draft, None):
            with pytest.raises(UserError, match="num_speculative_tokens"):
                jaxspec.SpeculativeDecoder(target, d, num_speculative_tokens=gamma)


def test_too_many_positions_names_both_numbers(target, draft):
    dec = jaxspec.SpeculativeDecoder(target, draft, num_speculative_tokens=4)
    # 10 + 250 + 4 + 1 = 265 positions; the target has 256
    with pytest.raises(UserError) as info:
        dec.generate([[1] * 10, [2]], max_new_tokens=250)
    assert "265" in str(info.value) and "256" in str(info.value)
    short = dataclasses.replace(draft, config=dataclasses.replace(draft.config,
                                                                  max_position_embeddings=64))
    dec = jaxspec.SpeculativeDecoder(target, short, num_speculative_tokens=4)
    with pytest.raises(UserError) as info:  # 10 + 55 + 5 = 70 > the draft's 64
        dec.generate([[1] * 10], max_new_tokens=55)
    assert "70" in str(info.value) and "64" in str(info.value) and "draft" in str(info.value)


def test_position_limit_is_inclusive():
    small = tiny_model(3, std=0.5, vocab=VOCAB, max_positions=24)
    dec = jaxspec.SpeculativeDecoder(small, None)
    out = dec.generate([[1, 2, 3]], max_new_tokens=20)  # 3 + 20 + 1 = 24: allowed
    assert len(out.tokens[0]) == 20
    with pytest.raises(UserError) as info:
        dec.generate([[1, 2, 3]], max_new_tokens=21)
    assert "25" in str(info.value) and "24" in str(info.value)


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []]])
def test_empty_prompt(target, prompts):
    with pytest.raises(UserError):
        jaxspec.SpeculativeDecoder(target, None).generate(prompts, max_new_tokens=4)


@pytest.mark.parametrize("max_new", [0, -1])
def test_max_new_tokens_must_be_positive(target, draft, max_new):
    with pytest.raises(UserError, match="max_new_tokens"):
        jaxspec.SpeculativeDecoder(target, draft).generate([[1, 2]], max_new_tokens=max_new)


@pytest.mark.parametrize("prompt", [[[VOCAB]], [[1, -1]]])
def test_token_ids_out_of_range(target, prompt):
    with pytest.raises(UserError):
        jaxspec.SpeculativeDecoder(target, None).generate(prompt, max_new_tokens=4)


def test_bad_mode_and_sampling_values(target, draft):
    with pytest.raises(UserError):
        jaxspec.SpeculativeDecoder(target, draft, mode="eager")
    dec = jaxspec.SpeculativeDecoder(target, draft)
    for kwargs in (dict(temperature=-1.0), dict(temperature=1.0, top_p=0.0),
                   dict(temperature=1.0, top_k=-3)):
        with pytest.raises(UserError):
            dec.generate([[1, 2]], max_new_tokens=4, **kwargs)
