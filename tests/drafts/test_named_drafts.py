"""Model-free and self-speculation drafts: exact proposals, and losslessness through the loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import greedy_reference, tiny_model

from jaxspec.api import SpeculativeDecoder, resolve_draft
from jaxspec.decode.sampling import Sampler
from jaxspec.drafts.base import NO_PROPOSAL
from jaxspec.drafts.ngram import NgramDraft
from jaxspec.errors import UserError


def _propose(buffer: list[list[int]], lengths: list[int], gamma: int, max_ngram: int = 3,
             greedy: bool = True):
    tokens = np.zeros((len(buffer), 16), np.int32)
    for b, row in enumerate(buffer):
        tokens[b, : len(row)] = row
    draft = NgramDraft(max_ngram=max_ngram, target_vocab=10)
    out, q, _ = draft.propose(None, None, jnp.asarray(tokens), jnp.asarray(lengths), gamma=gamma,
                              sampler=Sampler(greedy=greedy), values=None, uniforms=None)
    return np.asarray(out).tolist(), q


@pytest.mark.parametrize("row,gamma,expected", [
    # suffix [1, 2] occurred at positions 0-1, followed by 3 4 5
    ([1, 2, 3, 4, 5, 1, 2], 3, [3, 4, 5]),
    # the most recent match wins: [7, 8] at 0-1 (then 1) and at 3-4 (then 2)
    ([7, 8, 1, 7, 8, 2, 9, 7, 8], 2, [2, 9]),
    # a longer suffix beats a more recent shorter one: [5, 6] at 0-1 -> 3; [6] alone at 3 -> 9
    ([5, 6, 3, 6, 9, 5, 6], 1, [3]),
    # the continuation runs into the present: the matched text again, periodically
    ([4, 4, 4], 3, [4, 4, 4]),
    ([1, 2, 1, 2], 4, [1, 2, 1, 2]),
    ([7, 1, 2, 3, 1, 2], 5, [3, 1, 2, 3, 1]),  # [1, 2] three tokens back: period 3
    # no earlier occurrence at all: the draft declines
    ([1, 2, 3], 2, [NO_PROPOSAL] * 2),
])
def test_ngram_proposals(row, gamma, expected):
    out, _ = _propose([row], [len(row)], gamma)
    assert out == [expected]


def test_ngram_batch_rows_are_independent_and_q_is_one_hot():
    # row 1: [6, 5] and [5, 6, 5] never occurred before; [5] last occurred at 1, then 6 5
    out, q = _propose([[1, 2, 3, 1, 2], [5, 5, 6, 5]], [5, 4], 2, greedy=False)
    assert out == [[3, 1], [6, 5]]
    np.testing.assert_array_equal(np.asarray(q).argmax(-1), out)
    np.testing.assert_array_equal(np.asarray(q).sum(-1), 1.0)


@pytest.mark.parametrize("draft", ["ngram", "ngram:1", "layerskip:1"])
def test_named_drafts_keep_greedy_output(draft):
    target = tiny_model(seed=3, layers=2)
    # repetitive prompts so that lookups find matches
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9], [1, 2, 3, 4, 1, 2]]
    expected = greedy_reference(target, prompts, 24)
    out = SpeculativeDecoder(target, draft, num_speculative_tokens=3).generate(
        prompts, max_new_tokens=24)
    assert out.tokens == expected
    assert out.stats["draft_tokens_proposed"] > 0


def test_layerskip_shares_the_targets_arrays():
    target = tiny_model(layers=3)
    loop_draft, model, _ = resolve_draft("layerskip:2", target)
    assert model.config.num_layers == 2 and loop_draft.config.num_layers == 2
    assert model.params["embed"] is target.params["embed"]
    assert all(a is b for a, b in zip(model.params["layers"], target.params["layers"][:2]))


@pytest.mark.parametrize("spec", ["layerskip:0", "layerskip:3", "layerskip:x", "layerskip",
                                  "ngram:two"])
def test_bad_named_drafts(spec):
    with pytest.raises(UserError):
        resolve_draft(spec, tiny_model(layers=3))


def test_ngram_declines_without_a_match_and_keeps_greedy_output():
    """Prompts without repeats: early iterations find no match, so the n-gram draft declines
    (the dynamic loop runs one-position steps); output stays the target's greedy output in both
    modes."""
    target = tiny_model(seed=3, layers=2)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11, 30, 2, 17, 40, 6]]
    expected = greedy_reference(target, prompts, 24)
    for mode in ("dynamic", "static"):
        out = SpeculativeDecoder(target, "ngram", num_speculative_tokens=3, mode=mode,
                                 static_iterations=4).generate(prompts, max_new_tokens=24)
        assert out.tokens == expected
        iterations = sum(r["target_forward_calls"] - 1 for r in out.stats["rows"])
        assert 0 < out.stats["draft_tokens_proposed"] < 3 * iterations


def test_ngram_sampled_static_equals_dynamic():
    """Iterations where every row declines verify one position in dynamic mode and γ + 1 in
    static mode; both take the token from p with the same uniform."""
    target = tiny_model(seed=3, layers=2)
    prompts = [[1, 2, 3, 1, 2], [9, 8, 7], [5, 5, 5, 5]]
    outs = [SpeculativeDecoder(target, "ngram", num_speculative_tokens=3, mode=mode,
                               static_iterations=4).generate(
        prompts, max_new_tokens=24, temperature=0.9, seed=5).tokens
            for mode in ("dynamic", "static")]
    assert outs[0] == outs[1]
