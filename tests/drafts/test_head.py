"""The EAGLE-3-style draft head: exact greedy output, the training objective equals the
inference path, checkpoints, the default draft, and refusal of a head made for another target."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, greedy_reference, successor_model, tiny_hf_model, tiny_model

from jaxspec.api import SpeculativeDecoder
from jaxspec.checkpoint.load import load_model
from jaxspec.drafts import head as heads
from jaxspec.drafts.lookup_first import LookupFirst
from jaxspec.checkpoint import head_store, mapped
from jaxspec.decode import loop, sampling
from jaxspec.errors import UserError
from jaxspec.models import decoder
from jaxspec.models.cache import init_cache
from jaxspec.models.layout import default
from jaxspec.training import objective

PROMPTS = [[5, 9, 3, 12, 7], [4, 4], [30, 2, 17, 8, 1, 6, 22]]


@pytest.fixture(scope="module")
def target(successor_target):
    return successor_target


@pytest.fixture(scope="module")
def trained(successor_trained):
    """A head trained for 60 steps over 24 of the target's 40 tokens, and its trainer."""
    return successor_trained


@pytest.fixture(scope="module")
def head(trained):
    return trained[0], trained[1]


def _decoder(target, head, gamma, threshold=0.0, mode="dynamic"):
    config, params = head
    draft = heads.HeadDraft(config, threshold=threshold)
    return SpeculativeDecoder(target, draft, num_speculative_tokens=gamma, mode=mode,
                              draft_params={"head": params, "embed": target.params["embed"]})


@pytest.mark.parametrize("gamma,threshold,mode", [
    (1, 0.0, "dynamic"), (3, 0.0, "dynamic"), (5, 0.0, "static"), (3, 0.4, "dynamic"),
    (3, 0.4, "chunked"), (4, 0.9, "dynamic")])
def test_greedy_output_equals_plain_greedy(target, head, gamma, threshold, mode):
    """Token for token, with stops at EOS, rows of different lengths, and a head that stops
    proposing when unsure (threshold > 0: the dynamic loop then skips verifies)."""
    reference = greedy_reference(target, PROMPTS, 24)
    out = _decoder(target, head, gamma, threshold, mode).generate(PROMPTS, max_new_tokens=24)
    assert out.tokens == reference
    if threshold == 0:
        assert out.stats["draft_tokens_accepted"] > 0
    else:  # some positions were declined
        assert out.stats["draft_tokens_proposed"] < gamma * sum(
            r["target_forward_calls"] - 1 for r in out.stats["rows"])


def test_loop_proposals_are_those_of_a_fresh_head_on_the_committed_text(target, head):
    """After every iteration the head proposes what a head prefilled with the committed text
    alone proposes: the loop's head cache holds target-fed entries for every committed
    position (observe runs entry lengths - 2 again: its token was unknown at prefill), and
    `propose` leaves the state it was given unchanged (its entries are scratch)."""
    config, params = head
    draft = heads.HeadDraft(config)
    draft_params = {"head": params, "embed": target.params["embed"]}
    sampler, values = sampling.make(0.0, 0, 1.0)
    spec = loop.LoopSpec(target=target.config, draft=draft, gamma=3, sampler=sampler,
                         max_len=64)
    prompt = jnp.asarray([[30, 2, 17, 8, 1, 6, 22]])
    state = loop.init_state(spec, target.params, draft_params, prompt, jnp.asarray([7]),
                            jax.random.key(0), values, 40)
    step = jax.jit(loop.step, static_argnums=0)
    init = jax.jit(loop.init_state, static_argnums=0)
    W = 7 + 6 * 4  # the longest committed text: the prompt and 6 iterations of γ + 1 tokens

    def propose(draft_state, tokens, lengths):
        return draft.propose(draft_params, draft_state, tokens, lengths, gamma=3,
                             sampler=sampler, values=values, uniforms=jnp.zeros((1, 3)))

    for _ in range(6):
        L = int(state.lengths[0])
        drafted, _, kept = propose(state.draft_state, state.tokens, state.lengths)
        assert kept is state.draft_state
        committed = jnp.where(jnp.arange(W) < L - 1, state.tokens[:, :W], 0)  # right-padded
        fresh = init(spec, target.params, draft_params, committed, jnp.asarray([L - 1]),
                     jax.random.key(0), values, 64 - W)
        expected, _, _ = propose(fresh.draft_state, state.tokens, state.lengths)
        assert drafted.tolist() == expected.tolist()
        state = step(spec, target.params, draft_params, values, state)
    assert int(state.stats.accepted[0]) > 0


