"""Requests the target writes itself (the Magpie recipe: Xu et al., 2024): given only its chat
template up to the start of a user turn, an instruction-tuned model samples a plausible user
request, which is as varied as the conversations the model was tuned on. No dataset is
downloaded, and the requests follow the kinds of conversations the target expects.

Each request is one sampled row (seeded per row, so the list is a pure function of the model
and the seed); rows that do not end their turn within `max_tokens`, that are too short, repeat
an earlier request or equal a benchmark prompt are dropped, and sampling goes on until `count`
requests are kept.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxspec import xla_options
from jaxspec.bench_prompts import load_prompts
from jaxspec.decode import loop, sampling
from jaxspec.decode.sizing import loop_max_len, prompt_width
from jaxspec.decode.state import LoopSpec
from jaxspec.errors import UserError

_MARK = "\u2063jaxspec-request\u2063"  # a text no template adds by itself
BENCHMARK_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts", "prompts", "suite.jsonl")


def user_turn_prefix(model) -> list[int]:
    """Token ids of the chat template rendered up to where a user's message begins."""
    tokenizer = model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{model.path} has no chat template: it cannot write its own requests "
                        "(use --self-written 0)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}],
                                         add_generation_prompt=False, tokenize=False)
    return list(tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False))


def _benchmark_prompts() -> set[str]:
    if not os.path.exists(BENCHMARK_PROMPTS):  # an installed package without the scripts
        return set()
    return {" ".join(p.text.split()) for p in load_prompts(BENCHMARK_PROMPTS)}


def finished_text(model, tokens: list[int]) -> str | None:
    """The text of a sampled user turn (its tokens up to and including the first EOS), or None
    when the model did not end the turn."""
    eos = [i for i, t in enumerate(tokens) if t in model.config.eos_token_ids]
    if not eos:
        return None
    return model.tokenizer.decode(tokens[:eos[0]], skip_special_tokens=True).strip()


def _row_seed(seed: int, row: int) -> int:
    return int(np.random.SeedSequence([seed, row]).generate_state(1)[0])


_generate = xla_options.jit(loop.generate_tokens, static_argnums=0)


def sampled(model, prefix: list[int], seeds: list[int], *, max_tokens: int,
            temperature: float, top_p: float) -> list[list[int]]:
    """Plain sampled continuations of `prefix`, one row per seed (u32): what
    SpeculativeDecoder(model, None).generate returns for the same per-row seeds, through the
    public pure function jaxspec.generate_tokens (training sits below the API)."""
    sampler, values = sampling.make(temperature, 0, top_p)
    spec = LoopSpec(model.config, sampler=sampler, dtype=model.params["embed"].dtype,
                    max_len=loop_max_len(len(prefix), max_tokens, 0), layout=model.layout)
    prompt = np.zeros((len(seeds), prompt_width(len(prefix))), np.int32)  # [B, P]
    prompt[:, :len(prefix)] = prefix
    state = _generate(spec, model.params, None, jnp.asarray(prompt),
                      jnp.full(len(seeds), len(prefix), jnp.int32),
                      jnp.asarray(np.asarray(seeds, np.uint32)), values, jnp.int32(max_tokens))
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
    return [tokens[b, len(prefix):lengths[b]].tolist() for b in range(len(seeds))]


def requests(model, count: int, seed: int, *, temperature: float = 1.0, top_p: float = 0.95,
             max_tokens: int = 64, min_words: int = 4, batch: int = 64,
             progress: bool = True) -> list[str]:
    """`count` distinct requests sampled from `model` after its user-turn prefix.

    Row i is sampled with its own seed drawn from numpy's SeedSequence([seed, i]), so the
    list depends only on the model, the seed and the settings; gives up with a UserError
    after 4 × count + batch rows without enough usable requests."""
    if count <= 0:
        return []
    prefix, excluded = user_turn_prefix(model), _benchmark_prompts()
    kept, seen, row = [], set(), 0
    bar = tqdm(total=count, desc="writing requests", unit="request", disable=not progress)
    while len(kept) < count:
        if row >= 4 * count + batch:
            raise UserError(f"{model.path} wrote only {len(kept)} usable requests of {count} "
                            f"in {row} tries")
        rows = sampled(model, prefix, [_row_seed(seed, row + b) for b in range(batch)],
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        row += batch
        for tokens in rows:
            text = finished_text(model, tokens)
            words = " ".join((text or "").split())
            if len(words.split()) < min_words or words in seen or words in excluded:
                continue
            seen.add(words)
            kept.append(text)
            bar.update(1)
            if len(kept) == count:
                break
    bar.close()
    return kept
