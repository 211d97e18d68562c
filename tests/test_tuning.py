"""γ chosen by measurement (num_speculative_tokens="auto"): the selector's arithmetic on
synthetic (α, c, v) tables, the α estimate, and the decoder choosing, caching and staying exact."""

from __future__ import annotations

import json

import pytest
from helpers import greedy_reference, perturbed, tiny_model

import jaxspec
from jaxspec import tuning
from jaxspec.generate import build_parser


def linear_v(slope: float, max_gamma: int = 8) -> dict[int, float]:
    return {g: 1 + slope * g for g in range(max_gamma + 1)}


@pytest.mark.parametrize("alpha,c,slope,expected", [
    # γ=1: 1.6/1.2 = 1.33; γ=2: (1 − .6³)/.4 = 1.96 over 1.4 = 1.40; γ=3: 2.176/1.6 = 1.36
    (0.6, 0.1, 0.1, 2),
    (0.8, 0.05, 0.25, 3),  # a costly verify caps γ: 1.525, 1.554, 1.528 at γ = 2, 3, 4
    (0.9, 0.1, 0.05, 8),  # still rising at the largest γ offered
    (1.0, 0.0, 0.0, 8),  # always accepted and free: γ + 1 tokens per step
    (0.5, 1.0, 0.0, 0),  # a draft as costly as the target never pays: plain decoding
    (0.0, 0.0, 0.0, 0),  # never accepted: every γ ties with plain decoding, the smallest wins
])
def test_selector_picks_the_analytic_optimum(alpha, c, slope, expected):
    assert tuning.best_gamma(alpha, c, linear_v(slope)) == expected
    speedups = tuning.predicted_speedups(alpha, c, linear_v(slope))
    assert speedups[0] == 1.0 and speedups[expected] == max(speedups.values())


def test_selector_uses_the_measured_verify_costs():
    v = {0: 1.0, 1: 1.02, 2: 1.04, 3: 2.5, 4: 2.6}  # a verify that jumps at 4 tokens (CPU GEMM)
    assert tuning.best_gamma(0.9, 0.0, v) == 2


def test_alpha_estimate_and_interpolation():
    assert tuning.alpha_estimate(10, 40, 10) == 1.0  # γ = 4, all accepted every time
    assert tuning.alpha_estimate(10, 0, 0) == 0.0
    assert tuning.alpha_estimate(4, 6, 1) == pytest.approx(6 / 9)  # 6 successes in 9 trials
    v = tuning.interpolate({0: 1.0, 1: 1.2, 4: 2.1}, 5)
    assert v == pytest.approx({0: 1.0, 1: 1.2, 2: 1.5, 3: 1.8, 4: 2.1, 5: 2.1})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path))
    return tmp_path


def test_auto_falls_back_to_plain_decoding_when_no_gamma_pays(cache):
    """A draft as large as the target that almost never agrees: γ = 0, output exact."""
    target = tiny_model(seed=3, layers=2)
    stranger = perturbed(target, noise=2.0, seed=9)  # same size: c ≈ 1
    prompts = [[5, 6, 7, 5, 6], [9, 1]]
    dec = jaxspec.SpeculativeDecoder(target, stranger, num_speculative_tokens="auto")
    out = dec.generate(prompts, max_new_tokens=12)
    assert out.tokens == greedy_reference(target, prompts, 12)
    choice = out.stats["gamma_choice"]
    assert choice["gamma"] == 0 and out.stats["draft_tokens_proposed"] == 0, choice
    assert choice["source"] == "profiled" and choice["c"] > 0.3


def test_auto_choice_is_consistent_cached_and_exact(cache):
    target = tiny_model(seed=3, layers=2)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [1, 2, 3, 1, 2]]
    expected = greedy_reference(target, prompts, 16)
    first = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens="auto")
    out = first.generate(prompts, max_new_tokens=16)
    assert out.tokens == expected
    choice = first.gamma_choice
    assert choice.source == "profiled" and choice.c == 0.0  # prompt lookup runs no forward
    assert choice.gamma == tuning.best_gamma(choice.alpha, choice.c, choice.v)
    assert out.stats["num_speculative_tokens"] == choice.gamma
    again = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens="auto")
    out = again.generate(prompts, max_new_tokens=16)
    assert again.gamma_choice.source == "cache" and again.gamma == choice.gamma
    assert out.tokens == expected
    assert (cache / "gamma.json").is_file()


