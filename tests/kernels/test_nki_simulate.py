"""The NKI kernels themselves, run by nki.simulate on CPU, against the jax.numpy reference.

Needs the real nki package of the Neuron SDK; skipped elsewhere (the NumPy model tests in
test_nki_model.py cover the kernel's arithmetic there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rejection_inputs as ri

from jaxspec.decode import sampling
from jaxspec.decode.rejection import rejection, rejection_greedy
from jaxspec.kernels import nki_rejection
from jaxspec.kernels.nki_rejection import TILE

pytestmark = pytest.mark.skipif(
    not nki_rejection.AVAILABLE,
    reason="the real nki package (Neuron SDK) is not installed: nki.simulate cannot run")


@pytest.fixture(autouse=True)
def _trn2_target(monkeypatch):
    """Off-device tracing needs a target; keep the caller's if set."""
    import os

    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE",
                       os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2"))


def _simulate(kernel, lnc, *arrays):
    import nki

    arrays = [np.ascontiguousarray(a, np.float32) for a in arrays]
    return [np.asarray(out) for out in nki.simulate(kernel[lnc])(*arrays)]


@pytest.mark.parametrize("lnc", [1, 2])
@pytest.mark.parametrize("batch, gamma, vocab", [(4, 3, 1000), (3, 1, 2 * TILE + 7),
                                                 (1, 0, 300)])
def test_simulated_sampled_kernel_matches_reference(lnc, batch, gamma, vocab):
    rng = np.random.default_rng(vocab + gamma)
    inputs = ri.random_inputs(rng, batch, gamma, vocab)
    args = [jnp.asarray(a) for a in (inputs.drafts, inputs.q, inputs.p)]
    n_ref, _ = jax.jit(rejection)(*args, jnp.asarray(inputs.u))
    inputs = ri.away_from_boundaries(rng, inputs, np.asarray(n_ref))
    n_ref, tokens_ref = jax.jit(rejection)(*args, jnp.asarray(inputs.u))
    n, tokens = _simulate(nki_rejection.sampled_kernel, lnc, *nki_rejection.layout(
        inputs.drafts, inputs.q, inputs.p, inputs.u, xp=np))
    np.testing.assert_array_equal(n[:, 0], np.asarray(n_ref))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))


@pytest.mark.parametrize("lnc", [1, 2])
def test_simulated_greedy_kernel_matches_reference(lnc):
    rng = np.random.default_rng(5)
    batch, gamma, vocab = 3, 3, 2 * TILE + 7
    logits = rng.integers(0, 20, (batch, gamma + 1, vocab)).astype(np.float32)  # many ties
    target = np.asarray(sampling.first_argmax(jnp.asarray(logits)))
    drafts = target[:, :gamma].copy()
    drafts[1, 1] = (drafts[1, 1] + 1) % vocab
    n_ref, tokens_ref = rejection_greedy(jnp.asarray(drafts), jnp.asarray(target))
    n, tokens = _simulate(nki_rejection.greedy_kernel, lnc,
                          *nki_rejection.greedy_layout(drafts, logits, xp=np))
    np.testing.assert_array_equal(n[:, 0], np.asarray(n_ref))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))
