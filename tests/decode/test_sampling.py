"""logits -> probabilities -> tokens (jaxspec.sampling).

Top-k and top-p are checked against Hugging Face's warpers (a numpy re-implementation of their
logic, and the real `transformers` classes through torch), `first_argmax` against numpy's
first-index argmax, and `sample` against the weights it is given.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxspec.decode import sampling
from jaxspec.errors import UserError

NEG_INF = -np.inf


# --- numpy re-implementation of Hugging Face's TopKLogitsWarper / TopPLogitsWarper ----------

def hf_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Remove every score below the k-th largest (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth = np.sort(scores, axis=-1)[..., -k][..., None]
    return np.where(scores < kth, NEG_INF, scores)


def hf_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Sort ascending, remove the prefix whose cumulative probability is <= 1 - p, keep >= 1."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=-1).astype(np.float32)
    shifted = np.exp(ordered - ordered[..., -1:])
    cumulative = np.cumsum(shifted / shifted.sum(-1, keepdims=True), axis=-1, dtype=np.float32)
    remove_sorted = cumulative <= np.float32(1 - p)
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def hf_pipeline(scores: np.ndarray, temperature: float, k: int, p: float) -> np.ndarray:
    """Hugging Face order: temperature, then top-k, then top-p (each only when active)."""
    scores = scores.astype(np.float32) / np.float32(temperature)
    if k > 0:
        scores = hf_top_k(scores, k)
    if p < 1:
        scores = hf_top_p(scores, p)
    return scores


_filtered = jax.jit(sampling.filtered_logits, static_argnums=0)  # values traced: few compiles
top_k_mask = jax.jit(sampling.top_k_mask)
top_p_mask = jax.jit(sampling.top_p_mask)


def jax_filtered(logits, temperature, top_k=0, top_p=1.0) -> np.ndarray:
    sampler, values = sampling.make(temperature, top_k, top_p)
    return np.asarray(_filtered(sampler, values, jnp.asarray(logits, jnp.float32)))


def kept(logits) -> np.ndarray:
    return np.isfinite(np.asarray(logits))


def assert_same_filter(ours: np.ndarray, reference: np.ndarray):
    np.testing.assert_array_equal(kept(ours), kept(reference))
    np.testing.assert_allclose(ours[kept(ours)], reference[kept(reference)], rtol=1e-6)


# --- top-k --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "logits, k, expected",
    [
        # k = 1 with a tie at the top: both 3s are the "first largest", both kept (as HF)
        ([1.0, 3.0, 2.0, 3.0, 0.0], 1, [0, 1, 0, 1, 0]),
        # k = 2: the 2nd largest is again 3 -> the same set
        ([1.0, 3.0, 2.0, 3.0, 0.0], 2, [0, 1, 0, 1, 0]),
        # k = 3: the 3rd largest is 2
        ([1.0, 3.0, 2.0, 3.0, 0.0], 3, [0, 1, 1, 1, 0]),
        # all negative
        ([-1.5, -0.5, -2.0, -7.0], 2, [1, 1, 0, 0]),
        # k = 0 disables the filter; k >= V keeps everything
        ([1.0, 3.0, 2.0], 0, [1, 1, 1]),
        ([1.0, 3.0, 2.0], 3, [1, 1, 1]),
        ([1.0, 3.0, 2.0], 100, [1, 1, 1]),
        # -inf entries stay removed; the k-th largest may itself be -inf
        ([NEG_INF, 1.0, NEG_INF, 2.0], 1, [0, 0, 0, 1]),
        ([NEG_INF, 1.0, NEG_INF, 2.0], 3, [0, 1, 0, 1]),
        # extreme magnitudes and tiny differences are ordered exactly
        ([3e38, -3e38, 1e-38, 0.0, 1e-45], 3, [1, 0, 1, 0, 1]),
        ([1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 0.5], 1, [0, 1, 0]),
        # -0.0 == +0.0: a tie, so both are kept as Hugging Face (torch) does
        ([0.0, -0.0, -1.0], 1, [1, 1, 0]),
        ([-0.0, 0.0, -1.0], 2, [1, 1, 0]),
    ],
)
def test_top_k_exact(logits, k, expected):
    logits = np.asarray(logits, np.float32)
    ours = np.asarray(top_k_mask(jnp.asarray(logits), jnp.int32(k)))
    np.testing.assert_array_equal(kept(ours), np.asarray(expected, bool))
    np.testing.assert_array_equal(ours[kept(ours)], logits[kept(ours)])  # values untouched
    if k > 0:
        assert_same_filter(ours, hf_top_k(logits, k))


def test_top_k_matches_numpy_reference_with_many_ties():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(200, 40)) * 2, 0).astype(np.float32)  # heavy ties
    for k in (1, 2, 5, 17, 39, 40):
        ours = np.asarray(top_k_mask(jnp.asarray(logits), jnp.int32(k)))
        assert_same_filter(ours, hf_top_k(logits, k))


# --- top-p --------------------------------------------------------------------------------

def _logits_for(probs):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, np.float32))


@pytest.mark.parametrize(
    "probs, p, expected",
    [
        # sorted masses 0.5, 0.25, 0.15, 0.1 (cumulative 0.5, 0.75, 0.9, 1.0)
        ([0.15, 0.5, 0.1, 0.25], 0.3, [0, 1, 0, 0]),   # 0.5 >= 0.3
        ([0.15, 0.5, 0.1, 0.25], 0.6, [0, 1, 0, 1]),   # 0.5 < 0.6 <= 0.75
        ([0.15, 0.5, 0.1, 0.25], 0.8, [1, 1, 0, 1]),   # 0.75 < 0.8 <= 0.9
        ([0.15, 0.5, 0.1, 0.25], 0.95, [1, 1, 1, 1]),  # 0.9 < 0.95
        ([0.15, 0.5, 0.1, 0.25], 1.0, [1, 1, 1, 1]),   # p = 1 disables the filter
        ([0.15, 0.5, 0.1, 0.25], 1e-6, [0, 1, 0, 0]),  # at least one token is kept
        # a zero-probability token is never needed to reach p
        ([0.0, 0.6, 0.4], 0.99, [0, 1, 1]),
    ],
)
def test_top_p_exact(probs, p, expected):
    logits = _logits_for(probs)
    ours = np.asarray(top_p_mask(jnp.asarray(logits), jnp.float32(p)))
    np.testing.assert_array_equal(kept(ours), np.asarray(expected, bool))
    assert_same_filter(ours, hf_top_p(logits, p))


def test_top_p_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(300, 50)) * rng.uniform(0.2, 4.0, size=(300, 1))).astype(np.float32)
    for p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.99):
        ours = np.asarray(top_p_mask(jnp.asarray(logits), jnp.float32(p)))
        assert_same_filter(ours, hf_top_p(logits, p))


def test_top_p_ties_at_the_cut_keep_a_superset_of_tied_tokens_only():
    # masses 0.3, 0.3, 0.2, 0.2; p = 0.7 needs three tokens and the third is one of two tied
    # 0.2s. Hugging Face keeps the one its sort puts last; every extra token kept here must
    # be tied with the smallest kept by Hugging Face.
    logits = _logits_for([0.2, 0.3, 0.2, 0.3])
    ours = kept(top_p_mask(jnp.asarray(logits), jnp.float32(0.7)))
    reference = kept(hf_top_p(logits, 0.7))
    assert np.all(ours >= reference)
    assert np.all(logits[ours & ~reference] == logits[reference].min())
    # p = 0.5 needs both 0.3s and nothing else, with no tie at the cut
    np.testing.assert_array_equal(kept(top_p_mask(jnp.asarray(logits), 0.5)),
                                  [False, True, False, True])


def test_pipeline_order_matches_numpy_reference():
    """Temperature, then top-k, then top-p on the renormalised top-k distribution."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(128, 32)) * 3).astype(np.float32)
    for temperature, k, p in [(1.0, 0, 0.8), (0.7, 5, 1.0), (0.7, 5, 0.6), (1.3, 10, 0.9),
                              (0.5, 1, 0.5), (2.0, 32, 0.95)]:
        assert_same_filter(jax_filtered(logits, temperature, k, p),
                           hf_pipeline(logits, temperature, k, p))