def test_cli_accepts_auto_and_refuses_other_words(capsys):
    args = build_parser().parse_args(["hi", "--num-speculative-tokens", "auto"])
    assert args.num_speculative_tokens == "auto"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["hi", "--num-speculative-tokens", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'auto'" in err


def test_auto_times_a_draft_heads_cost(cache):
    """A draft head's c comes from its own step timers (not 0 as for prompt lookup)."""
    from helpers import successor_model, trained_head

    from jaxspec.drafts.head import HeadDraft

    target = successor_model(40)
    config, params, *_ = trained_head(target, draft_vocab=24, steps=2, rows=16)
    dec = jaxspec.SpeculativeDecoder(target, HeadDraft(config), num_speculative_tokens="auto",
                                     draft_params={"head": params, "embed": target.params["embed"]})
    prompts = [[5, 6, 7, 5, 6]]
    out = dec.generate(prompts, max_new_tokens=12)
    assert out.tokens == greedy_reference(target, prompts, 12)
    assert out.stats["gamma_choice"]["c"] > 0


def test_auto_chooses_once_per_batch_size(cache, monkeypatch):
    """"auto" profiles at the batch size of the call, rounded up to a power of two (its step
    costs are per batch), once per size in a process and in the cache; output exact."""
    target = tiny_model(seed=3, layers=2)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [1, 2, 3, 1, 2], [4, 4, 4]]
    batches = []
    real = tuning.profile
    monkeypatch.setattr(tuning, "profile",
                        lambda *a, **k: batches.append(k["batch"]) or real(*a, **k))
    dec = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens="auto")
    for batch in (prompts[:1], prompts, prompts[:1]):
        out = dec.generate(batch, max_new_tokens=12)
        assert out.tokens == greedy_reference(target, batch, 12)
        assert out.stats["num_speculative_tokens"] == dec.gamma == dec.gamma_choice.gamma
    assert batches == [1, 4]  # 3 prompts: profiled for 4 (tuning.batch_bucket)
    assert len(json.loads((cache / "gamma.json").read_text())) == 2
    assert [tuning.batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_a_heads_gamma_holds_for_one_prompt_and_a_batch_chooses(tmp_path, cache, monkeypatch):
    """A loaded head without an explicit γ: its recorded γ for one prompt (no profile); for a
    batch, γ measured up to it. A batch choosing plain decoding leaves the draft in place for
    the next single prompt."""
    from helpers import successor_model, trained_head

    from jaxspec.checkpoint import head_store

    target = successor_model(40)
    config, params, *_ = trained_head(target, draft_vocab=24, steps=2, rows=16)
    path = str(tmp_path / "head")
    head_store.save(path, config, params, target_params=target.params, dtype="bfloat16",
                    gamma=3, threshold=0.0, training={})
    calls = []
    monkeypatch.setattr(tuning, "profile", lambda *a, **k: calls.append(k) or tuning.Choice(
        0, 0.2, 0.5, {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, "profiled"))
    dec = jaxspec.SpeculativeDecoder(target, path)
    one, two = [[5, 6, 7, 5, 6]], [[5, 6, 7, 5, 6], [9, 1]]
    for prompts, gamma, proposes in ((one, 3, True), (two, 0, False), (one, 3, True)):
        out = dec.generate(prompts, max_new_tokens=10)
        assert out.tokens == greedy_reference(target, prompts, 10)
        assert out.stats["num_speculative_tokens"] == dec.gamma == gamma
        assert (out.stats["draft_tokens_proposed"] > 0) == proposes
        assert ("gamma_choice" in out.stats) == (len(prompts) > 1)
    assert [(k["batch"], k["max_gamma"]) for k in calls] == [(2, 3)]
