"""The rejection step (jaxspec.rejection): exact table-driven cases, then its distribution.

Every case is built by hand so that the expected result follows from the contract alone:
token i is accepted iff u_i * q_i(x_i) < p_i(x_i) (i.e. u_i < p/q); at the first rejection n
the replacement is the inverse-CDF draw from norm(max(0, p_n - q_n)) with u_γ; after γ
acceptances the bonus is the draw from p_γ with u_γ. Draws are "first index whose cumulative
weight exceeds u * total". Uniforms are kept away from CDF boundaries, and where possible chosen
so that a wrong distribution (p instead of the residual, the wrong position) gives a different
token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from helpers import chi2_pvalue

from jaxspec.decode import sampling
from jaxspec.decode.rejection import rejection, rejection_greedy

rejection_jit = jax.jit(rejection)
rejection_greedy_jit = jax.jit(rejection_greedy)


@dataclasses.dataclass
class Case:
    drafts: list  # [γ]
    q: list  # [γ, V]
    p: list  # [γ+1, V]
    u: list  # [γ+1]
    n: int  # expected number accepted
    tokens: list  # expected tokens[:n+1]


def one_hot(ids, v=4):
    return np.eye(v, dtype=np.float32)[ids].tolist()


P0 = [0.1, 0.2, 0.3, 0.4]
P1 = [0.25, 0.25, 0.25, 0.25]
P2 = [0.4, 0.3, 0.2, 0.1]

CASES = {
    # q == p at every draft, so p/q = 1 > u: all three accepted. Bonus from p_3 with u = 0.65:
    # cdf(p_3) = .5 .5 .7 1 -> index 2 (p_0 would give 3, p_2 would give 1).
    "all_accepted_bonus": Case(
        drafts=[2, 0, 3], q=[P0, P1, P2], p=[P0, P1, P2, [0.5, 0.0, 0.2, 0.3]],
        u=[0.99, 0.99, 0.99, 0.65], n=3, tokens=[2, 0, 3, 2]),
    # p(x) >= q(x): accepted whatever u is (here u = 0.999). Bonus p_1 = one-hot(3).
    "p_above_q_always_accepts": Case(
        drafts=[1], q=[[0.7, 0.1, 0.1, 0.1]], p=[[0.1, 0.6, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]],
        u=[0.999, 0.3], n=1, tokens=[1, 3]),
    # Position 0: x = 1, p/q = 0.2/0.8 = 0.25 <= u = 0.5 -> rejected (later positions would
    # accept but do not matter). Residual max(0, p_0 - q_0) = .3 0 .25 .05 (mass .6,
    # cdf .3 .3 .55 .6); u_γ = .45 -> .27 -> index 0. Sampling p_0 instead would give the
    # rejected token 1.
    "first_rejected": Case(
        drafts=[1, 2, 3], q=[[0.1, 0.8, 0.05, 0.05], P1, P2],
        p=[[0.4, 0.2, 0.3, 0.1], P1, P2, P0], u=[0.5, 0.0, 0.0, 0.45], n=0, tokens=[0]),
    # same, u_γ = .7 -> .42 -> index 2
    "first_rejected_other_draw": Case(
        drafts=[1, 2, 3], q=[[0.1, 0.8, 0.05, 0.05], P1, P2],
        p=[[0.4, 0.2, 0.3, 0.1], P1, P2, P0], u=[0.5, 0.0, 0.0, 0.7], n=0, tokens=[2]),
    # same, u_γ = .95 -> .57 -> index 3
    "first_rejected_last_draw": Case(
        drafts=[1, 2, 3], q=[[0.1, 0.8, 0.05, 0.05], P1, P2],
        p=[[0.4, 0.2, 0.3, 0.1], P1, P2, P0], u=[0.5, 0.0, 0.0, 0.95], n=0, tokens=[3]),
    # Position 0: q == p -> accepted. Position 1: x = 3, p = .5 >= q = .4 -> accepted.
    # Position 2: x = 1, p/q = .1/.8 = .125 <= u = .5 -> rejected. Residual at position 2:
    # max(0, p_2 - q_2) = .1 0 .1 .5 (mass .7, cdf .1 .1 .2 .7); u_γ = .25 -> .175 -> index 2.
    # (p_2 alone would give 1; the residual at position 1, .2 0 0 .1, would give 0.)
    "middle_rejected": Case(
        drafts=[0, 3, 1],
        q=[[0.7, 0.1, 0.1, 0.1], [0.1, 0.3, 0.2, 0.4], [0.1, 0.8, 0.0, 0.1]],
        p=[[0.7, 0.1, 0.1, 0.1], [0.3, 0.1, 0.1, 0.5], [0.2, 0.1, 0.1, 0.6], P0],
        u=[0.9, 0.9, 0.5, 0.25], n=2, tokens=[0, 3, 2]),
    # Acceptance is strict: p/q = .25/.5 = .5 and u = .5 -> rejected. The residual .0 .25 has
    # one token. (V = 2.)
    "ratio_equal_to_u_rejects": Case(
        drafts=[0], q=[[0.5, 0.5]], p=[[0.25, 0.75], [1.0, 0.0]], u=[0.5, 0.1], n=0, tokens=[1]),
    # ... and u just below the ratio accepts; the bonus p_1 = one-hot(0).
    "ratio_above_u_accepts": Case(
        drafts=[0], q=[[0.5, 0.5]], p=[[0.25, 0.75], [1.0, 0.0]], u=[0.4999, 0.9], n=1,
        tokens=[0, 0]),
    # q slightly above p everywhere (a rounding artefact: q sums to 1.0001): with u = .99995,
    # u * q(0) = .500025 > p(0) = .5 -> rejected, and max(0, p - q) is zero everywhere. The
    # residual falls back to p_0 = .5 0 .5 0: u_γ = .75 -> index 2 (an all-zero residual would
    # give index 0).
    "zero_mass_residual_falls_back_to_p": Case(
        drafts=[0, 2], q=[[0.50005, 0.0, 0.50005, 0.0], [0.0, 0.0, 1.0, 0.0]],
        p=[[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], P0], u=[0.99995, 0.0, 0.75], n=0,
        tokens=[2]),
    # n-gram draft (one-hot q): accept iff u < p(x). Position 0: .59 < p(1) = .6 accepted.
    # Position 1: .31 >= p(2) = .3 rejected; residual = p_1 without token 2 = .5 .1 0 .1
    # (cdf .5 .6 .6 .7); u_γ = .8 -> .56 -> index 1.
    "one_hot_q_rejects": Case(
        drafts=[1, 2, 0], q=one_hot([1, 2, 0]),
        p=[[0.2, 0.6, 0.1, 0.1], [0.5, 0.1, 0.3, 0.1], [0.0, 0.5, 0.25, 0.25], P0],
        u=[0.59, 0.31, 0.0, 0.8], n=1, tokens=[1, 1]),
    # Position 1: .29 < .3 accepted. Position 2: p(0) = 0, so even u = 0 rejects (0 < 0 is
    # false). Residual = p_2 = 0 .5 .25 .25 (cdf 0 .5 .75 1); u_γ = .8 -> index 3.
    "one_hot_q_zero_target_probability_rejects": Case(
        drafts=[1, 2, 0], q=one_hot([1, 2, 0]),
        p=[[0.2, 0.6, 0.1, 0.1], [0.5, 0.1, 0.3, 0.1], [0.0, 0.5, 0.25, 0.25], P0],
        u=[0.59, 0.29, 0.0, 0.8], n=2, tokens=[1, 2, 3]),
    # n-gram draft fully accepted; bonus from p_3 = P0 (cdf .1 .3 .6 1) with u_γ = .5 -> 2.
    "one_hot_q_all_accepted": Case(
        drafts=[3, 3, 0], q=one_hot([3, 3, 0]),
        p=[[0.0, 0.0, 0.1, 0.9], [0.0, 0.0, 0.2, 0.8], [0.7, 0.0, 0.0, 0.3], P0],
        u=[0.85, 0.75, 0.65, 0.5], n=3, tokens=[3, 3, 0, 2]),
}


def _run(cases):
    def f32(key):
        return jnp.asarray([getattr(c, key) for c in cases], jnp.float32)

    drafts = jnp.asarray([c.drafts for c in cases], jnp.int32)
    n, tokens = rejection_jit(drafts, f32("q"), f32("p"), f32("u"))
    assert n.shape == (len(cases),) and tokens.shape == (len(cases), drafts.shape[1] + 1)
    assert n.dtype == jnp.int32 and tokens.dtype == jnp.int32
    return np.asarray(n), np.asarray(tokens)


@pytest.mark.parametrize("name", list(CASES))
def test_rejection_exact(name):
    case = CASES[name]
    n, tokens = _run([case])
    assert n[0] == case.n
    assert tokens[0, : case.n + 1].tolist() == case.tokens


def test_rejection_exact_cases_batched():
    """Rows with different outcomes in one call are independent (γ = 3, V = 4 cases)."""
    cases = [c for c in CASES.values() if len(c.drafts) == 3 and len(c.p[0]) == 4]
    assert len(cases) >= 6
    n, tokens = _run(cases)
    for b, case in enumerate(cases):
        assert n[b] == case.n
        assert tokens[b, : case.n + 1].tolist() == case.tokens


GREEDY_CASES = [
    # (drafts, target argmaxes [γ+1], expected n); the tokens are always the target's
    ([1, 2, 3], [1, 2, 3, 4], 3),  # all equal: the bonus is the target's last argmax
    ([5, 2, 3], [1, 2, 3, 4], 0),  # first differs
    ([1, 9, 3], [1, 2, 3, 4], 1),  # a later match after a mismatch does not count
    ([1, 2, 9], [1, 2, 3, 4], 2),
    ([0, 0, 0], [0, 0, 0, 0], 3),
]


@pytest.mark.parametrize("drafts, target, n", GREEDY_CASES)
def test_rejection_greedy_exact(drafts, target, n):
    got_n, tokens = rejection_greedy_jit(jnp.asarray([drafts], jnp.int32),
                                         jnp.asarray([target], jnp.int32))
    assert int(got_n[0]) == n
    assert np.asarray(tokens)[0, : n + 1].tolist() == target[: n + 1]


def test_rejection_greedy_batched_and_gamma_one():
    drafts = jnp.asarray([c[0] for c in GREEDY_CASES], jnp.int32)
    target = jnp.asarray([c[1] for c in GREEDY_CASES], jnp.int32)
    n, tokens = rejection_greedy_jit(drafts, target)
    assert np.asarray(n).tolist() == [c[2] for c in GREEDY_CASES]
    for b, (_, t, k) in enumerate(GREEDY_CASES):
        assert np.asarray(tokens)[b, : k + 1].tolist() == t[: k + 1]
    n, tokens = rejection_greedy_jit(jnp.asarray([[7], [7]]), jnp.asarray([[7, 1], [6, 2]]))
    assert np.asarray(n).tolist() == [1, 0]
    assert np.asarray(tokens)[0].tolist() == [7, 1] and int(tokens[1, 0]) == 6


# --- distribution of the output on its own (no model) -------------------------------------

def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=probs.size)
    assert np.all(counts[probs == 0] == 0), "drew a token of zero target probability"
    return chi2_pvalue(counts, probs)


@pytest.mark.parametrize("one_hot_draft", [False, True])
def test_rejection_output_follows_p(one_hot_draft):
    """With drafts drawn from q, every emitted position follows p (fixed p, q per position).

    tokens[0] ~ p_0; given n >= 1, tokens[1] ~ p_1; given n = 2, the bonus tokens[2] ~ p_2;
    and P(n >= 1) = sum_x min(p_0(x), q_0(x)) = 1 - TV(p_0, q_0).
    """
    rows, gamma, vocab = 200_000, 2, 6
    rng = np.random.default_rng(11 + one_hot_draft)
    p = rng.dirichlet(np.full(vocab, 0.7), size=gamma + 1).astype(np.float32)
    p[0, 5] = 0.0  # a token the target never emits
    p /= p.sum(-1, keepdims=True)
    q = rng.dirichlet(np.full(vocab, 0.7), size=gamma).astype(np.float32)
    if one_hot_draft:
        q = np.eye(vocab, dtype=np.float32)[[2, 1]]  # an n-gram draft: always 2, then 1
    k_draft, k_u = jax.random.split(jax.random.key(3))
    u_draft = jax.random.uniform(k_draft, (rows, gamma))
    drafts = sampling.sample(jnp.broadcast_to(jnp.asarray(q), (rows, gamma, vocab)), u_draft)
    n, tokens = rejection_jit(drafts, jnp.broadcast_to(jnp.asarray(q), (rows, gamma, vocab)),
                              jnp.broadcast_to(jnp.asarray(p), (rows, gamma + 1, vocab)),
                              jax.random.uniform(k_u, (rows, gamma + 1)))
    n, tokens = np.asarray(n), np.asarray(tokens)
    accept = np.minimum(p[0], q[0]).sum()
    assert stats.binomtest(int((n >= 1).sum()), rows, float(accept)).pvalue > 1e-3
    assert _chi2_pvalue(tokens[:, 0], p[0]) > 1e-3
    assert _chi2_pvalue(tokens[n >= 1, 1], p[1]) > 1e-3
    assert _chi2_pvalue(tokens[n == 2, 2], p[2]) > 1e-3
