"""The loop's static spec and its carried state."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxspec import pytree
from jaxspec.decode.rejection import REFERENCE, Rejection
from jaxspec.decode.sampling import Sampler
from jaxspec.models.cache import KVCache
from jaxspec.models.config import ModelConfig
from jaxspec.models import layout as layouts
from jaxspec.models.layout import Layout


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about a compiled loop (hashable: a jit static argument).

    draft: an object implementing jaxspec.drafts.base.Draft, or None for plain decoding;
    gamma: drafts per iteration, ≥ 1 with a draft and 0 without; max_len: token buffer and KV
    cache slots per row (see decode.sizing.loop_max_len); layout: the layout policy of the
    caches (None: the default backend's, filled in when built); rejection: the rejection
    implementation (jaxspec.kernels picks one per platform); mesh: the ("data", "model") mesh
    the params are sharded on, to which the target's KV cache and the token buffer are pinned.
    """

    target: ModelConfig
    draft: Any = None
    gamma: int = 0
    sampler: Sampler = Sampler()
    max_len: int = 256
    dtype: Any = jnp.float32  # KV cache dtype
    layout: Layout | None = None
    rejection: Rejection = REFERENCE
    mesh: Mesh | None = None  # tensor/data parallelism (models.sharding); None: one device

    def __post_init__(self):
        if self.draft is None and self.gamma != 0:
            raise ValueError(f"LoopSpec: gamma={self.gamma} needs a draft (plain decoding has 0)")
        if self.draft is not None and self.gamma < 1:
            raise ValueError(f"LoopSpec: a draft needs gamma >= 1, got {self.gamma}")
        if self.max_len < self.gamma + 2:
            raise ValueError(f"LoopSpec: max_len={self.max_len} leaves no room for a token")
        if self.layout is None:
            object.__setattr__(self, "layout", layouts.default())

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Target layers whose residual streams the draft observes (() without a draft)."""
        return tuple(getattr(self.draft, "hidden_layers", ())) if self.draft is not None else ()


@pytree.dataclass
class Stats:
    """Per-row counters, updated inside the loop."""

    iterations: jax.Array  # [B] verify steps while the row was active
    proposed: jax.Array  # [B] draft tokens proposed (γ per iteration, less when a draft declines)
    verified: jax.Array  # [B] positions the target computed (γ + 1 per iteration, 1 in the
    # one-position iterations of a draft that declines: decode.loop.run_dynamic)
    accepted: jax.Array  # [B] draft tokens accepted by the target
    accepted_per_position: jax.Array  # [B, γ] iterations whose draft i was accepted


@pytree.dataclass
class DecodeState:
    tokens: jax.Array  # [B, S] prompt then generated tokens
    lengths: jax.Array  # [B] tokens in the buffer
    prompt_lengths: jax.Array  # [B]
    max_new_tokens: jax.Array  # [] i32
    done: jax.Array  # [B] bool: EOS, max_new_tokens reached, or buffer full
    target_cache: KVCache
    draft_state: Any  # the draft's own pytree (None for plain decoding)
    seeds: jax.Array  # u32[B, 2] per-row seed words; sampling.uniforms hashes them with step
    step: jax.Array  # [] i32 iterations run (any row active)
    stats: Stats
