"""The NKI rejection kernel's NumPy model (same tiles, same order of operations) against the
jax.numpy reference, on identical inputs and uniforms.

n (the accept test and leading count) is exact arithmetic and must always agree. The token
draw sums fp32 in a different order (tiles with a carry vs XLA's cumsum), so on random inputs
u_γ is kept MARGIN away from every CDF boundary (rejection_inputs); on the hand-built table
cases of tests/decode/test_rejection.py, and on dyadic weights whose sums are exact in any
order, tokens must agree exactly, boundaries (ties) included.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rejection_inputs as ri
from helpers import REPO

from jaxspec.decode import sampling
from jaxspec.decode.rejection import rejection, rejection_greedy
from jaxspec.kernels import numpy_model
from jaxspec.kernels.nki_rejection import TILE, layout, tiles

rejection_jit = jax.jit(rejection)
greedy_jit = jax.jit(lambda drafts, logits: rejection_greedy(drafts, sampling.first_argmax(logits)))
sample_jit = jax.jit(sampling.sample)
VOCAB_152K = 152_064  # Qwen2/3: 74 full tiles and one of 512


def _table_cases():
    """CASES of tests/decode/test_rejection.py, loaded from its file (tests/decode is not a
    package)."""
    path = os.path.join(REPO, "tests", "decode", "test_rejection.py")
    spec = importlib.util.spec_from_file_location("_decode_rejection_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.CASES, module.GREEDY_CASES


CASES, GREEDY_CASES = _table_cases()


def _reference(inputs: ri.Inputs):
    n, tokens = rejection_jit(jnp.asarray(inputs.drafts), jnp.asarray(inputs.q),
                              jnp.asarray(inputs.p), jnp.asarray(inputs.u))
    return np.asarray(n), np.asarray(tokens)


def _model(inputs: ri.Inputs):
    return numpy_model.sampled(inputs.drafts, inputs.q, inputs.p, inputs.u)


def _assert_same(inputs: ri.Inputs):
    n_ref, tokens_ref = _reference(inputs)
    n, tokens = _model(inputs)
    assert n.dtype == np.int32 and tokens.dtype == np.int32
    np.testing.assert_array_equal(n, n_ref)
    np.testing.assert_array_equal(tokens, tokens_ref)
    return n


def test_tiles_cover_the_vocabulary():
    assert tiles(1000) == [(0, 1000)]
    assert tiles(2 * TILE + 7) == [(0, TILE), (TILE, TILE), (2 * TILE, 7)]
    assert sum(size for _, size in tiles(VOCAB_152K)) == VOCAB_152K
    assert len(tiles(VOCAB_152K)) == VOCAB_152K // TILE + 1


# --- table cases: exact ---------------------------------------------------------------------

def _case_inputs(cases) -> ri.Inputs:
    def f32(key):
        return np.asarray([getattr(c, key) for c in cases], np.float32)

    return ri.Inputs(np.asarray([c.drafts for c in cases], np.int32), f32("q"), f32("p"),
                     f32("u"))


@pytest.mark.parametrize("name", list(CASES))
def test_table_case_exact(name):
    case = CASES[name]
    inputs = _case_inputs([case])
    n, tokens = _model(inputs)
    assert n[0] == case.n and tokens[0, :case.n + 1].tolist() == case.tokens
    _assert_same(inputs)


def test_table_cases_batched():
    cases = [c for c in CASES.values() if len(c.drafts) == 3 and len(c.p[0]) == 4]
    assert len(cases) >= 6
    _assert_same(_case_inputs(cases))


# --- random inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("batch, gamma, vocab", [
    (8, 1, 1000), (4, 8, 1000), (16, 8, 1000),  # 144 rows: more than 128
    (4, 3, 3 * 16384 + 7),  # 49159: a last tile of 7
    (2, 3, 2 * TILE), (3, 0, 5000),  # an exact multiple of the tile; γ = 0 (plain sampling)
    (2, 1, VOCAB_152K), (1, 3, VOCAB_152K), (1, 8, VOCAB_152K),
])
def test_random_inputs_match_reference(batch, gamma, vocab):
    rng = np.random.default_rng(batch * 1000 + gamma * 10 + vocab)
    inputs = ri.random_inputs(rng, batch, gamma, vocab)
    n, _ = _reference(inputs)  # n does not depend on u_γ
    inputs = ri.away_from_boundaries(rng, inputs, n)
    n = _assert_same(inputs)
    if gamma and batch >= 4:  # the kinds of row did what they are for
        assert n[1] == gamma  # "equal": everything accepted, the bonus drawn
        assert n[3] < gamma  # "above": rejected somewhere


def test_zero_residual_falls_back_to_p_at_full_vocabulary():
    """Every row rejects at position 0 with q = p·(1 + 1e-3): the residual is zero and the
    draw comes from p_0 (cdf of p, not of an all-zero residual, which would give token 0)."""
    rng = np.random.default_rng(7)
    batch, gamma = 3, 2
    p = ri.probabilities(rng, (batch, gamma + 1, VOCAB_152K))
    q = p[:, :gamma] * np.float32(1.001)
    drafts = ri.draw(rng, q)
    u = ri.uniforms(rng, (batch, gamma + 1))
    u[:, 0] = np.float32(1 - 2**-20)
    inputs = ri.away_from_boundaries(rng, ri.Inputs(drafts, q, p, u), np.zeros(batch, int))
    n = _assert_same(inputs)
    assert n.tolist() == [0] * batch
    assert np.all(ri.final_weights(inputs, n) == p[:, 0])


# --- ties: dyadic weights, exact sums in any order ------------------------------------------

def _dyadic_weights(rng, vocab: int, zero=slice(0, 0)) -> np.ndarray:
    """[V] multiples of 2^-14 summing to exactly 1, spread over the tiles, with zeros (at
    least on `zero`)."""
    allowed = np.delete(np.arange(vocab), np.arange(vocab)[zero])
    w = np.zeros(vocab, np.float64)
    np.add.at(w, rng.choice(allowed, 2**14, replace=True), 2.0**-14)
    return w.astype(np.float32)


def test_sample_ties_at_cdf_boundaries():
    """u·total exactly equal to cdf[k] counts k as below (cdf <= u·total), across tiles."""
    rng = np.random.default_rng(3)
    vocab = 2 * TILE + 100
    w = _dyadic_weights(rng, vocab, zero=slice(TILE - 3, TILE + 5))  # zeros across a boundary
    assert w[TILE - 4] > 0
    cdf = np.cumsum(w.astype(np.float64))
    positive = np.flatnonzero(w)
    boundaries = [positive[0], positive[len(positive) // 2], TILE - 4, positive[-2]]
    u = np.asarray([cdf[k] for k in boundaries] + [0.0, 0.5, 0.999], np.float32)
    weights = np.broadcast_to(w, (len(u), vocab))
    got = numpy_model.sample(weights, u)
    np.testing.assert_array_equal(got, np.asarray(sample_jit(jnp.asarray(weights), jnp.asarray(u))))
    # the draw at boundary k is the next positive index (zero weights skipped)
    for row, k in enumerate(boundaries):
        assert got[row] == positive[np.searchsorted(positive, k, side="right")]


def test_sample_clamps_to_the_last_positive_index():
    """u = 1 (outside the contract) counts every entry; both clamp to the last positive
    weight. All-zero weights draw 0."""
    rng = np.random.default_rng(4)
    w = _dyadic_weights(rng, TILE + 50, zero=slice(-300, None))
    weights = np.stack([w, np.zeros_like(w)])
    u = np.asarray([1.0, 0.5], np.float32)
    got = numpy_model.sample(weights, u)
    assert got.tolist() == [np.flatnonzero(w)[-1], 0]
    np.testing.assert_array_equal(got, np.asarray(sample_jit(jnp.asarray(weights), jnp.asarray(u))))


# --- greedy ---------------------------------------------------------------------------------

def _greedy_inputs(rng, batch, gamma, vocab, levels=None):
    """Logits [B, γ+1, V] (few distinct values when `levels`: many ties) and drafts that match
    the first argmax for a random number of leading positions."""
    if levels:
        logits = rng.integers(0, levels, (batch, gamma + 1, vocab)).astype(np.float32)
    else:
        logits = rng.standard_normal((batch, gamma + 1, vocab)).astype(np.float32)
    argmax = np.asarray(sampling.first_argmax(jnp.asarray(logits)))
    drafts = argmax[:, :gamma].copy()
    for b in range(batch):
        cut = rng.integers(0, gamma + 1)
        drafts[b, cut:] = (drafts[b, cut:] + 1 + rng.integers(0, vocab - 1, gamma - cut)) % vocab
    return drafts.astype(np.int32), logits


def _assert_greedy_same(drafts, logits):
    n_ref, tokens_ref = greedy_jit(jnp.asarray(drafts), jnp.asarray(logits))
    n, tokens = numpy_model.greedy_from_logits(drafts, logits)
    np.testing.assert_array_equal(n, np.asarray(n_ref))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))
    return n, tokens


@pytest.mark.parametrize("batch, gamma, vocab, levels", [
    (6, 3, 1000, 3), (3, 8, 3 * 16384 + 7, 50), (2, 1, VOCAB_152K, None),
    (1, 3, VOCAB_152K, 1000),
])
def test_greedy_matches_reference(batch, gamma, vocab, levels):
    rng = np.random.default_rng(vocab + gamma)
    _assert_greedy_same(*_greedy_inputs(rng, batch, gamma, vocab, levels))


def test_greedy_first_index_wins_ties_across_tiles():
    """The maximum appears in tile 0, tile 2 and the partial last tile: index of the first;
    a strictly greater value in a later tile replaces it."""
    vocab = 3 * TILE + 10
    logits = np.zeros((1, 3, vocab), np.float32)
    logits[0, 0, [TILE + 5, 2 * TILE + 1, 3 * TILE + 9]] = 2.0  # first in tile 1
    logits[0, 1, [3, 2 * TILE]] = 1.0
    logits[0, 1, 3 * TILE + 2] = 1.5  # strictly greater, last tile
    logits[0, 2] = -1.0  # all equal: index 0
    drafts = np.asarray([[TILE + 5, 3 * TILE + 2]], np.int32)
    n, tokens = _assert_greedy_same(drafts, logits)
    assert tokens.tolist() == [[TILE + 5, 3 * TILE + 2, 0]] and n.tolist() == [2]


@pytest.mark.parametrize("drafts, target, n", GREEDY_CASES)
def test_greedy_table_cases(drafts, target, n):
    """The decode tests' greedy cases, with logits whose first argmaxes are the targets."""
    logits = np.zeros((1, len(target), 10), np.float32)
    logits[0, np.arange(len(target)), target] = 1.0
    got_n, tokens = _assert_greedy_same(np.asarray([drafts], np.int32), logits)
    assert got_n.tolist() == [n] and tokens[0].tolist() == target


def test_layout_is_the_same_in_jax_and_numpy():
    """The wrapper lays out in JAX what the model and nki.simulate lay out in NumPy."""
    inputs = ri.random_inputs(np.random.default_rng(2), 3, 2, 50)
    with_np = layout(inputs.drafts, inputs.q, inputs.p, inputs.u, xp=np)
    with_jnp = layout(*(jnp.asarray(a) for a in (inputs.drafts, inputs.q, inputs.p, inputs.u)))
    for a, b in zip(with_np, with_jnp):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b))
    p2, q2, u2, x = with_np
    assert p2.shape == q2.shape == (9, 50) and u2.shape == (9, 2) and x.shape == (3, 3)
    assert np.all(q2[2::3] == 0) and np.all(x[:, 2] == -1) and np.all(u2[2::3, 0] == 0)
    np.testing.assert_array_equal(u2[:, 1].reshape(3, 3), np.repeat(inputs.u[:, 2:], 3, 1))
