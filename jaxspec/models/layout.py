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
  panels              fp32 and bf16 projections and the output layer are stored packed in
                      column panels (`Panels`: [N / 64, K, 64] for a [K, N] weight), the layout
                      of the CPU small-M kernel (jaxspec.kernels.cpu_matmul): it reads each
                      panel as one contiguous stream, so products of 1-16 rows (decode steps,
                      verifies, drafts) cost about one weight read, where XLA:CPU's dot on
                      [K, N] costs 1.5-3 one-row steps for 2-16 rows (and converts bf16 to
                      fp32 first). Only when the kernel is available. A GGUF checkpoint's
                      Q4_1 and Q8_0 weights come as Panels of their blocks instead, where
                      fp32 params are loaded for the kernel (jaxspec.checkpoint.blocks);
                      this policy leaves them as they are. The KV caches of this layout also
                      take decode steps' attention to the CPU decode-attention kernel
                      (jaxspec.kernels.cpu_attention: each layer's visible slots, read in place).
  fp32_cache          the KV cache is fp32 whatever the params' dtype (CPU: XLA:CPU widens a
                      bf16 cache write to fp32 and back over the whole cache, at every layer of
                      every step: a bf16 step of the default model at 2,048 slots took 5.5x
                      the fp32 step). Keys and values are computed in the params' dtype, so
                      the cache holds the same numbers; twice the cache memory in bf16.

Checkpoints store projections one way for every backend, fused and split-friendly at once:
`wqkv` [D, K, G + 2, Dh] (per key/value head: its G query heads, its key, its value) and
`w_gate_up` [D, 2, F]. Each is one matmul (XLA sees a [D, N] operand), and a `jax.sharding`
mesh splits them along K (whole attention groups) and F (MLP columns) without reshuffling.
Sharded params are never packed into panels (`for_mesh`).

`JAXSPEC_LAYOUT` (cpu, cpu-xla = cpu without panels, or accelerator) forces a policy, e.g. to
test the accelerator layouts on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from jaxspec import pytree
from jaxspec.models import quantized

ENV = "JAXSPEC_LAYOUT"
PANEL = 64  # columns per panel (kernels/cpu_matmul.cc's kPanel)
PACKED = ("wqkv", "wo", "w_gate_up", "w_down")  # per layer; and lm_head
PACKABLE = (jnp.float32, jnp.bfloat16)  # the dtypes the CPU kernel reads


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    output_copy: bool  # tied models carry lm_head [D, V] = embed.T
    values_slots_last: bool  # value cache [L, B, K, Dh, S] instead of [L, B, K, S, Dh]
    panels: bool = False  # fp32/bf16 projections packed as Panels for the CPU small-M kernel,
    # and attention of decode steps through the CPU decode-attention kernel (models.cache)
    fp32_cache: bool = False  # the KV cache in fp32 whatever the params' dtype


CPU = Layout("cpu", output_copy=True, values_slots_last=True, panels=True, fp32_cache=True)
CPU_XLA = Layout("cpu-xla", output_copy=True, values_slots_last=True, panels=False,
                 fp32_cache=True)
ACCELERATOR = Layout("accelerator", output_copy=False, values_slots_last=False)
_BY_NAME = {layout.name: layout for layout in (CPU, CPU_XLA, ACCELERATOR)}


@pytree.dataclass
class Panels:
    """A [K, *O] weight packed in column panels: data[j, k, c] = w2[k, PANEL * j + c], w2 the
    weight viewed as [K, N] (N = prod(O), zero-padded to a multiple of PANEL); or a GGUF
    model's quantized blocks of it in panels (uint8 or int8 data [J, K / 32, bytes]:
    jaxspec.models.quantized), which stand for fp32 weights."""

    data: jax.Array  # [ceil(N / PANEL), K, PANEL], or blocks [ceil(N / PANEL), K / 32, bytes]
    shape: tuple[int, ...] = pytree.static()  # the weight's own shape [K, *O]

    @property
    def dtype(self):
        """The weights' dtype (fp32 for blocks)."""
        return jnp.dtype(jnp.float32) if self.quantized else self.data.dtype

    @property
    def quantized(self) -> bool:
        return quantized.kind(self.data) is not None

    def floats(self) -> jax.Array:
        """The panels [J, K, PANEL] as fp32 or bf16 (blocks dequantized)."""
        return quantized.dequantize(self.data) if self.quantized else self.data


def pack(w: jax.Array) -> Panels:
    """w[K, *O] -> Panels."""
    flat = w.reshape(w.shape[0], -1)  # [K, N]
    pad = -flat.shape[1] % PANEL
    flat = jnp.pad(flat, ((0, 0), (0, pad)))
    data = flat.reshape(flat.shape[0], -1, PANEL).transpose(1, 0, 2)  # [N / PANEL, K, PANEL]
    return Panels(data=data, shape=tuple(w.shape))


def unpack(p: Panels) -> jax.Array:
    """Panels -> the weight [K, *O]."""
    K = p.shape[0]
    flat = p.floats().transpose(1, 0, 2).reshape(K, -1)  # [K, N padded]
    return flat[:, : math.prod(p.shape[1:])].reshape(p.shape)


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
    (XLA would gather a sharded weight for it), so sharded params are not packed."""
    if not layout.panels:
        return layout
    return CPU_XLA if layout == CPU else dataclasses.replace(layout, panels=False)


def apply(layout: Layout, params: dict, tied: bool) -> dict:
    """params in the policy's layout: its output layer (adds lm_head = embed.T to tied models
    where the policy wants a copy, removes a copy where it does not; untied models keep their
    own), then fp32 and bf16 projections packed into Panels where it wants panels and the
    kernel is available (jaxspec.kernels.cpu_matmul), unpacked where it does not. The weights
    that change are converted by one compiled program (one pass over memory, not a few eager
    ops each); the others are passed through as they are."""
    params = _output_layer(layout, params, tied)
    from jaxspec.kernels import cpu_matmul

    packed = layout.panels and cpu_matmul.available()

    def changes(w) -> bool:
        return not packed if isinstance(w, Panels) else packed and w.dtype in PACKABLE

    layers = params.get("layers", [])
    todo = {f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.items()
            if k in PACKED and changes(v)}
    if "lm_head" in params and changes(params["lm_head"]):
        todo["lm_head"] = params["lm_head"]
    if not todo:
        return params
    done = _convert(todo)
    params = dict(params)
    if "layers" in params:
        params["layers"] = [{k: done.get(f"{i}.{k}", v) for k, v in layer.items()}
                            for i, layer in enumerate(layers)]
    if "lm_head" in done:
        params["lm_head"] = done["lm_head"]
    return params


@jax.jit
def _convert(weights: dict) -> dict:
    """Each weight packed into Panels, each Panels unpacked."""
    return {k: unpack(w) if isinstance(w, Panels) else pack(w) for k, w in weights.items()}


def _output_layer(layout: Layout, params: dict, tied: bool) -> dict:
    has_copy = "lm_head" in params
    if not tied or has_copy == layout.output_copy:
        return params
    if layout.output_copy:
        return {**params, "lm_head": jnp.asarray(params["embed"].T)}
    return {k: v for k, v in params.items() if k != "lm_head"}
