"""GGUF import: tensors (dequantized, q/k permutation undone), config and tokenizer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import (CHAT_TEMPLATE, SPECIALS, hf_logits, jaxspec_logits, permute_rows,
                     plain_params, quantize_roundtrip, random_tokens, tiny_hf_model,
                     tiny_tokenizer, tiny_torch_model, transformers_gguf_model, write_tiny_gguf)

from jaxspec.checkpoint import convert, load_model
from jaxspec.checkpoint.gguf_source import unpermute_rows

TEXTS = ["Hello world", "the theme: tt t", "x = f(42) + 3.5\nreturn x",
         "<|im_start|>user\nhi<|im_end|>", "  two  spaces ", "a<|endoftext|>b"]


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_inverts_llama_cpp_permutation(heads):
    w = np.random.default_rng(0).normal(size=(heads * 16, 24)).astype(np.float32)
    assert not np.array_equal(permute_rows(w, heads), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, heads), heads), w)


@pytest.mark.parametrize("kind,qtype,tied", [
    ("llama", "F32", True), ("llama", "F32", False), ("llama", "Q8_0", False),
    ("llama", "Q4_1", True), ("qwen2", "F32", False), ("qwen3", "Q8_0", True),
    ("llama", "Q4_0", False), ("qwen2", "Q5_0", True), ("llama", "Q5_1", True),
    ("llama", "Q4_K", True), ("qwen2", "Q5_K", False), ("qwen2", "Q6_K", True)])
def test_gguf_logits_match_transformers(kind, qtype, tied, tmp_path):
    shapes = dict(hidden_size=256, intermediate_size=256) if "_K" in qtype else {}  # rows of 256
    torch_model = tiny_torch_model(kind, tie_word_embeddings=tied, seed=3, **shapes)
    if qtype != "F32":
        quantize_roundtrip(torch_model, qtype)  # the reference holds exactly what the file holds
    path = write_tiny_gguf(torch_model, str(tmp_path / "tiny.gguf"), qtype=qtype)
    if shapes:  # the test's K-quant encoder is not idempotent: transformers reads the file
        torch_model = transformers_gguf_model(path)
    model = load_model(path)
    assert model.config.tie_word_embeddings == tied
    if tied and model.layout.output_copy:  # no output.weight in the file: the layout policy
        np.testing.assert_array_equal(  # (CPU) adds the embedding's transpose
            plain_params(model)["lm_head"], np.asarray(model.params["embed"]).T)
    elif tied:
        assert "lm_head" not in model.params
    tokens = random_tokens(shape=(2, 10))
    width = model.config.hidden_size / 64  # fp32 rounding grows with the sums' lengths
    np.testing.assert_allclose(jaxspec_logits(model, tokens), hf_logits(torch_model, tokens),
                               atol=1e-4 * width, rtol=0)


def test_gguf_config_matches_hugging_face_config(tmp_path):
    torch_model = tiny_torch_model("llama")
    hf_path = tiny_hf_model("llama", tmp_path)
    gguf_config = load_model(write_tiny_gguf(torch_model, str(tmp_path / "m.gguf"))).config
    hf_config = load_model(hf_path).config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "tie_word_embeddings",
                  "bos_token_id", "eos_token_ids", "max_position_embeddings"):
        assert getattr(gguf_config, field) == getattr(hf_config, field), field
    assert gguf_config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)


def test_gguf_tokenizer_from_metadata(tmp_path):
    path = write_tiny_gguf(tiny_torch_model("llama"), str(tmp_path / "m.gguf"))
    tok = load_model(path).tokenizer
    reference = tiny_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_end|>") == [2]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        SPECIALS[1], SPECIALS[2], SPECIALS[0], SPECIALS[2])
    assert tok.chat_template == CHAT_TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_tokenizer_matches_transformers_gguf_reader(tmp_path):
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tiny_torch_model("llama"), str(tmp_path / "m.gguf"))
    ours = load_model(path).tokenizer
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


def test_gguf_convert_carries_tokenizer(tmp_path):
    torch_model = tiny_torch_model("llama")
    path = write_tiny_gguf(torch_model, str(tmp_path / "m.gguf"), qtype="Q8_0")
    dst = convert(path, str(tmp_path / "ckpt"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(dst))
    direct, restored = load_model(path), load_model(dst)
    assert restored.config == direct.config
    np.testing.assert_array_equal(np.asarray(plain_params(restored)["layers"][1]["wqkv"]),
                                  np.asarray(plain_params(direct)["layers"][1]["wqkv"]))
    assert restored.tokenizer.encode(TEXTS[2]) == direct.tokenizer.encode(TEXTS[2])


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = write_tiny_gguf(tiny_torch_model("llama"), str(tmp_path / "m.gguf"),
                           with_tokenizer=False)
    assert load_model(path).tokenizer is None


# --- the real default model (SmolLM2-135M-Instruct, Q4_1) ---------------------------------

SMOL_TEXTS = [
    "Hello, world! The year 2024 had 366 days; 3.14159 ≈ π.",
    "naïve café — 日本語のテキスト 🙂👍🏽 Ünïcödé",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n",
    "   leading spaces, trailing  \n\n\nI'm sure they'll say it's 1,000,000 (1e6)",
    "<|im_start|>user\nhi<|im_end|><|endoftext|><file_sep>",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_gguf):
    from transformers import AutoTokenizer

    ours = load_model(smollm2_gguf).tokenizer
    folder, name = os.path.split(smollm2_gguf)
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    messages = [{"role": "user", "content": "Write 2 lines of Python: print(42)"}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for text in [*SMOL_TEXTS, chat]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_gguf):
    model = load_model("smollm2-135m-instruct")  # converted once into the cache
    assert (model.config.num_layers, model.config.hidden_size, model.config.vocab_size) == (
        30, 576, 49152)
    assert model.config.tie_word_embeddings and model.config.eos_token_ids == (2,)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                              add_generation_prompt=True)["input_ids"]
    tokens = np.asarray([ids])
    ours, ref = jaxspec_logits(model, tokens), hf_logits(transformers_gguf_model(smollm2_gguf),
                                                         tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
