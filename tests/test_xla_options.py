"""The XLA options jaxspec compiles its programs with (jaxspec.xla_options): on CPU, reductions
stay on XLA's own loops, so a verified position's numbers are those of a one-token step."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import UNOPTIMIZED_XLA, rows_unlike_steps

import jaxspec
from jaxspec import program_cache, xla_options

YNN = '"kind":"__ynn_fusion"'


def softmax(_, scores):  # [B, K, G, T, S]: an attention softmax of a 5-token verify
    return jax.nn.softmax(scores, axis=-1)


def test_programs_keep_reductions_off_ynnpack():
    scores = jnp.zeros((1, 3, 3, 5, 128), jnp.float32)
    default = jax.jit(softmax, static_argnums=0).lower(None, scores).compile().as_text()
    if YNN not in default:
        pytest.skip("this XLA hands no reduction of this shape to YNNPACK")
    assert xla_options.compiler_options()  # on CPU
    program, _ = program_cache.load_or_compile(softmax, None, scores)
    assert YNN not in getattr(program, "compiled", program).as_text()  # Program or Compiled
    ours = jax.jit(softmax, static_argnums=0, compiler_options=jaxspec.compiler_options())
    assert YNN not in ours.lower(None, scores).compile().as_text()
    module_level = xla_options.jit(softmax, static_argnums=0)  # as jaxspec.training's programs
    assert YNN not in module_level.lower(None, scores).compile().as_text()
    np.testing.assert_array_equal(module_level(None, scores), ours(None, scores))


def test_an_option_this_xla_does_not_know_is_left_out(monkeypatch):
    monkeypatch.setitem(xla_options.OPTIONS, "cpu",
                        {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"})
    xla_options._accepted.cache_clear()
    try:
        assert xla_options.compiler_options() == {}
    finally:
        monkeypatch.undo()
        xla_options._accepted.cache_clear()
    assert xla_options.compiler_options(jax.devices("cpu")[0])


@pytest.mark.slow
def test_bf16_verify_rows_are_one_token_steps_on_the_default_model():
    """Each position of a 5-token forward equals, bit for bit, the one-token step at that
    position (logits and hidden state) on the default model in bf16 (CPU layout). With XLA's
    default options 12 of these 15 rows differed (a softmax on YNNPACK; 2026-12-02, JAX 0.10.2,
    Intel Xeon with AVX-512); on an AVX2 AMD EPYC all 15 differed from layer 8 on until the
    attention products took the cache as their left operand (decoder.attention)."""
    model = jaxspec.load_model("smollm2-135m-instruct", dtype="bfloat16")
    ids = model.tokenizer("The quick brown fox jumps over the lazy dog. Then it ran into the "
                          "forest and found a small cabin where an old man lived with his three "
                          "cats, who were all named after famous scientists")["input_ids"]
    tokens = jnp.asarray([ids], jnp.int32)
    assert len(ids) >= 32 + 5
    differing = {P: rows_unlike_steps(model.config, model.params, tokens, P, 5, "bfloat16")
                 for P in (17, 26, 32)}
    assert differing == {17: [], 26: [], 32: []}


def test_tiny_model_tests_compile_without_llvm_optimizations():
    """The suite's own setting on the CPU (tests/conftest.py): XLA_FLAGS for every process."""
    if jax.default_backend() != "cpu":
        pytest.skip("accelerators keep XLA's defaults")
    assert UNOPTIMIZED_XLA in os.environ["XLA_FLAGS"]
    assert "xla_backend_optimization_level" not in xla_options.compiler_options()


@pytest.mark.optimized
def test_tests_marked_optimized_compile_as_users_do():
    assert UNOPTIMIZED_XLA not in os.environ["XLA_FLAGS"]  # what subprocesses get
    assert xla_options.compiler_options()["xla_backend_optimization_level"] == 3
