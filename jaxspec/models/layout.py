"""The layout policy: which array layouts the decoder and the KV cache use, per backend.

One place decides, from the platform the params will live on, what differs between backends:

  output_copy         tied models get a separate output layer `lm_head` [D, V] (embed.T).
                      XLA:CPU streams a [D, V] matrix-vector product at full memory bandwidth
                      but the [V, D] embedding at about two thirds of it: the copy (V·D more
                      memory, the same bytes read per token) makes SmolLM2 decode about 4%
                      faster. Elsewhere the embedding itself is read (no extra memory).
  values_slots_last   the value cache is [L, B, K, Dh, S] (CPU: the [Dh, S] operand that
                      XLA:CPU's weights-times-values product reads; stored slots-first it
                      transposed every layer's values at every step) or [L, B, K, S, Dh], the
                      layout GPU and Trainium attention kernels expect.
  small_m_matmul      fp32 products of at most 16 rows (decode steps, verifies, drafts) go
                      through jaxspec.kernels.cpu_matmul, which reads each weight once for up to
                      6 rows, where XLA:CPU's 2-16-row path costs 1.5-3 one-row steps; XLA's dot
                      when the kernel is unavailable. CPU only ("cpu-xla" is CPU without it).

Projections are stored the same way on every backend, fused and split-friendly at once:
`wqkv` [D, K, G + 2, Dh] (per key/value head: its G query heads, its key, its value) and
`w_gate_up` [D, 2, F]. Each is one matmul (XLA sees a [D, N] operand), and a `jax.sharding`
mesh splits them along K (whole attention groups) and F (MLP columns) without reshuffling.

`JAXSPEC_LAYOUT` (cpu, cpu-xla or accelerator) forces a policy, e.g. to test the accelerator layouts on CPU.
"""

from __future__ import annotations

import dataclasses
import os

ENV = "JAXSPEC_LAYOUT"


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    output_copy: bool  # tied models carry lm_head [D, V] = embed.T
    values_slots_last: bool  # value cache [L, B, K, Dh, S] instead of [L, B, K, S, Dh]
    small_m_matmul: bool = False  # few-row fp32 products through kernels.cpu_matmul


CPU = Layout("cpu", output_copy=True, values_slots_last=True, small_m_matmul=True)
CPU_XLA = Layout("cpu-xla", output_copy=True, values_slots_last=True, small_m_matmul=False)
ACCELERATOR = Layout("accelerator", output_copy=False, values_slots_last=False)
_BY_NAME = {layout.name: layout for layout in (CPU, CPU_XLA, ACCELERATOR)}


def for_platform(platform: str) -> Layout:
    """The policy for a JAX platform name ("cpu", "gpu", "cuda", "neuron", "tpu", ...).

    `JAXSPEC_LAYOUT` overrides it when set.
    """
    forced = os.environ.get(ENV)
    if forced:
        if forced not in _BY_NAME:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(_BY_NAME)}")
        return _BY_NAME[forced]
    return CPU if platform == "cpu" else ACCELERATOR


def default() -> Layout:
    """The policy for JAX's default backend (where new arrays are placed)."""
    import jax

    return for_platform(jax.default_backend())


def for_mesh(layout: Layout) -> Layout:
    """The policy for params sharded on a mesh: the small-M kernel is one device's custom call
    (XLA would gather a sharded weight for it), so sharded products stay XLA's."""
    if not layout.small_m_matmul:
        return layout
    return CPU_XLA if layout == CPU else dataclasses.replace(layout, small_m_matmul=False)


def apply(layout: Layout, params: dict, tied: bool) -> dict:
    """params with the policy's output layer: adds lm_head = embed.T to tied models where the
    policy wants a copy, removes a copy where it does not (untied models keep their own)."""
    import jax.numpy as jnp

    has_copy = "lm_head" in params
    if not tied or has_copy == layout.output_copy:
        return params
    if layout.output_copy:
        return {**params, "lm_head": jnp.asarray(params["embed"].T)}
    return {k: v for k, v in params.items() if k != "lm_head"}
