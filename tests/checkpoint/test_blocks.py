"""A GGUF model's quantized projections kept as their blocks (jaxspec.checkpoint.blocks):
stored at conversion, read by the CPU kernel, with exactly the results of the fp32 weights."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from helpers import (jaxspec_logits, random_tokens, tiny_torch_model, truncate_largest_file,
                     write_tiny_gguf)

import jaxspec
from jaxspec.checkpoint import blocks, convert, gguf_source, load_model, keymap
from jaxspec.checkpoint.gguf_metadata import read_gguf
from jaxspec.errors import UserError
from jaxspec.kernels import cpu_matmul
from jaxspec.models import layout, quantized

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")
PROMPTS = [[5, 9, 11, 5, 9], [3, 3, 7, 20, 21, 22, 3]]


def weights(model) -> list:
    """The model's projections and output layer."""
    return [layer[k] for layer in model.params["layers"] for k in layout.PACKED] + [
        model.params["lm_head"]]


def quantized_kinds(model) -> set:
    return {quantized.kind(w.data) if isinstance(w, layout.Panels) and w.quantized else "float"
            for w in weights(model)}


def q4_k_m(name: str) -> str:
    """A Q4_K_M-like mix, as llama.cpp quantizes: Q6_K for the embedding and for the first
    layer's value and down projections (whose fused weights then mix kinds), Q4_K elsewhere."""
    return "Q6_K" if "embed" in name or ("layers.0." in name and (
        "v_proj" in name or "down_proj" in name)) else "Q4_K"


K_QUANT_SHAPES = dict(hidden_size=256, intermediate_size=256)  # rows of 256 (super-blocks)


@needs_kernel
@pytest.mark.parametrize("kind,qtype,tied,expected", [
    ("llama", "Q4_1", True, {"q4_1"}), ("llama", "Q8_0", False, {"q8_0"}),
    ("qwen3", "Q8_0", True, {"q8_0"}), ("llama", "Q4_0", True, {"q4_1"}),
    ("qwen2", "Q5_0", False, {"q8_0"}), ("llama", "Q4_K", True, {"q4_k"}),
    ("qwen2", "Q6_K", False, {"q6_k"}), ("qwen2", "Q5_1", True, {"q8_dm"}),
    ("llama", "Q5_K", False, {"q8_dm"}), ("llama", q4_k_m, True, {"q4_k", "q6_k", "q8_dm"})])
def test_blocks_compute_the_bits_of_the_fp32_weights(kind, qtype, tied, expected, tmp_path,
                                                     monkeypatch):
    """Converted and loaded: every projection and the output layer are blocks of the kind its
    GGUF type is kept as (a fused weight of two kinds as q8_dm), the logits are bit for bit
    those of the fp32 weights (`JAXSPEC_QUANTIZED=0`), and greedy decoding, plain and
    speculative, gives the same tokens (on Q4_1, Q8_0 and the Q4_K_M mix: every kind)."""
    k_quants = callable(qtype) or "_K" in qtype
    torch_model = tiny_torch_model(kind, tie_word_embeddings=tied, seed=3,
                                   **(K_QUANT_SHAPES if k_quants else {}))
    source = write_tiny_gguf(torch_model, str(tmp_path / "tiny.gguf"), qtype=qtype)
    path = convert(source, str(tmp_path / "converted"))
    assert os.path.isfile(os.path.join(path, blocks.INDEX))
    quantized_model = load_model(path)
    in_memory = load_model(source)
    monkeypatch.setenv(blocks.ENV, "0")
    fp32 = load_model(path)
    assert quantized_kinds(quantized_model) == quantized_kinds(in_memory) == expected
    assert quantized_kinds(fp32) == {"float"}
    if callable(qtype):  # layer 0's fused attention weight mixes Q4_K and Q6_K
        assert quantized.kind(quantized_model.params["layers"][0]["wqkv"].data) == "q8_dm"
        assert quantized.kind(quantized_model.params["layers"][1]["wqkv"].data) == "q4_k"
        assert quantized.kind(quantized_model.params["layers"][0]["w_down"].data) == "q6_k"
        assert quantized.kind(quantized_model.params["layers"][1]["w_down"].data) == "q4_k"
    tokens = random_tokens(shape=(2, 10))
    reference = jaxspec_logits(fp32, tokens)
    for model in (quantized_model, in_memory):
        np.testing.assert_array_equal(jaxspec_logits(model, tokens).view(np.uint32),
                                      reference.view(np.uint32))
    if qtype not in ("Q4_1", "Q8_0", q4_k_m):  # the logits above decide; decoding once per
        return                                  # kind of panel data is enough
    plain = jaxspec.SpeculativeDecoder(fp32, "none").generate(PROMPTS, max_new_tokens=12).tokens
    for draft in ("none", "layerskip:1", "ngram"):
        decoder = jaxspec.SpeculativeDecoder(quantized_model, draft, num_speculative_tokens=3)
        assert decoder.generate(PROMPTS, max_new_tokens=12).tokens == plain, draft


def test_no_blocks_for_f32_files_bf16_or_without_the_kernel(tmp_path, monkeypatch):
    torch_model = tiny_torch_model("llama", seed=3)
    f32 = convert(write_tiny_gguf(torch_model, str(tmp_path / "f32.gguf")), str(tmp_path / "a"))
    assert blocks.abstract(f32) is None and not os.path.exists(os.path.join(f32, blocks.FOLDER))
    q8 = convert(write_tiny_gguf(torch_model, str(tmp_path / "q8.gguf"), qtype="Q8_0"),
                 str(tmp_path / "b"))
    assert quantized_kinds(load_model(q8, dtype="bfloat16")) == {"float"}
    monkeypatch.setenv(cpu_matmul.ENV, "xla")
    cpu_matmul.available.cache_clear()
    try:
        assert not blocks.wanted(layout.CPU, "float32")
        assert quantized_kinds(load_model(q8)) == {"float"}
    finally:
        monkeypatch.delenv(cpu_matmul.ENV)
        cpu_matmul.available.cache_clear()


def test_a_weight_whose_blocks_are_not_exact_stays_fp32(tmp_path):
    """`build` keeps a weight only when its blocks dequantize to the fp32 params bit for bit:
    one weight of the params off by one ulp drops that weight's blocks alone."""
    torch_model = tiny_torch_model("llama", seed=3)
    path = write_tiny_gguf(torch_model, str(tmp_path / "q.gguf"), qtype="Q4_1")
    reader = read_gguf(path)
    config = gguf_source.read_config(reader)
    params = keymap.build_params(config, gguf_source.tensor_getter(reader, config))
    get = gguf_source.block_getter(reader, config)
    assert set(blocks.build(config, get, params)["layers"][0]) == set(layout.PACKED)
    params["layers"][0]["wo"] = np.nextafter(params["layers"][0]["wo"], np.float32(np.inf))
    built = blocks.build(config, get, params)
    assert set(built["layers"][0]) == set(layout.PACKED) - {"wo"}
    assert set(built["layers"][1]) == set(layout.PACKED)


@needs_kernel
def test_damaged_blocks_fail_with_one_line(tmp_path):
    torch_model = tiny_torch_model("llama", seed=3)
    path = convert(write_tiny_gguf(torch_model, str(tmp_path / "q.gguf"), qtype="Q8_0"),
                   str(tmp_path / "converted"))
    truncate_largest_file(os.path.join(path, blocks.FOLDER))
    with pytest.raises(UserError) as error:
        load_model(path)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"cannot restore quantized blocks from {path}/blocks")
