"""Sampled speculative decoding is lossless: its output follows the target's distribution.

A 12-token vocabulary makes the target's distribution over short continuations enumerable
exactly (jaxspec.models.decoder.forward without a cache, then the same temperature/top-k/top-p
transform). One generate call with tens of thousands of copies of one prompt gives the
empirical joint distribution of pairs of new tokens, judged by a chi-square test:

  (t1, t2): t1 comes from the prefill, t2 from the first verify step (accepted draft or the
            replacement at its first position);
  (t2, t3): within the first iteration (second draft, or a replacement at position 1, or the
            first token of a second iteration);
  (t3, t4): with γ = 2 and 4 new tokens, t4 is the bonus token whenever both drafts were
            accepted.

A control passes an "accept every draft" rejection step through the loop's rejection seam
(LoopSpec.rejection) and checks that the same test then fails, so the test has the power to
see a wrong sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (chi2_pvalue, full_logits, perturbed, successor_model, tiny_model,
                     trained_head)

import jaxspec
from jaxspec.decode import sampling
from jaxspec.decode.rejection import REFERENCE, Rejection
from jaxspec.drafts.base import NO_PROPOSAL
from jaxspec.drafts.head import HeadDraft
from jaxspec.drafts.lookup_first import LookupFirst
from jaxspec.drafts.ngram import NgramDraft
from jaxspec.drafts.model_draft import ModelDraft
from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout

VOCAB = 12
PROMPT = [3, 7, 1]
ROWS = 24_000
MAX_NEW = 4
PASS_P = 1e-3  # strict: the seed is fixed, so this is not a flaky threshold
CONFIGS = {  # name: (γ, temperature, top_k, top_p)
    "temperature_1": (2, 1.0, 0, 1.0),
    "temperature_0.7_top_k_5": (2, 0.7, 5, 1.0),
    "top_p_0.8": (3, 1.0, 0, 0.8),
}


@pytest.fixture(scope="module")
def models():
    target = tiny_model(0, std=0.5, vocab=VOCAB)
    draft = perturbed(target, noise=0.05, seed=4)  # related, yet its distributions differ
    return target, draft


def _continuations(model) -> np.ndarray:
    """Teacher-forced logits for every prompt + (a, b, c): [V^3, P+3, V]."""
    seqs = np.asarray([PROMPT + list(abc) for abc in itertools.product(range(VOCAB), repeat=3)])
    return full_logits(model.config, model.params, seqs)


@pytest.fixture(scope="module")
def continuations(models):
    return tuple(_continuations(m) for m in models)


@pytest.fixture(scope="module")
def head_target():
    """A target with learnable text, a head trained on it over 6 of its 12 tokens, and the
    target's exact continuations."""
    target = successor_model(VOCAB, seed=3, sharpness=0.5)
    config, params, *_ = trained_head(target, draft_vocab=6, rows=40)
    return target, config, params, _continuations(target)


def conditionals(logits: np.ndarray, temperature, top_k, top_p):
    """P(t1), P(t2|t1), P(t3|t1,t2), P(t4|t1..t3) under the sampling transform."""
    sampler, values = sampling.make(temperature, top_k, top_p)
    probs = np.asarray(sampling.probabilities(sampler, values, jnp.asarray(logits)),
                       np.float64).reshape(VOCAB, VOCAB, VOCAB, len(PROMPT) + 3, VOCAB)
    start = len(PROMPT) - 1
    return (probs[0, 0, 0, start], probs[:, 0, 0, start + 1], probs[:, :, 0, start + 2],
            probs[:, :, :, start + 3])


def exact_pairs(logits, temperature, top_k, top_p) -> dict[str, np.ndarray]:
    """Exact joint distributions [V, V] of (t1, t2), (t2, t3), (t3, t4)."""
    p1, p2, p3, p4 = conditionals(logits, temperature, top_k, top_p)
    joint = np.einsum("a,ab,abc,abcd->abcd", p1, p2, p3, p4)
    assert joint.sum() == pytest.approx(1.0, abs=1e-6)
    return {"t1,t2": joint.sum((2, 3)), "t2,t3": joint.sum((0, 3)), "t3,t4": joint.sum((0, 1))}


@dataclasses.dataclass(frozen=True)
class DecliningDraft(ModelDraft):
    """A model draft that declines by a rule of its own: everything when the last token is odd
    (the dynamic loop then verifies one position), else after its first proposal when that is
    even. Sampled output must still follow the target."""

    declines = True

    def propose(self, params, state, tokens, lengths, **kwargs):
        draft_tokens, q, state = super().propose(params, state, tokens, lengths, **kwargs)
        last = tokens[jnp.arange(tokens.shape[0]), lengths - 1]
        iota = jnp.arange(draft_tokens.shape[1])[None]
        declined = (last % 2 == 1)[:, None] | ((draft_tokens[:, :1] % 2 == 0) & (iota >= 1))
        return jnp.where(declined, NO_PROPOSAL, draft_tokens), q, state


