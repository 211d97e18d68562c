"""`Model`: what `jaxspec.load_model` returns and what the decoding API accepts."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxspec.models.config import ModelConfig
from jaxspec.models.layout import Layout


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model: config, params pytree (jax arrays, layout in models.decoder), tokenizer or None,
    where it came from, and the layout policy its params were prepared for."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None  # transformers PreTrainedTokenizerFast or LightTokenizer, or None
    path: str | None = None
    layout: Layout | None = None  # None: the default backend's policy (models.layout.default)
    mesh: Any = None  # the jax.sharding.Mesh its params are split on (models.sharding), or None