def test_pipeline_matches_transformers_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(256, 64)) * rng.uniform(0.3, 5.0, size=(256, 1))).astype(np.float32)
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    for temperature, k, p in [(1.0, 0, 0.9), (1.0, 0, 0.3), (0.7, 5, 1.0), (0.7, 5, 0.8),
                              (1.5, 20, 0.95), (0.9, 1, 0.9), (1.0, 64, 0.5)]:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if k > 0:
            warpers.append(TopKLogitsWarper(k))
        if p < 1:
            warpers.append(TopPLogitsWarper(p))
        reference = warpers(ids, torch.from_numpy(logits.copy())).numpy()
        assert_same_filter(jax_filtered(logits, temperature, k, p), reference)


def test_probabilities_are_the_softmax_of_the_kept_logits():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(8, 20)) * 2).astype(np.float32)
    sampler, values = sampling.make(0.8, 6, 0.7)
    probs = np.asarray(sampling.probabilities(sampler, values, jnp.asarray(logits)))
    reference = hf_pipeline(logits, 0.8, 6, 0.7)
    expected = np.exp(reference - reference.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    assert np.all((probs > 0) == kept(reference))
    assert np.all(np.count_nonzero(probs, -1) <= 6)


# --- first_argmax ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, expected",
    [
        ([1.0, 3.0, 3.0, 2.0], 1),
        ([5.0, 5.0, 5.0], 0),
        ([0.0, 1.0, 2.0, 2.0], 2),
        ([NEG_INF, NEG_INF, -1e30], 2),
        ([-2.0, NEG_INF, -2.0], 0),
        ([7.0], 0),
    ],
)
def test_first_argmax_exact(x, expected):
    assert int(sampling.first_argmax(jnp.asarray(x, jnp.float32))) == expected


