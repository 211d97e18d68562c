"""Random-weight models of real shapes ("presets"), built on the device, for measuring decode,
verify and loop cost on an accelerator without downloading weights.

`random_model(name)` draws every weight (std 0.02, norms 1) inside one compiled program whose
outputs live on the device, so an 8B-parameter preset never passes through host memory. The
weights are random: what a preset measures is speed (tokens/s, the cost of a verify, of a
draft step, of the loop) and exactness (speculative == plain greedy output); acceptance rates
of drafts other than the target itself mean nothing on it.
"""

from __future__ import annotations

import jax

from jaxspec import devices
from jaxspec.models.config import ModelConfig, RopeScaling
from jaxspec.models.loaded import Model
from jaxspec.xla_options import compiler_options

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_ids=(2,)),
}
DTYPES = ("bfloat16", "float32")


def random_model(name: str, *, dtype: str = "bfloat16", device=None, seed: int = 0) -> Model:
    """The preset `name` with random weights in `dtype`, made on `device` (None, "auto",
    "cpu", "gpu", "neuron" or a jax.Device) and laid out for its platform."""
    from jaxspec import validation
    from jaxspec.checkpoint.load import place
    from jaxspec.checkpoint.store import numpy_dtype
    from jaxspec.models import decoder
    from jaxspec.models import layout as layouts

    validation.one_of("preset", name, tuple(PRESETS))
    validation.one_of("dtype", dtype, DTYPES)
    config, device = PRESETS[name], devices.or_default(devices.resolve(device))
    make = jax.jit(lambda key: decoder.init_stacked_params(config, key, numpy_dtype(dtype)),
                   out_shardings=jax.sharding.SingleDeviceSharding(device),
                   compiler_options=compiler_options(device))
    params = decoder.unstack_layers(make(jax.random.key(seed)))  # sliced on the device
    model = Model(config=config, params=params, path=f"preset:{name}")
    return place(model, layouts.for_platform(devices.platform(device)), device)
