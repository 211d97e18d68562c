"""A GGUF model's Q4_1 and Q8_0 projections kept as their blocks (jaxspec.checkpoint.blocks):
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
from jaxspec.models import layout

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason="kernel unavailable here")
PROMPTS = [[5, 9, 11, 5, 9], [3, 3, 7, 20, 21, 22, 3]]


def weights(model) -> list:
    """The model's projections and output layer."""
    return [layer[k] for layer in model.params["layers"] for k in layout.PACKED] + [
        model.params["lm_head"]]


def quantized_kinds(model) -> set:
    return {w.data.dtype.name if isinstance(w, layout.Panels) and w.quantized else "float"
            for w in weights(model)}


@needs_kernel
@pytest.mark.parametrize("kind,qtype,tied", [("llama", "Q4_1", True), ("llama", "Q8_0", False),
                                             ("qwen3", "Q8_0", True)])
def test_blocks_compute_the_bits_of_the_fp32_weights(kind, qtype, tied, tmp_path, monkeypatch):
    """Converted and loaded: every projection and the output layer are blocks, the logits are
    bit for bit those of the fp32 weights (`JAXSPEC_QUANTIZED=0`), and greedy decoding, plain
    and speculative, gives the same tokens."""
    torch_model = tiny_torch_model(kind, tie_word_embeddings=tied, seed=3)
    source = write_tiny_gguf(torch_model, str(tmp_path / "tiny.gguf"), qtype=qtype)
    path = convert(source, str(tmp_path / "converted"))
    assert os.path.isfile(os.path.join(path, blocks.INDEX))
    quantized = load_model(path)
    in_memory = load_model(source)
    monkeypatch.setenv(blocks.ENV, "0")
    fp32 = load_model(path)
    expected = {"Q4_1": "uint8", "Q8_0": "int8"}[qtype]
    assert quantized_kinds(quantized) == quantized_kinds(in_memory) == {expected}
    assert quantized_kinds(fp32) == {"float"}
    tokens = random_tokens(shape=(2, 10))
    reference = jaxspec_logits(fp32, tokens)
    for model in (quantized, in_memory):
        np.testing.assert_array_equal(jaxspec_logits(model, tokens).view(np.uint32),
                                      reference.view(np.uint32))
    plain = jaxspec.SpeculativeDecoder(fp32, "none").generate(PROMPTS, max_new_tokens=12).tokens
    for draft in ("none", "layerskip:1", "ngram"):
        decoder = jaxspec.SpeculativeDecoder(quantized, draft, num_speculative_tokens=3)
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
