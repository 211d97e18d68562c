"""Requests the target writes itself (jaxspec.training.self_written)."""

from __future__ import annotations

import pytest
from helpers import tiny_hf_model

from jaxspec.checkpoint.load import load_model
from jaxspec.checkpoint.tokenizer import encode_prompt
from jaxspec.errors import UserError
from jaxspec.training import self_written


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_hf_model("llama", tmp_path_factory.mktemp("self-written")))


def test_the_prefix_is_the_chat_template_up_to_the_users_message(model):
    prefix = self_written.user_turn_prefix(model)
    prompt = encode_prompt(model, "tea or coffee?", chat_template=True)
    assert len(prefix) >= 2 and prompt[:len(prefix)] == prefix


def test_requests_are_seeded_distinct_texts(model):
    a = self_written.requests(model, 6, 0, min_words=1, progress=False)
    assert a == self_written.requests(model, 6, 0, min_words=1, progress=False)
    assert len(set(a)) == 6 and all(text.strip() == text and text for text in a)
    assert self_written.requests(model, 6, 1, min_words=1, progress=False) != a
    assert self_written.requests(model, 0, 0, progress=False) == []


def test_only_turns_the_model_ended_itself_are_kept(model):
    eos = model.config.eos_token_ids[0]
    hello = model.tokenizer.encode(" hello there", add_special_tokens=False)
    assert self_written.finished_text(model, [*hello, eos]) == "hello there"
    assert self_written.finished_text(model, hello) is None  # out of room, not ended


def test_a_model_that_cannot_write_enough_requests_is_one_line(model):
    with pytest.raises(UserError, match=r"wrote only \d usable requests of 5 in 128 tries"):
        self_written.requests(model, 5, 0, min_words=4, batch=64, progress=False)


def test_a_model_without_a_chat_template_is_refused(tmp_path):
    model = load_model(tiny_hf_model("llama", tmp_path))
    model.tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        self_written.user_turn_prefix(model)


def test_sampled_rows_are_the_public_decoders(model):
    """The writer samples through jaxspec.generate_tokens: the same rows as the API's plain
    decoder with the same per-row seeds."""
    from jaxspec.api import SpeculativeDecoder

    prefix, seeds = self_written.user_turn_prefix(model), [7, 123456789, 2**32 - 1]
    rows = self_written.sampled(model, prefix, seeds, max_tokens=12, temperature=1.0, top_p=0.9)
    out = SpeculativeDecoder(model, draft=None).generate([prefix] * 3, max_new_tokens=12,
                                                        temperature=1.0, top_p=0.9, seed=seeds)
    assert rows == out.tokens and len(set(map(tuple, rows))) == 3