def test_training_lowers_the_loss_and_raises_acceptance(target, trained):
    """Against the head training starts from: held-out loss down, and the acceptance of
    speculative decoding with it up."""
    config, params, fitter, (_, held_out) = trained
    initial, _ = fitter.init()
    before, after = fitter.evaluate(initial, held_out), fitter.evaluate(
        {k: v for k, v in params.items() if k != "d2t"}, held_out)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    rates = []
    for p in (initial, params):
        out = _decoder(target, (config, {**p, "d2t": params["d2t"]}), 3).generate(
            PROMPTS, max_new_tokens=24)
        rates.append(out.stats["acceptance_rate"])
    assert rates[1] > rates[0] + 0.05, rates


def test_unrolled_objective_is_the_inference_chain(target, head):
    """Step k of the training-time unroll at entry s + k - 1 equals the k-th proposal of a chain
    from entry s at inference (cache of target-fed entries, then the head's own outputs)."""
    config, params = head
    embed = target.params["embed"]
    tokens = jnp.asarray([[3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]])
    W = tokens.shape[1]
    cache = init_cache(target.config, 1, 32, jnp.float32, default())
    _, captured, _ = decoder.run_layers(target.config, target.params, tokens,
                                        jnp.arange(W)[None], cache, config.hidden_layers)
    outs = objective.unrolled(config, params, embed, tokens, captured, 3)  # [3, 1, W, D]
    features = heads.fuse(params, captured)
    for start in (0, 4, 8):
        head_cache = heads.HeadDraft(config).init_state(1, 32, jnp.float32, default()).cache
        if start:  # target-fed entries before the chain (as observe writes them)
            _, head_cache = heads.run_layer(config, params, embed, tokens[:, 1:start + 1],
                                            features[:, :start], jnp.arange(start)[None],
                                            head_cache)
        feature = features[:, start:start + 1]
        for k in range(3):
            p = start + k
            out, head_cache = heads.run_layer(config, params, embed, tokens[:, p + 1:p + 2],
                                              feature, jnp.asarray([[p]]), head_cache)
            np.testing.assert_allclose(out[0, 0], outs[k, 0, p], rtol=1e-5, atol=1e-5)
            feature = out
    # later steps run only at some entries (the loss's window): the same outputs where step k
    # of a chain starting inside the window lands
    entries = jnp.minimum(jnp.arange(4, W + 2), W - 1)[None]  # clipped repeats at the end
    windowed = objective.unrolled(config, params, embed, tokens, captured, 3, entries)
    for k in range(3):
        np.testing.assert_allclose(windowed[k, 0, k:W - 4], outs[k, 0, 4 + k:], rtol=1e-5,
                                   atol=1e-5)


def test_checkpoint_roundtrip(tmp_path, target, head):
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="bfloat16",
                    gamma=3, threshold=0.25, training={"note": "test"})
    loaded = head_store.load(path)
    assert loaded.config == config
    assert loaded.meta["gamma"] == 3 and loaded.meta["threshold"] == 0.25
    np.testing.assert_array_equal(loaded.params["d2t"], params["d2t"])
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        assert a.dtype == (jnp.int32 if b.dtype == jnp.int32 else jnp.float32)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)  # stored in bf16
    decoder_ = SpeculativeDecoder(target, path)  # loaded by path: its γ and threshold
    assert decoder_.gamma == 3 and decoder_.draft.threshold == 0.25
    assert decoder_.generate(PROMPTS, max_new_tokens=16).tokens == greedy_reference(
        target, PROMPTS, 16)
    assert head_store.matches(loaded.meta, target)
    assert not head_store.matches(loaded.meta, successor_model(40, seed=1, eos=(0,)))


def test_a_head_loaded_again_on_the_cpu_is_mapped_not_restored(tmp_path, target, head,
                                                               monkeypatch):
    """jaxspec.checkpoint.mapped: the head's laid-out params, saved by the first load."""
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="bfloat16",
                    gamma=3, threshold=0.0, training={})
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(mapped.ENV, "1")
    first = SpeculativeDecoder(target, path)
    mapped.wait()

    def no_restore(*args, **kwargs):
        raise AssertionError("restored although the laid-out params were saved")

    monkeypatch.setattr(head_store.orbax_io, "restore", no_restore)
    second = SpeculativeDecoder(target, path)
    jax.tree.map(np.testing.assert_array_equal, first.draft_params, second.draft_params)
    assert second.generate(PROMPTS, max_new_tokens=16).tokens == greedy_reference(
        target, PROMPTS, 16)


