"""The NKI kernel bodies themselves, run on CPU with fake_nki (a NumPy stand-in for the NKI
0.6 operations they use, as documented), against the NumPy model bit for bit and against
the reference.

This executes the kernel's own code: tile offsets, partition groups (B·(γ+1) > 128), the
split of batch rows over a kernel[2] grid, the HBM round trip of the epilogue. It cannot
confirm that the real NKI behaves as documented; test_nki_simulate.py does, where nki is
installed.
"""

from __future__ import annotations

import fake_nki
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rejection_inputs as ri

from jaxspec.decode import sampling
from jaxspec.decode.rejection import rejection, rejection_greedy
from jaxspec.kernels import nki_rejection, numpy_model
from jaxspec.kernels.nki_rejection import TILE

rejection_jit = jax.jit(rejection)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(nki_rejection, "nl", fake_nki.nl)
    monkeypatch.setattr(nki_rejection, "nisa", fake_nki.nisa)
    return fake_nki


@pytest.mark.parametrize("lnc, batch, gamma, vocab", [
    (1, 4, 3, 1000), (2, 5, 3, 2 * TILE + 7),  # 5 rows over 2 programs: 3 and 2
    (2, 1, 1, 3000),  # program 1 has no rows
    (1, 16, 8, 300),  # 144 rows: two partition groups (14 and 2 batch rows)
    (2, 2, 0, 700),  # γ = 0
    (2, 1, 1, 152_064),
])
def test_fake_sampled_kernel_matches_model_and_reference(fake, lnc, batch, gamma, vocab):
    rng = np.random.default_rng(batch + gamma + vocab)
    inputs = ri.random_inputs(rng, batch, gamma, vocab)
    args = [jnp.asarray(a) for a in (inputs.drafts, inputs.q, inputs.p)]
    n_ref, _ = rejection_jit(*args, jnp.asarray(inputs.u))
    inputs = ri.away_from_boundaries(rng, inputs, np.asarray(n_ref))
    n, tokens = fake.launch(nki_rejection._sampled_body, lnc, *nki_rejection.layout(
        inputs.drafts, inputs.q, inputs.p, inputs.u, xp=np))
    assert n.shape == (batch, 1) and tokens.shape == (batch, gamma + 1)
    n_model, tokens_model = numpy_model.sampled(inputs.drafts, inputs.q, inputs.p, inputs.u)
    np.testing.assert_array_equal(n[:, 0], n_model)
    np.testing.assert_array_equal(tokens, tokens_model)
    n_ref, tokens_ref = rejection_jit(*args, jnp.asarray(inputs.u))
    np.testing.assert_array_equal(n[:, 0], np.asarray(n_ref))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))


@pytest.mark.parametrize("lnc, batch, gamma, vocab", [(1, 3, 3, 2 * TILE + 7), (2, 20, 8, 50)])
def test_fake_greedy_kernel_matches_reference(fake, lnc, batch, gamma, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.integers(0, 20, (batch, gamma + 1, vocab)).astype(np.float32)  # many ties
    target = np.asarray(sampling.first_argmax(jnp.asarray(logits)))
    drafts = target[:, :gamma].copy()
    drafts[::2, gamma // 2] = (drafts[::2, gamma // 2] + 1) % vocab
    n, tokens = fake.launch(nki_rejection._greedy_body, lnc,
                            *nki_rejection.greedy_layout(drafts, logits, xp=np))
    n_ref, tokens_ref = rejection_greedy(jnp.asarray(drafts), jnp.asarray(target))
    np.testing.assert_array_equal(n[:, 0], np.asarray(n_ref))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))