def generate(target, draft, gamma, temperature, top_k, top_p, *, seed=0, rejection=REFERENCE,
             draft_type=ModelDraft, policy=None):
    """ROWS copies of PROMPT through the pure compiled loop; returns tokens [ROWS, MAX_NEW].

    policy: a layout policy to put both models' params in first (layout.CPU: the CPU matmul
    kernel computes every projection, checked on the compiled program)."""
    params = [m.params if policy is None else
              layout.apply(policy, m.params, m.config.tie_word_embeddings)
              for m in (target, draft)]
    return generate_with(target, draft_type(draft.config, VOCAB), params, gamma, temperature,
                         top_k, top_p, seed=seed, rejection=rejection, kernel=policy == layout.CPU)


def generate_with(target, loop_draft, params, gamma, temperature, top_k, top_p, *, seed=0,
                  rejection=REFERENCE, kernel=False):
    """`generate` with a loop draft object; params: (target params, draft params)."""
    sampler, values = sampling.make(temperature, top_k, top_p)
    spec = jaxspec.LoopSpec(target=target.config, draft=loop_draft, gamma=gamma, sampler=sampler,
                            max_len=16, rejection=rejection)
    args = (*params, jnp.asarray([PROMPT] * ROWS, jnp.int32),
            jnp.full((ROWS,), len(PROMPT), jnp.int32), jax.random.key(seed), values,
            jnp.int32(MAX_NEW))
    lowered = jax.jit(jaxspec.generate_tokens, static_argnums=0).lower(spec, *args)
    assert (f"@{cpu_matmul.TARGET}" in lowered.as_text()) == kernel
    state = lowered.compile()(*args)
    lengths = np.asarray(state.lengths)
    assert np.all(lengths == len(PROMPT) + MAX_NEW)
    accepted = np.asarray(state.stats.accepted).sum() / np.asarray(state.stats.proposed).sum()
    return np.asarray(state.tokens)[:, len(PROMPT): len(PROMPT) + MAX_NEW], accepted


def pair_pvalues(tokens: np.ndarray, exact: dict[str, np.ndarray]) -> dict[str, float]:
    result = {}
    for name, (i, j) in {"t1,t2": (0, 1), "t2,t3": (1, 2), "t3,t4": (2, 3)}.items():
        counts = np.bincount(tokens[:, i] * VOCAB + tokens[:, j], minlength=VOCAB * VOCAB)
        result[name] = chi2_pvalue(counts, exact[name])
    return result


def total_variation(a, b) -> float:
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_sampling_follows_the_target(models, continuations, name):
    gamma, temperature, top_k, top_p = CONFIGS[name]
    target, draft = models
    target_logits, draft_logits = continuations
    # the draft's next-token distributions differ substantially from the target's
    p2 = conditionals(target_logits, temperature, top_k, top_p)[1]
    q2 = conditionals(draft_logits, temperature, top_k, top_p)[1]
    p1 = conditionals(target_logits, temperature, top_k, top_p)[0]
    mean_tv = sum(p1[a] * total_variation(p2[a], q2[a]) for a in range(VOCAB))
    assert mean_tv > 0.2, mean_tv

    exact = exact_pairs(target_logits, temperature, top_k, top_p)
    tokens, acceptance = generate(target, draft, gamma, temperature, top_k, top_p)
    assert 0.1 < acceptance < 0.9, acceptance  # both accept and reject paths are exercised
    pvalues = pair_pvalues(tokens, exact)
    assert min(pvalues.values()) > PASS_P, pvalues
    for pair, (i, j) in {"t1,t2": (0, 1), "t2,t3": (1, 2), "t3,t4": (2, 3)}.items():
        counts = np.bincount(tokens[:, i] * VOCAB + tokens[:, j], minlength=VOCAB * VOCAB)
        assert total_variation(counts / ROWS, exact[pair].ravel()) < 0.04, pair


THRESHOLD_DRAFT = functools.partial(ModelDraft, threshold=0.7)  # about half declined


@pytest.mark.parametrize("name,draft_type", [
    ("temperature_1", DecliningDraft), ("top_p_0.8", DecliningDraft),
    ("temperature_1", THRESHOLD_DRAFT)], ids=["rule-t1", "rule-top-p", "threshold-t1"])
def test_declining_draft_keeps_the_target_distribution(models, continuations, name,
                                                       draft_type):
    """Declined positions are never accepted, and a row that had all its proposals accepted
    takes its next token from p there; iterations where every row declines verify one
    position (a plain step) in the dynamic loop."""
    gamma, temperature, top_k, top_p = CONFIGS[name]
    exact = exact_pairs(continuations[0], temperature, top_k, top_p)
    tokens, acceptance = generate(*models, gamma, temperature, top_k, top_p,
                                  draft_type=draft_type)
    assert 0.1 < acceptance < 0.9, acceptance
    pvalues = pair_pvalues(tokens, exact)
    assert min(pvalues.values()) > PASS_P, pvalues