def test_first_argmax_is_numpy_first_index_argmax_with_ties():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(3, 50, 7)).astype(np.float32)  # many ties in every row
    ours = np.asarray(sampling.first_argmax(jnp.asarray(x)))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.argmax(x, axis=-1))


# --- sample ----------------------------------------------------------------------------

def test_sample_inverse_cdf_exact():
    # weights 0, 1, 0, 2, 0 (total 3): u * 3 in [0, 1) -> index 1, in [1, 3) -> index 3
    weights = jnp.asarray([0.0, 1.0, 0.0, 2.0, 0.0])
    top = float(np.nextafter(np.float32(1), np.float32(0)))  # largest float32 below 1
    for u, expected in [(0.0, 1), (0.2, 1), (0.33, 1), (0.34, 3), (0.9, 3), (top, 3)]:
        assert int(sampling.sample(weights, jnp.float32(u))) == expected, u


def test_sample_never_draws_zero_weight_entries():
    rng = np.random.default_rng(6)
    weights = rng.uniform(size=(64, 16)).astype(np.float32)
    weights[rng.uniform(size=weights.shape) < 0.6] = 0.0
    weights[:, 0] = 0.0  # leading and trailing zeros on every row
    weights[:, -1] = 0.0
    weights[np.arange(64), rng.integers(1, 15, size=64)] = 1e-30  # at least one positive
    top = np.float32(np.nextafter(np.float32(1), np.float32(0)))
    grid = np.concatenate([np.linspace(0, 1, 500, endpoint=False, dtype=np.float32), [top]])
    u = np.broadcast_to(grid[:, None], (grid.size, 64))
    draws = np.asarray(
        jax.vmap(sampling.sample, in_axes=(None, 0))(jnp.asarray(weights), jnp.asarray(u)))
    assert np.all(weights[np.arange(64)[None], draws] > 0)


def test_sample_follows_unnormalised_weights():
    weights = np.asarray([0.0, 3.0, 1.0, 0.0, 0.5, 5.5, 0.0], np.float32)  # total 10
    n = 200_000
    u = jax.random.uniform(jax.random.key(7), (n,))
    draws = np.asarray(sampling.sample(jnp.broadcast_to(jnp.asarray(weights), (n, 7)), u))
    counts = np.bincount(draws, minlength=7)
    assert np.all(counts[weights == 0] == 0)
    positive = weights > 0
    expected = n * weights[positive] / weights.sum()
    assert stats.chisquare(counts[positive], expected).pvalue > 1e-3


def test_uniforms_are_uniform_and_pure():
    seeds = sampling.row_seeds(jax.random.key(3, impl="rbg"), 1000)  # [1000, 2]
    u = np.asarray(sampling.uniforms(seeds, 5, 100))  # [1000, 100]
    assert u.dtype == np.float32 and u.shape == (1000, 100)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    bits = (u.ravel() * 2**23).astype(np.int64)  # 23 random mantissa bits, each fair
    np.testing.assert_array_equal(bits, u.ravel() * 2**23)
    assert np.all(np.abs([((bits >> i) & 1).mean() - 0.5 for i in range(23)]) < 0.005)
    np.testing.assert_array_equal(np.asarray(sampling.uniforms(seeds, 5, 100)), u)  # pure
    u2 = np.asarray(sampling.uniforms(seeds, 6, 100))
    assert abs(stats.pearsonr(u.ravel(), u2.ravel())[0]) < 0.02  # the next counter: fresh


def _pairs_pvalue(a, b, bins=16) -> float:
    """Chi-square p-value that (a, b) is uniform on the unit square."""
    counts = np.histogram2d(a.ravel(), b.ravel(), bins=bins, range=[[0, 1], [0, 1]])[0]
    return stats.chisquare(counts.ravel()).pvalue


