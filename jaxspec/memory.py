"""The memory planner: what one generate call needs on its device, checked before allocating.

`plan(spec, batch, target_params, draft_params, prompt_width)` counts the bytes per device of

  target params      every leaf of the target's params tree
  draft params       the draft's leaves that the target does not already hold (a layerskip
                     draft shares the target's arrays: 0)
  target KV cache    keys and values, 2 x [L, B, K, S, Dh] in the cache dtype (the layout
                     policy orders the axes; it does not change the size)
  draft state        the draft's own state (a model draft's KV cache), from the shapes that
                     its `init_state` would allocate (`jax.eval_shape`: nothing is allocated)
  token buffer       [B, S] int32
  verify activations the largest of a loop iteration: the verify logits [B, γ+1, V] fp32
                     and, when sampling, the draft's q [B, γ, V] and the target's p
                     [B, γ+1, V] (fp32)
  prefill activations
                     the largest of the target's prefill over the padded prompt width P: its
                     attention weights, [B, H, Tb, Sb] fp32 per block of queries
                     (models.decoder.prefill_blocks: about [B, H, P, P] / 2 in all), which
                     XLA holds all at once and twice (none where the CPU prefill-attention
                     kernel runs), or the MLP's [B, P, 2F]; it dominates for long prompts

as a `Plan` with a `total` (the two activation terms are never live at once: the larger
counts). Under a `jax.sharding` mesh (spec.mesh) every term is one device's
part: sharded params by their shard shape, the KV cache split over kv heads (tp) and rows (dp)
as models.sharding pins it, the token buffer over rows, the logits over rows and vocabulary;
the draft's state is not pinned (XLA's propagation splits it), so it is counted whole, an upper
bound. `capacity(device, sharing)` is what the device offers: the allocator's `bytes_limit`
where `memory_stats` reports one (GPU), the host's MemAvailable on CPU (the params, already
loaded, are then not counted again; `sharing` CPU devices of a mesh share it), None where
unknown (e.g. Neuron: no check).
`check` refuses a plan that does not fit with one line naming every term and the capacity.
The plan is an estimate of what the loop holds, not XLA's exact peak (compiler scratch and
temporaries smaller than the largest activation are not counted).
"""

from __future__ import annotations

import dataclasses
import math

from jaxspec.errors import UserError

FP32 = 4
INT32 = 4
MEMINFO = "/proc/meminfo"
LABELS = {
    "target_params": "target params",
    "draft_params": "draft params",
    "target_cache": "target KV cache",
    "draft_state": "draft state",
    "token_buffer": "token buffer",
    "activations": "verify activations",
    "prefill": "prefill activations",
}
ATTENTION_COPIES = 2  # attention-weight arrays of a query block XLA holds at once in a prefill


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of each term (see the module docstring)."""

    target_params: int
    draft_params: int
    target_cache: int
    draft_state: int
    token_buffer: int
    activations: int  # verify
    prefill: int

    @property
    def total(self) -> int:
        held = self.params + self.target_cache + self.draft_state + self.token_buffer
        return held + max(self.activations, self.prefill)

    @property
    def params(self) -> int:
        return self.target_params + self.draft_params

    def terms(self) -> list[tuple[str, int]]:
        """[(label, bytes)] in a fixed order."""
        return [(LABELS[f.name], getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Bytes a device offers. counts_params: the params must fit inside `bytes` (a device's
    whole pool); False when `bytes` is free memory measured after the params were loaded."""

    bytes: int
    source: str
    counts_params: bool = True
    shared_by: int = 1  # devices that each need a plan's bytes from this capacity (host memory)


def leaf_bytes(leaf) -> int:
    """Bytes of one device's part of an array or a jax.ShapeDtypeStruct (all of it unless it
    carries a sharding that splits it)."""
    import numpy as np

    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def _buffer(leaf) -> int:
    """An identity for the memory behind an array: two Array objects over one buffer match."""
    try:
        return leaf.unsafe_buffer_pointer()
    except Exception:  # abstract shapes, sharded or deleted arrays
        return id(leaf)


def tree_bytes(tree, *, exclude=None) -> int:
    """Bytes of the distinct arrays in `tree`, leaving out those that `exclude` holds too."""
    import jax

    seen = {_buffer(leaf) for leaf in jax.tree.leaves(exclude)}
    total = 0
    for leaf in jax.tree.leaves(tree):
        if _buffer(leaf) not in seen:
            seen.add(_buffer(leaf))
            total += leaf_bytes(leaf)
    return total


def cache_bytes(spec, batch: int) -> int:
    """Keys and values of the target's KV cache, from the shapes models.cache.init_cache
    would allocate (`jax.eval_shape`: nothing is allocated)."""
    import jax

    from jaxspec.models.cache import init_cache

    shapes = jax.eval_shape(lambda: init_cache(spec.target, batch, spec.max_len, spec.dtype,
                                               spec.layout))
    if spec.mesh is not None:  # pinned by the loop (models.sharding.constrain_cache)
        from jaxspec.models import sharding

        split = sharding.cache(spec.mesh)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split),
                              shapes)
    return tree_bytes(shapes)


def draft_state_bytes(spec, batch: int) -> int:
    """Bytes of the draft's state for `batch` rows (0 without a draft), from its shapes."""
    import jax

    if spec.draft is None:
        return 0
    shapes = jax.eval_shape(lambda: spec.draft.init_state(batch, spec.max_len, spec.dtype,
                                                          spec.layout))
    return tree_bytes(shapes)


