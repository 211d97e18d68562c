"""Per-row seeds: a row's sampled tokens depend only on its prompt and seed, not on the other
rows of its batch (as vLLM's per-request seeds); one int seed still gives every row its own
stream. Tiny random models as in test_loop.py; decoders are cached per module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed, tiny_model

import jaxspec
from jaxspec.decode import sampling
from jaxspec.decode.sizing import loop_max_len, prompt_width
from jaxspec.errors import UserError

VOCAB = 48
PROMPTS = [[5, 17, 3], [40, 2, 9, 33, 21, 8, 11], [7], [12, 44, 30, 1, 19]]  # mixed lengths
SEEDS = [11, 2**32 - 1, 0, 11]
MAX_NEW = 16
SAMPLED = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_k=12, top_p=0.9)


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, std=0.5, vocab=VOCAB)


@pytest.fixture(scope="module")
def decoders(target):
    """decoders(with_draft, mode): one SpeculativeDecoder per combination."""
    draft, made = perturbed(target, noise=0.02), {}

    def get(with_draft: bool, mode: str = "dynamic"):
        if (with_draft, mode) not in made:
            made[with_draft, mode] = jaxspec.SpeculativeDecoder(
                target, draft if with_draft else None, num_speculative_tokens=3, mode=mode,
                static_iterations=3)
        return made[with_draft, mode]

    return get


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("with_draft", [True, False], ids=["draft", "no_draft"])
def test_a_row_samples_the_same_alone_and_in_any_batch(decoders, with_draft, mode):
    dec = decoders(with_draft, mode)
    batch = dec.generate(PROMPTS, seed=SEEDS, **SAMPLED).tokens
    assert all(len(t) == MAX_NEW for t in batch)  # no EOS configured: rows ran to the end
    for prompt, seed, tokens in zip(PROMPTS, SEEDS, batch):
        assert dec.generate([prompt], seed=[seed], **SAMPLED).tokens == [tokens]
    order = [2, 0, 3, 1]  # other places in the batch
    shuffled = dec.generate([PROMPTS[i] for i in order], seed=[SEEDS[i] for i in order],
                            **SAMPLED)
    assert shuffled.tokens == [batch[i] for i in order]


def test_same_seeds_repeat_and_other_seeds_differ(decoders):
    dec = decoders(True)
    a = dec.generate(PROMPTS, seed=SEEDS, **SAMPLED)
    b = dec.generate(PROMPTS, seed=SEEDS, **SAMPLED)
    c = dec.generate(PROMPTS, seed=[12, 2**32 - 2, 1, 12], **SAMPLED)
    assert a.tokens == b.tokens and a.stats["rows"] == b.stats["rows"]
    assert all(x != y for x, y in zip(a.tokens, c.tokens))  # every row's stream changed
    greedy = dec.generate(PROMPTS, seed=SEEDS, max_new_tokens=MAX_NEW)  # seeds unused
    assert greedy.tokens == dec.generate(PROMPTS, max_new_tokens=MAX_NEW).tokens


def test_equal_prompts_with_equal_seeds_give_equal_rows(decoders):
    dec = decoders(True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    out = dec.generate(prompts, seed=[5, 5, 5, 6], **SAMPLED).tokens
    assert out[0] == out[2] != out[3]


def test_one_int_seed_gives_rows_their_own_streams(decoders):
    dec = decoders(True)
    out = dec.generate([PROMPTS[0]] * 4, seed=5, **SAMPLED).tokens
    assert len({tuple(t) for t in out}) == 4  # identical prompts are sampled apart
    # rows are seeded from (seed, row index): the first row does not depend on the batch size
    assert dec.generate([PROMPTS[0]], seed=5, **SAMPLED).tokens == out[:1]


def test_pure_function_takes_one_seed_per_row(target):
    sampler, values = sampling.make(SAMPLED["temperature"], SAMPLED["top_k"], SAMPLED["top_p"])
    spec = jaxspec.LoopSpec(target=target.config, sampler=sampler,
                            max_len=loop_max_len(7, MAX_NEW, 0))
    run = jax.jit(jaxspec.generate_tokens, static_argnums=0)

    def generate(rows):
        prompt = np.zeros((len(rows), prompt_width(7)), np.int32)
        for b, i in enumerate(rows):
            prompt[b, : len(PROMPTS[i])] = PROMPTS[i]
        state = run(spec, target.params, None, jnp.asarray(prompt),
                    jnp.asarray([len(PROMPTS[i]) for i in rows], jnp.int32),
                    jnp.asarray([SEEDS[i] for i in rows], jnp.uint32), values,
                    jnp.int32(MAX_NEW))
        assert state.seeds.shape == (len(rows), 2)
        return [np.asarray(state.tokens)[b, len(PROMPTS[i]): len(PROMPTS[i]) + MAX_NEW]
                .tolist() for b, i in enumerate(rows)]

    batch = generate([0, 1, 2, 3])
    assert generate([3, 1, 0, 2]) == [batch[i] for i in (3, 1, 0, 2)]
    assert batch[0] != batch[3]  # equal seeds, different prompts


@pytest.mark.parametrize("seed", [[1, 2, 3], [1, 2, 3, 4, 5], [], [1, 2, 3, -1],
                                  [1, 2, 3, 2**32], [1, 2, 3, 1.5], [1, 2, 3, "4"], 1.5],
                         ids=["short", "long", "empty", "negative", "2**32", "float", "str",
                              "float_scalar"])
def test_bad_seeds(decoders, seed):
    with pytest.raises(UserError, match="seed") as info:
        decoders(True).generate(PROMPTS, seed=seed, **SAMPLED)
    assert "\n" not in str(info.value)