@pytest.mark.parametrize("source", ["key", "consecutive_row_seeds"])
def test_uniforms_of_rows_draws_and_iterations_are_independent(source):
    """Pooled over rows and iterations, and in pairs of neighbouring rows, draws and
    iterations (the 2-D joint must be uniform, so neighbours carry no information)."""
    rows, steps, n = 4000, 6, 7
    key = jax.random.key(0) if source == "key" else jnp.arange(rows, dtype=jnp.uint32)
    seeds = sampling.row_seeds(key, rows)
    u = np.stack([np.asarray(sampling.uniforms(seeds, t, n)) for t in range(steps)], 1)
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3  # [rows, steps, n] pooled
    for a, b in [(u[:-1], u[1:]), (u[:, :-1], u[:, 1:]), (u[..., :-1], u[..., 1:])]:
        assert _pairs_pvalue(a, b) > 1e-3
        assert abs(stats.pearsonr(a.ravel(), b.ravel())[0]) < 0.01
    assert len(np.unique(u)) > 0.99 * u.size  # no repeated streams


def test_uniforms_of_a_row_depend_only_on_its_seed_and_the_counter():
    seeds = sampling.row_seeds(jnp.asarray([7, 0, 2**32 - 1, 7], jnp.uint32), 4)
    u = np.asarray(sampling.uniforms(seeds, 3, 9))
    np.testing.assert_array_equal(u[0], u[3])  # equal seeds, equal draws
    assert not np.any(u[0] == u[1]) and not np.any(u[0] == u[2])  # different seeds differ
    alone = sampling.uniforms(seeds[2:3], 3, 9)  # the row on its own, or counters per row
    np.testing.assert_array_equal(np.asarray(alone), u[2:3])
    per_row = sampling.uniforms(seeds, jnp.asarray([3, 4, 3, 3]), 9)
    np.testing.assert_array_equal(np.asarray(per_row)[[0, 2, 3]], u[[0, 2, 3]])
    np.testing.assert_array_equal(np.asarray(per_row)[1],
                                  np.asarray(sampling.uniforms(seeds, 4, 9))[1])
    # a draw's value does not depend on how many are drawn
    np.testing.assert_array_equal(np.asarray(sampling.uniforms(seeds, 3, 4)), u[:, :4])


def test_row_seeds_from_a_key_do_not_depend_on_the_batch_size():
    key = jax.random.key(11)
    few, many = sampling.row_seeds(key, 3), sampling.row_seeds(key, 24_000)
    assert few.dtype == jnp.uint32 and few.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(few), np.asarray(many)[:3])
    assert len(np.unique(np.asarray(many), axis=0)) == 24_000  # every row its own stream
    assert not np.array_equal(np.asarray(sampling.row_seeds(jax.random.key(12), 3)), few)


@pytest.mark.parametrize("key", [jnp.zeros((3,), jnp.uint32), jnp.zeros((4,), jnp.float32),
                                 jnp.zeros((4, 1), jnp.uint32)])
def test_row_seeds_reject_other_arrays(key):
    with pytest.raises(ValueError, match="PRNG key"):
        sampling.row_seeds(key, 4)


def test_sample_rows_are_independent():
    weights = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    u = jnp.asarray([0.99, 0.0, 0.75])
    np.testing.assert_array_equal(np.asarray(sampling.sample(weights, u)), [0, 2, 2])


def test_next_token_greedy_and_sampled():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [4.0, -1.0, 0.0, 4.0]])
    sampler, values = sampling.make(0.0)
    np.testing.assert_array_equal(
        np.asarray(sampling.next_token(sampler, values, logits, jnp.zeros(2))), [1, 0])
    # temperature 1, top-k 1: only the (tied) maxima survive, each with mass 1/2
    sampler, values = sampling.make(1.0, 1)
    for u, expected in [(0.25, [1, 0]), (0.75, [2, 3])]:
        np.testing.assert_array_equal(
            np.asarray(sampling.next_token(sampler, values, logits, jnp.full(2, u))), expected)


# --- make ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1), dict(temperature=math.nan),
        dict(temperature=1.0, top_p=0.0), dict(temperature=1.0, top_p=1.5),
        dict(temperature=1.0, top_p=-0.2), dict(temperature=1.0, top_p=math.nan),
        dict(temperature=1.0, top_k=-1), dict(temperature=1.0, top_k=2.5),
    ],
)
def test_make_rejects_bad_values(kwargs):
    with pytest.raises(UserError):
        sampling.make(**kwargs)


def test_make_static_flags_and_traced_values():
    sampler, values = sampling.make(0.0, 5, 0.5)  # greedy ignores the filters
    assert sampler == sampling.Sampler(greedy=True, use_top_k=False, use_top_p=False)
    sampler, values = sampling.make(1.0)
    assert sampler == sampling.Sampler(greedy=False, use_top_k=False, use_top_p=False)
    sampler, values = sampling.make(0.7, 5, 0.9)
    assert sampler == sampling.Sampler(greedy=False, use_top_k=True, use_top_p=True)
    assert float(values.temperature) == pytest.approx(0.7)
    assert int(values.top_k) == 5 and float(values.top_p) == pytest.approx(0.9)
    # new values of the same kind share the static part (no recompilation)
    assert sampling.make(0.3, 7, 0.2)[0] == sampler
