"""Random-weight presets of real shapes (jaxspec.presets): their shapes match the published
configurations' parameter counts, they are made on the device, and they decode exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import greedy_reference

from jaxspec import SpeculativeDecoder, presets
from jaxspec.checkpoint.store import numpy_dtype
from jaxspec.errors import UserError
from jaxspec.models import decoder

# parameter counts of the published models (embeddings included once when tied)
PUBLISHED = {"llama3-8b": 8.03e9, "llama3.2-1b": 1.24e9, "smollm2-135m": 134.5e6}


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_preset_shapes_have_the_published_size(name):
    config = presets.PRESETS[name]
    shapes = jax.eval_shape(lambda: decoder.init_params(config, jax.random.key(0)))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert count == pytest.approx(PUBLISHED[name], rel=0.01)
    assert config.num_heads * config.head_dim == config.hidden_size


@pytest.mark.optimized
def test_random_model_is_made_on_the_device_and_decodes_exactly():
    model = presets.random_model("smollm2-135m", dtype="float32", device="cpu", seed=1)
    device = jax.devices("cpu")[0]
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(model.params))
    assert model.params["embed"].dtype == numpy_dtype("float32") and model.tokenizer is None
    prompts = [[5, 17, 300, 4000]]
    out = SpeculativeDecoder(model, "layerskip:20", num_speculative_tokens=3).generate(
        prompts, max_new_tokens=6)
    assert out.tokens == greedy_reference(model, prompts, 6)
    bf16 = presets.random_model("smollm2-135m", device="cpu", seed=1)
    assert bf16.params["embed"].dtype == numpy_dtype("bfloat16")


def test_unknown_preset_is_one_line():
    with pytest.raises(UserError, match="preset must be one of llama3-8b, llama3.2-1b"):
        presets.random_model("llama2-7b")