@pytest.mark.skipif(not cpu_matmul.available(), reason="the CPU matmul kernel is unavailable")
def test_speculative_sampling_follows_the_target_through_the_cpu_kernel(models, continuations):
    """The same test with every product of the loop on the CPU small-M kernel."""
    gamma, temperature, top_k, top_p = CONFIGS["temperature_0.7_top_k_5"]
    exact = exact_pairs(continuations[0], temperature, top_k, top_p)
    tokens, acceptance = generate(*models, gamma, temperature, top_k, top_p, policy=layout.CPU)
    assert 0.1 < acceptance < 0.9, acceptance
    pvalues = pair_pvalues(tokens, exact)
    assert min(pvalues.values()) > PASS_P, pvalues


@pytest.mark.parametrize("name,threshold", [
    ("temperature_1", 0.0), ("temperature_0.7_top_k_5", 0.0), ("temperature_1", 0.3)],
    ids=["t1", "t0.7-top-k", "t1-stops-when-unsure"])
def test_trained_head_keeps_the_target_distribution(head_target, name, threshold):
    """The draft head's q is zero outside its 6-token vocabulary: tokens it cannot propose
    still appear with the target's probabilities (the rejection's residual), also when the
    head stops proposing below a top probability."""
    target, config, params, logits = head_target
    gamma, temperature, top_k, top_p = CONFIGS[name]
    exact = exact_pairs(logits, temperature, top_k, top_p)
    outside = np.setdiff1d(np.arange(VOCAB), np.asarray(params["d2t"]))
    assert exact["t2,t3"][:, outside].sum() > 0.03  # the target often says what q cannot
    draft_params = {"head": params, "embed": target.params["embed"]}
    tokens, acceptance = generate_with(target, HeadDraft(config, threshold=threshold),
                                       (target.params, draft_params), gamma, temperature, top_k,
                                       top_p)
    assert 0.1 < acceptance < 0.9, acceptance
    assert np.isin(tokens, outside).any()
    pvalues = pair_pvalues(tokens, exact)
    assert min(pvalues.values()) > PASS_P, pvalues


@dataclasses.dataclass(frozen=True)
class LookupWithFallbackQ(LookupFirst):
    """A broken lookup-first draft: lookup tokens, but the fallback's q reported for them."""

    def propose(self, params, state, tokens, lengths, *, gamma, sampler, values, uniforms):
        _, q, _ = self.fallback.propose(params, state.fallback, tokens, lengths, gamma=gamma,
                                        sampler=sampler, values=values, uniforms=uniforms)
        draft_tokens, _, state = super().propose(params, state, tokens, lengths, gamma=gamma,
                                                 sampler=sampler, values=values,
                                                 uniforms=uniforms)
        return draft_tokens, q, state


@pytest.mark.parametrize("name,broken", [
    ("temperature_1", False), ("temperature_0.7_top_k_5", False), ("temperature_1", True)],
    ids=["t1", "t0.7-top-k", "control-wrong-q"])
def test_lookup_first_keeps_the_target_distribution(head_target, name, broken):
    """Prompt lookup first (any 1-token match: t1 ∈ the prompt makes the first iteration a
    lookup), the trained head elsewhere: q is one-hot where the lookup proposed, the head's
    elsewhere. Control: reporting the head's q for lookup tokens fails the same test."""
    target, config, params, logits = head_target
    gamma, temperature, top_k, top_p = CONFIGS[name]
    exact = exact_pairs(logits, temperature, top_k, top_p)
    kind = LookupWithFallbackQ if broken else LookupFirst
    draft = kind(HeadDraft(config), NgramDraft(3, VOCAB), min_match=1)
    draft_params = {"head": params, "embed": target.params["embed"]}
    tokens, acceptance = generate_with(target, draft, (target.params, draft_params), gamma,
                                       temperature, top_k, top_p)
    assert np.isin(tokens[:, 0], PROMPT).mean() > 0.1  # rows whose first iteration looked up
    pvalues = pair_pvalues(tokens, exact)
    if broken:
        assert min(pvalues.values()) < 1e-6, pvalues
    else:
        assert 0.1 < acceptance < 0.9, acceptance
        assert min(pvalues.values()) > PASS_P, pvalues


def _always_accept(draft_tokens, q, p, uniforms):
    """A broken rejection step: accept all γ drafts, bonus from p_γ."""
    gamma = draft_tokens.shape[1]
    bonus = sampling.sample(p[:, gamma], uniforms[:, gamma])
    n = jnp.full((draft_tokens.shape[0],), gamma, jnp.int32)
    return n, jnp.concatenate([draft_tokens, bonus[:, None]], axis=1).astype(jnp.int32)


@pytest.mark.parametrize("name", ["temperature_1", "top_p_0.8"])
def test_control_always_accepting_fails_the_same_test(models, continuations, name):
    gamma, temperature, top_k, top_p = CONFIGS[name]
    target, draft = models
    exact = exact_pairs(continuations[0], temperature, top_k, top_p)
    broken = Rejection("always-accept", sampled=_always_accept, greedy=REFERENCE.greedy)
    tokens, acceptance = generate(target, draft, gamma, temperature, top_k, top_p,
                                  rejection=broken)  # through the loop's rejection seam
    assert acceptance == 1.0
    pvalues = pair_pvalues(tokens, exact)
    assert pvalues["t1,t2"] < 1e-6 and pvalues["t2,t3"] < 1e-6, pvalues