@pytest.mark.parametrize("change", ["hidden", "vocab", "layers"])
def test_a_head_for_another_target_is_refused_before_compiling(tmp_path, target, head, change):
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="float32",
                    gamma=3, threshold=0.0, training={})
    other = tiny_model(0, **{"vocab": 40, "layers": 2,
                             **{"hidden": {"hidden": 64}, "vocab": {"vocab": 48},
                                "layers": {"layers": 3}}[change]})
    with pytest.raises(UserError, match="draft head was trained for a target with"):
        SpeculativeDecoder(other, path)


def test_cli_refuses_a_head_for_another_target_with_one_line(tmp_path, target, head):
    config, params = head
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="bfloat16",
                    gamma=3, threshold=0.0, training={})
    model = tiny_hf_model("llama", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "jaxspec.generate", "--model", model,
                           "--draft", path, "hi"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: draft head was trained for a target with")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_default_draft_is_plain_decoding_for_other_targets(target):
    decoder_ = SpeculativeDecoder(target)  # draft="default"
    assert decoder_.draft is None and decoder_.gamma == 0
    assert head_store.shipped_for(target) is None


def test_default_layers_are_early_middle_and_last():
    assert heads.default_layers(30) == (4, 15, 30)
    assert heads.default_layers(3) == (1, 3) and heads.default_layers(2) == (1, 2)
    assert all(0 < i <= n for n in (1, 2, 7, 40) for i in heads.default_layers(n))


@pytest.mark.slow
def test_shipped_head_loads_and_accepts_on_fixed_prompts():
    """The shipped head: its recorded config and vocabulary mapping, exact greedy output with
    the default model, and greedy acceptance above the floor measured when it was shipped."""
    from jaxspec import bench
    from jaxspec.checkpoint.default_model import ensure_converted

    assert head_store.is_head_dir(head_store.SHIPPED)
    loaded = head_store.load(head_store.SHIPPED)
    target = load_model(ensure_converted())
    assert loaded.config == heads.HeadConfig(target.config, heads.default_layers(30),
                                             loaded.config.draft_vocab)
    d2t = np.asarray(loaded.params["d2t"])
    assert len(d2t) == loaded.config.draft_vocab == loaded.meta["training"]["train"]["draft_vocab"]
    assert np.all(np.diff(d2t) > 0) and set(target.config.eos_token_ids) <= set(d2t.tolist())
    assert head_store.d2t_digest(d2t) == loaded.meta["d2t_sha256"]
    assert head_store.shipped_for(target) == head_store.SHIPPED
    texts = ["What is the capital of France?", "Give me two tips for learning to cook.",
             "Write a short poem about autumn leaves."]
    prompts = [bench.prompt_ids(target, t) for t in texts]
    plain = SpeculativeDecoder(target, None).generate(prompts, max_new_tokens=48)
    # γ pinned at 2, where the floors were measured (the recorded γ, 1 since the target reads
    # its GGUF blocks, is checked by the suite's measurement, README); 1.39 and 1.57 again with
    # the head's own weights as Q8_0 blocks (2026-12-02)
    gamma = 2
    assert loaded.meta["gamma"] == 1
    for draft, floor in ((head_store.SHIPPED, SHIPPED_ACCEPTED_LENGTH_FLOOR),
                         ("default", DEFAULT_ACCEPTED_LENGTH_FLOOR)):
        decoder_ = SpeculativeDecoder(target, draft, num_speculative_tokens=gamma)
        out = decoder_.generate(prompts, max_new_tokens=48)
        assert out.tokens == plain.tokens and out.stats["num_speculative_tokens"] == gamma
        assert out.stats["mean_accepted_length"] >= floor, (draft, out.stats)
    assert isinstance(decoder_.draft, LookupFirst)  # the default: lookup first, then the head
    assert decoder_.draft.fallback == SpeculativeDecoder(target, head_store.SHIPPED).draft


SHIPPED_ACCEPTED_LENGTH_FLOOR = 1.30  # measured 1.39 when shipped (γ = 2, 48 tokens)
DEFAULT_ACCEPTED_LENGTH_FLOOR = 1.45  # the head with prompt lookup first: measured 1.57 (γ = 2)