@pytest.mark.parametrize("lnc", [1, 2])
def test_fake_sampled_kernel_ties_at_cdf_boundaries(fake, lnc):
    """γ = 0 (plain sampling) from dyadic weights summing to exactly 1 across three tiles,
    u exactly on CDF boundaries: cdf <= u·total counts the boundary, as the reference."""
    rng = np.random.default_rng(9)
    vocab = 2 * TILE + 100
    w = np.zeros(vocab)
    np.add.at(w, rng.choice(vocab, 2**12), 2.0**-12)
    cdf = np.cumsum(w)
    positive = np.flatnonzero(w)
    u = np.asarray([[cdf[k]] for k in positive[[0, 5, len(positive) // 2, -2]]], np.float32)
    p = np.broadcast_to(w.astype(np.float32), (len(u), 1, vocab))
    inputs = ri.Inputs(np.zeros((len(u), 0), np.int32), np.zeros((len(u), 0, vocab), np.float32),
                       p, u)
    n, tokens = fake.launch(nki_rejection._sampled_body, lnc, *nki_rejection.layout(
        inputs.drafts, inputs.q, inputs.p, inputs.u, xp=np))
    _, tokens_ref = rejection_jit(*(jnp.asarray(a) for a in (inputs.drafts, inputs.q, p, u)))
    np.testing.assert_array_equal(tokens, np.asarray(tokens_ref))
    assert tokens[:, 0].tolist() == [positive[i + 1] for i in (0, 5, len(positive) // 2, -2)]


class _Launcher:
    """kernel[lnc](*arrays) for a kernel body, run by fake_nki on NumPy copies of the arrays."""

    def __init__(self, body):
        self.body = body

    def __getitem__(self, lnc):
        return lambda *arrays: fake_nki.launch(self.body, lnc, *(np.asarray(a) for a in arrays))


def test_jax_wrappers_through_fake_kernels(fake, monkeypatch):
    """sampled and greedy_from_logits take the contract's JAX arrays, lay them out, launch
    kernel[NEURON_LOGICAL_NC_CONFIG] and return (n [B], tokens [B, γ+1]) as the reference."""
    monkeypatch.setattr(nki_rejection, "AVAILABLE", True)
    monkeypatch.setattr(nki_rejection, "sampled_kernel", _Launcher(nki_rejection._sampled_body))
    monkeypatch.setattr(nki_rejection, "greedy_kernel", _Launcher(nki_rejection._greedy_body))
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    rng = np.random.default_rng(11)
    inputs = ri.random_inputs(rng, 4, 2, 900)
    args = [jnp.asarray(a) for a in (inputs.drafts, inputs.q, inputs.p)]
    inputs = ri.away_from_boundaries(
        rng, inputs, np.asarray(rejection_jit(*args, jnp.asarray(inputs.u))[0]))
    got = nki_rejection.sampled(*args, jnp.asarray(inputs.u))
    want = rejection_jit(*args, jnp.asarray(inputs.u))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    logits = jnp.asarray(rng.integers(0, 9, (4, 3, 900)).astype(np.float32))
    drafts = sampling.first_argmax(logits)[:, :2].at[1, 0].add(1)
    got = nki_rejection.greedy_from_logits(drafts, logits)
    want = rejection_greedy(drafts, sampling.first_argmax(logits))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


class _Callback:
    """kernel[lnc](*arrays) inside a traced program: the fake kernel through pure_callback."""

    def __init__(self, body):
        self.body, self.launches = body, 0

    def __getitem__(self, lnc):
        def run(*arrays):
            self.launches += 1
            return tuple(np.asarray(o, np.int32) for o in fake_nki.launch(
                self.body, lnc, *(np.asarray(x) for x in arrays)))

        def launch(*arrays):
            batch, k = arrays[-1].shape  # x [B, γ+1]: every kernel's last input
            shapes = (jax.ShapeDtypeStruct((batch, 1), jnp.int32),
                      jax.ShapeDtypeStruct((batch, k), jnp.int32))
            return jax.pure_callback(run, shapes, *arrays)
        return launch


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_loop_through_the_nki_seam_equals_the_reference(fake, monkeypatch, temperature):
    """The whole static loop with the NKI implementation (its wrappers, layouts and kernel
    bodies, the greedy argmax kernel included) generates what the reference does."""
    from helpers import tiny_model

    from jaxspec.decode import loop
    from jaxspec.decode.rejection import REFERENCE, Rejection
    from jaxspec.decode.sizing import loop_max_len
    from jaxspec.decode.state import LoopSpec
    from jaxspec.drafts.layerskip import layerskip
    from jaxspec.drafts.model_draft import ModelDraft

    monkeypatch.setattr(nki_rejection, "AVAILABLE", True)
    kernel = _Callback(nki_rejection._greedy_body if temperature == 0
                       else nki_rejection._sampled_body)
    monkeypatch.setattr(nki_rejection, "greedy_kernel" if temperature == 0 else "sampled_kernel",
                        kernel)
    nki = Rejection("nki", sampled=nki_rejection.sampled,
                    greedy=nki_rejection.greedy_from_logits)
    target = tiny_model(0, std=0.5, vocab=48, layers=2)
    draft_model = layerskip(target, 1)
    prompt = jnp.asarray([[5, 17, 3, 9], [40, 2, 0, 0]])
    lengths = jnp.asarray([4, 2])
    sampler, values = sampling.make(temperature)
    outputs = []
    for rejection_impl in (REFERENCE, nki):
        spec = LoopSpec(target=target.config, draft=ModelDraft(draft_model.config, 48), gamma=3,
                        sampler=sampler, max_len=loop_max_len(4, 12, 3), layout=target.layout,
                        rejection=rejection_impl)
        args = (target.params, draft_model.params, prompt, lengths, jax.random.key(3), values,
                12)
        state = jax.jit(loop.init_state, static_argnums=0)(spec, *args)
        state = jax.jit(loop.run_static, static_argnums=0, static_argnames="iterations")(
            spec, target.params, draft_model.params, values, state, iterations=12)
        outputs.append((np.asarray(state.tokens), np.asarray(state.lengths),
                        int(np.asarray(state.stats.accepted).sum())))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert outputs[0][2] == outputs[1][2] > 0  # drafts were accepted through the kernel
    assert kernel.launches >= 2  # one per verify