def activation_bytes(batch: int, gamma: int, vocab: int, sampled: bool) -> int:
    """Verify logits [B, γ+1, V] fp32, plus q [B, γ, V] and p [B, γ+1, V] fp32 when sampling."""
    logits = batch * (gamma + 1) * vocab * FP32
    if not sampled:
        return logits
    return logits + batch * gamma * vocab * FP32 + batch * (gamma + 1) * vocab * FP32


def prefill_bytes(config, rows: int, prompt_width: int, dtype_bytes: int, tp: int = 1, *,
                  attention_kernel: bool = False) -> int:
    """The prefill's largest activation per device (see the module docstring): heads and
    MLP columns split over tp; with `attention_kernel` (the CPU prefill-attention kernel, which
    keeps no attention weights) the MLP's."""
    from jaxspec.models.decoder import prefill_blocks

    scores = sum((stop - start) * (stop - first)  # every block's [Tb, Sb]
                 for start, stop, first in prefill_blocks(prompt_width, config.sliding_window))
    attention = 0 if attention_kernel else (
        ATTENTION_COPIES * rows * -(-config.num_heads // tp) * scores)
    mlp = rows * prompt_width * 2 * -(-config.intermediate_size // tp) * dtype_bytes
    return max(attention * FP32, mlp)


def plan(spec, batch: int, target_params, draft_params, prompt_width: int) -> Plan:
    """The plan of a loop with static spec `spec` (a decode.state.LoopSpec) over `batch` rows
    whose prompts are padded to `prompt_width`: bytes per device (one device's part under
    spec.mesh)."""
    import numpy as np

    tp, dp = _mesh_shape(spec.mesh)
    rows = -(-batch // dp)
    return Plan(
        target_params=tree_bytes(target_params),
        draft_params=tree_bytes(draft_params, exclude=target_params),
        target_cache=cache_bytes(spec, batch),
        draft_state=draft_state_bytes(spec, batch),
        token_buffer=rows * spec.max_len * INT32,
        activations=activation_bytes(rows, spec.gamma, -(-spec.target.vocab_size // tp),
                                     sampled=not spec.sampler.greedy),
        prefill=prefill_bytes(spec.target, rows, prompt_width, np.dtype(spec.dtype).itemsize,
                              tp, attention_kernel=_prefill_kernel(spec)),
    )


def _prefill_kernel(spec) -> bool:
    """Whether the loop's prefill attends through the CPU prefill kernel (decoder.attention)."""
    import jax.numpy as jnp

    from jaxspec.kernels import cpu_attention

    dtype = jnp.float32 if spec.layout.fp32_cache else spec.dtype
    return cpu_attention.prefill_takes(spec.layout.panels, dtype, spec.target.head_dim)


def _mesh_shape(mesh) -> tuple[int, int]:
    """(tp, dp) of a models.sharding mesh; (1, 1) without one."""
    if mesh is None:
        return 1, 1
    from jaxspec.models import sharding

    return mesh.shape[sharding.MODEL], mesh.shape[sharding.DATA]


def mem_available(path: str = MEMINFO) -> int | None:
    """The host's MemAvailable in bytes (Linux), or None when unknown."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def capacity(device, sharing: int = 1) -> Capacity | None:
    """What `device` (a jax.Device) offers, or None when unknown (then nothing is checked).
    sharing: the run's devices in this process (CPU devices share the host's memory)."""
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented by every backend
        stats = None
    if stats and stats.get("bytes_limit"):
        return Capacity(int(stats["bytes_limit"]), f"bytes_limit of {device}")
    if device.platform == "cpu":
        free = mem_available()
        if free is not None:
            return Capacity(free, "host MemAvailable, params already loaded not counted",
                            counts_params=False, shared_by=sharing)
    return None


def needed(p: Plan, cap: Capacity) -> int:
    """Bytes of `p` that must fit in `cap` (for every device that shares it)."""
    return (p.total if cap.counts_params else p.total - p.params) * cap.shared_by


def human(n: int) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check(p: Plan, cap: Capacity | None) -> None:
    """Raise UserError (one line: every term and the capacity) when `p` does not fit."""
    if cap is None or needed(p, cap) <= cap.bytes:
        return
    terms = ", ".join(f"{label} {human(b)}" for label, b in p.terms())
    besides = "" if cap.counts_params else " besides the loaded params"
    if cap.shared_by > 1:
        besides += f" for {cap.shared_by} devices"
    raise UserError(f"not enough memory: generation needs {human(needed(p, cap))}{besides} "
                    f"({terms}; total {human(p.total)} per device) but the device has "
                    f"{human(cap.bytes)} "
                    f"({cap.source}); use fewer prompts, a smaller max_new_tokens or a "
                    "smaller model")


def lines(p: Plan, cap: Capacity | None) -> list[str]:
    """The plan for humans: one line per term, the total and the capacity."""
    out = [f"{label:<16} {human(b):>10}" for label, b in p.terms()]
    out.append(f"{'total':<16} {human(p.total):>10}")
    out.append(f"{'capacity':<16} {human(cap.bytes):>10} ({cap.source})" if cap is not None
               else f"{'capacity':<16} {'unknown':>10} (not checked)")
    return out
