"""The decoder: a pure function of (params, tokens, positions, cache).

One implementation serves Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3; the config's flags pick
the differences. Params are a plain pytree (what Orbax saves and the loop receives):

    {"embed": [V, D],
     "layers": [{"attn_norm": [D],
                 "wqkv": [D, K, G + 2, Dh],       per kv head: its G query heads, key, value
                 "bqkv": [K, G + 2, Dh]           (attention_bias)
                 "q_norm": [Dh], "k_norm": [Dh]   (qk_norm)
                 "wo": [H * Dh, D],               query head h = k * G + g
                 "mlp_norm": [D],
                 "w_gate_up": [D, 2, F],          gate, then up
                 "w_down": [F, D]}, ...],         one dict per layer
     "final_norm": [D],
     "lm_head": [D, V]}                           absent when embeddings are tied, unless the
                                                  layout policy adds embed.T (models.layout)

H query heads, K key/value heads, G = H / K, Dh head size, F MLP width. Weights are stored
[in, out] so a projection is `x @ w` (on the CPU layout, fp32 and bf16 projections and lm_head
are `models.layout.Panels` of these shapes; `dense` takes either); the fused projections are one
matmul each and split along K or F without reshuffling (for sharding; see models.layout).
Each layer's weights are separate buffers that the matmuls read directly, with no per-layer
slice of a stacked array (which XLA would copy, doubling weight traffic). On the CPU layout
(every projection in Panels, the CPU kernel available) the layers run as one `lax.scan` whose
projections hand the kernel every layer's panels and the loop counter (`PanelStack`), so XLA
compiles one layer's kernels, not L; elsewhere the loop is unrolled in Python, each layer a
call of one jitted `block` (a program traces one layer, and XLA inlines the calls).
Activations stay in the params' dtype; norms, attention softmax and logits are fp32, and so is
all of attention where the layout keeps an fp32 KV cache (CPU); products on Panels are fp32
(the kernel widens bf16 weights). Every product of fp32 operands asks for full fp32 precision
explicitly (XLA on GPU would otherwise run them in TF32); bf16 products keep the backend's
default.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import pytree
from jaxspec.models import cache as kv
from jaxspec.models.cache import KVCache
from jaxspec.models import layout as layouts
from jaxspec.models import quantized
from jaxspec.models.config import ModelConfig

Params = dict


def einsum(spec: str, a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
    """jnp.einsum at full precision when both operands are fp32, the default otherwise."""
    return jnp.einsum(spec, a, b, precision=_precision(a, b), **kwargs)


def dense(x: jax.Array, w, out_dtype=None) -> jax.Array:
    """x[..., K] @ w[K, *O] -> [..., *O] in x's dtype (or `out_dtype`): a projection (w an
    array, or Panels on the CPU layout, or a PanelStack inside the scanned layer loop).

    Panels (fp32 or bf16 weights) go through the CPU matmul kernel (jaxspec.kernels.cpu_matmul),
    which multiplies and sums in fp32 whatever the weights' dtype; a program lowered for another
    platform takes XLA's dot on the same panels, also in fp32.
    """
    if not isinstance(w, (layouts.Panels, PanelStack)):
        return jnp.tensordot(x, w, axes=1, precision=_precision(x, w))
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [M, K]
    out = _stack_product(rows, w) if isinstance(w, PanelStack) else _panels_product(rows, w)
    N = math.prod(w.shape[1:])
    out = out[:, :N].astype(out_dtype or x.dtype)
    return out.reshape(x.shape[:-1] + w.shape[1:])


@pytree.dataclass
class PanelStack:
    """One packed weight of every decoder layer, chosen by `index` (the layer loop's counter):
    each layer keeps its own buffer, which the CPU kernel reads in place (a slice of one
    stacked array would be a copy of the weight at every layer of every step)."""

    layers: tuple[jax.Array, ...]  # L x [J, K, PANEL], as Panels.data
    index: jax.Array | None  # i32[]
    shape: tuple[int, ...] = pytree.static()  # the weight's own shape [K, *O]


def _panels_product(rows, w: layouts.Panels):
    """rows[M, K] (fp32) @ w -> [M, J * PANEL] (fp32): the CPU kernel where it takes the
    product."""
    from jaxspec.kernels import cpu_matmul

    if cpu_matmul.fits(rows, w.data) and cpu_matmul.available():
        return jax.lax.platform_dependent(rows, w.data, cpu=cpu_matmul.matmul,
                                          default=_panels_dot)
    return _panels_dot(rows, w.data)


def _stack_product(rows, w: PanelStack):
    """rows[M, K] @ w.layers[w.index] -> [M, J * PANEL] (only built where the kernel is
    available: `scannable`). A program lowered for another platform takes XLA's dot on a slice
    of the stacked layers' fp32 panels (a copy of them all: correct, not fast; jaxspec never
    places panels there). The layers' panels may differ in kind (a GGUF file's Q4_K and Q6_K
    layers): the kernel reads the chosen layer's."""
    from jaxspec.kernels import cpu_matmul

    def kernel(rows, index, *layers):
        return cpu_matmul.matmul_indexed(rows, index, layers)

    def xla(rows, index, *layers):
        floats = [layouts.Panels(data, w.shape).floats() for data in layers]
        return _panels_dot(rows, jnp.stack(floats)[index])

    return jax.lax.platform_dependent(rows, w.index, *w.layers, cpu=kernel, default=xla)


def _panels_dot(rows, data):
    """rows[M, K] (fp32) @ panels data[J, K, P] -> [M, J * P] in fp32 at full precision
    (dot_general: einsum costs more to trace, and every program traces this branch)."""
    data = quantized.dequantize(data) if quantized.kind(data) else data.astype(jnp.float32)
    out = jax.lax.dot_general(rows, data, (((1,), (1,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST)
    return out.reshape(rows.shape[0], -1)  # [M, J, P] -> [M, J * P]


def _precision(a, b):
    fp32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return jax.lax.Precision.HIGHEST if fp32 else jax.lax.Precision.DEFAULT


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, cast back to x's dtype before the weight (as Hugging Face)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def inv_frequencies(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [Dh/2] (fp32), with llama3 scaling when configured."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv = (1.0 / (config.rope_theta ** exponents)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype):
    """cos, sin [B, T, 1, Dh] for positions[B, T] (half-split convention, as Hugging Face)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[..., Dh] by the angles in cos, sin (broadcast against x, e.g. [B, T, 1, Dh])."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(config: ModelConfig, positions: jax.Array, max_len: int) -> jax.Array:
    """[B, T, S] True where query at positions[b, t] may see cache slot s."""
    slots = jnp.arange(max_len)[None, None, :]
    mask = slots <= positions[:, :, None]
    if config.sliding_window is not None:
        mask &= slots > positions[:, :, None] - config.sliding_window
    return mask


def project_qkv(config, layer, x, rope_cs):
    """x[B, T, D_in] -> q [B, T, K, G, Dh], k, v [B, T, K, Dh], rotated by rope_cs."""
    G = config.num_groups
    qkv = dense(x, layer["wqkv"])  # [B, T, K, G + 2, Dh]
    if config.attention_bias:
        qkv = qkv + layer["bqkv"]
    q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    cos, sin = rope_cs  # [B, T, 1, Dh]
    return rope(q, cos[:, :, :, None], sin[:, :, :, None]), rope(k, cos, sin), v


def attention(config, layer, x, positions, mask, rope_cs, cache: KVCache, index,
              prefill: bool = False):
    """One attention block on x[B, T, D]; writes this layer's keys/values into the cache.
    `mask` is attention_mask(config, positions, S) (the CPU kernel derives it from positions);
    `prefill`: see run_layers."""
    from jaxspec.kernels import cpu_attention

    B, T, _ = x.shape
    q, k, v = project_qkv(config, layer, x, rope_cs)
    cache = kv.write(cache, index, positions, k, v)
    q = q.astype(cache.k.dtype)  # an fp32 cache (models.layout) makes attention fp32
    if cpu_attention.fits(q, cache):
        # decode steps and verifies on CPU: the layer's visible slots, read in place
        out = cpu_attention.attend(q, cache.k, cache.v, index, positions, config.sliding_window)
    elif prefill:  # a prompt's first forward: its own keys and values, causally
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cpu_attention.prefill_takes(cache.cpu_kernel, q.dtype, config.head_dim):
            out = cpu_attention.prefill(q, k, v, config.sliding_window)
        else:
            out = _attention_prefill(config, q, k, v)
    else:
        out = _attention_xla(config, q, cache, index, mask)
    out = out.reshape(B, T, config.num_heads * config.head_dim).astype(x.dtype)  # [B, T, H * Dh]
    return dense(out, layer["wo"]), cache


def _attention_xla(config, q, cache: KVCache, index, mask):
    """q[B, T, K, G, Dh] over the cache's layer `index` where mask[B, T, S] allows: [B, T, K, G,
    Dh] (XLA's batched dots over every slot)."""
    keys, values = cache.k[index], cache.v[index]  # [B, K, S, Dh]; [B, K, Dh, S] or [B, K, S, Dh]
    # The cache is each product's left operand and the T·G query rows its right one: XLA:CPU
    # then computes a query row's numbers the same way whatever T is, so a verified position
    # equals a one-token step bit for bit (with the query rows on the left they differed by an
    # ulp on an AVX2 CPU, enough to flip bf16 tokens: tests/models/test_decoder.py).
    scores = einsum("BKSD,BTKGD->BKGTS", keys, q, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(config.head_dim)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    values_spec = "BKDS" if cache.values_slots_last else "BKSD"
    return einsum(f"{values_spec},BKGTS->BTKGD", values, weights)


PREFILL_BLOCK = 128  # query positions per block of _attention_prefill


def prefill_blocks(length: int, window: int | None) -> list[tuple[int, int, int]]:
    """_attention_prefill's blocks for a prompt of `length` positions: (start, stop, first),
    the queries [start, stop) reading the keys [first, stop)."""
    return [(start, min(length, start + PREFILL_BLOCK),
             0 if window is None else max(0, start - window + 1))
            for start in range(0, length, PREFILL_BLOCK)]


def _attention_prefill(config, q, k, v):
    """Causal attention of a prompt's own positions 0..T-1: q[B, T, K, G, Dh], k, v [B, T, K, Dh]
    -> [B, T, K, G, Dh]. The queries go in blocks of PREFILL_BLOCK positions, each block's
    dots over the keys it may see only (up to its last position, from its first position's
    sliding window on), so a T-token prompt computes about half of the T x T scores (and none
    of the cache's empty slots) and reads no cache."""
    W = config.sliding_window
    outs = []
    for start, stop, first in prefill_blocks(q.shape[1], W):
        query = np.arange(start, stop)[:, None]  # [Tb, 1] positions (static)
        key = np.arange(first, stop)[None, :]  # [1, Sb]
        visible = key <= query  # [Tb, Sb]
        if W is not None:
            visible &= key > query - W
        scores = einsum("BSKD,BTKGD->BKGTS", k[:, first:stop], q[:, start:stop],
                        preferred_element_type=jnp.float32) / math.sqrt(config.head_dim)
        scores = jnp.where(visible, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(einsum("BSKD,BKGTS->BTKGD", v[:, first:stop], weights))
    return jnp.concatenate(outs, axis=1)


def mlp(config: ModelConfig, layer, x: jax.Array) -> jax.Array:
    gate_up = dense(x, layer["w_gate_up"])  # [B, T, 2, F]
    return dense(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], layer["w_down"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def block(config: ModelConfig, prefill: bool, layer, x, positions, mask, rope_cs,
          cache: KVCache, index):
    """One decoder layer on x[B, T, D] -> (x, cache), its keys and values written at `index`
    (i32[]). A jitted function of the layer's arrays: a program that runs L layers of the same
    shapes traces and lowers one and calls it L times (unrolled: XLA inlines the calls) or
    once (the body of `_scanned`), so tracing a model costs about one layer's work."""
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    out, cache = attention(config, layer, h, positions, mask, rope_cs, cache, index, prefill)
    x = x + out
    return x + mlp(config, layer, rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)), cache


def run_layers(config: ModelConfig, params: Params, tokens, positions, cache: KVCache,
               capture: tuple[int, ...] = (), *, prefill: bool = False):
    """Run the decoder stack: tokens[B, T], positions[B, T] -> (hidden[B, T, D], captured, cache).

    hidden is after the final norm, i.e. what the output layer reads. captured is None when
    `capture` is empty, else [B, T, len(capture), D]: the residual stream entering each layer
    in `capture` (0 = the embeddings; num_layers = the last layer's output, before the norm).
    With `prefill` the caller promises that every row's positions are 0..T-1 and that the cache
    holds nothing before them (a prompt's first forward): attention then reads the call's own
    keys and values causally (on the CPU layout the prefill kernel, kernels.cpu_attention;
    elsewhere `_attention_prefill`'s blocks) rather than every cache slot (where the decode
    kernel takes the call, T ≤ cpu_attention.MAX_POSITIONS, it still does).
    """
    mask = attention_mask(config, positions, cache.max_len)
    tokens = jnp.clip(tokens, 0, params["embed"].shape[0] - 1)  # out-of-range ids never gather OOB
    x = params["embed"][tokens]  # [B, T, D]
    rope_cs = rope_tables(positions, inv_frequencies(config), x.dtype)
    context = (positions, mask, rope_cs)
    layers = params["layers"]
    run = _scanned if scannable(layers) else _unrolled
    x, captured, cache = run(functools.partial(block, config, prefill), layers, x, context,
                             cache, capture)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), captured, cache


def _unrolled(layer_fn, layers, x, context, cache, capture):
    """The layers one after another, each a call of `block` (`layer_fn`: XLA inlines them)."""
    streams = {}
    for index, layer in enumerate(layers):
        streams[index] = x
        x, cache = layer_fn(layer, x, *context, cache, np.int32(index))
    streams[len(layers)] = x
    captured = None
    if capture:
        with jax.named_scope("capture_hidden"):
            captured = jnp.stack([streams[i] for i in capture], axis=2)  # [B, T, C, D]
    return x, captured, cache


def scannable(layers) -> bool:
    """Whether the layers run as one `lax.scan` (`_scanned`): every projection packed in
    Panels (the CPU layout) and the CPU kernel, which reads a layer's panels in place,
    available."""
    from jaxspec.kernels import cpu_matmul

    return (len(layers) > 1 and all(isinstance(layer[k], layouts.Panels) for layer in layers
                                    for k in layouts.PACKED)
            and cpu_matmul.available())


def _scanned(layer_fn, layers, x, context, cache, capture):
    """The layers as one lax.scan over their index: XLA compiles (and XLA:CPU resolves on a
    program's first run) one layer's kernels instead of L, which is most of a first process's
    compile and ~0.5 s of every later one's first generation on the default model. The
    projections read each layer's own panels (PanelStack); the small weights (norms, biases)
    are stacked [L, ...] in the program. Each layer's input stream in `capture` is written to
    its slot of captured[C + 1, B, T, D] (the others to slot C, which nothing reads)."""
    L, C = len(layers), len(capture)
    packed = {k: PanelStack(tuple(layer[k].data for layer in layers), None, layers[0][k].shape)
              for k in layouts.PACKED}
    small = {k: jnp.stack([layer[k] for layer in layers]) for k in layers[0] if k not in packed}
    table = np.full(L + 1, C, np.int32)  # [L + 1]: the slot of the stream entering layer i
    for c, i in enumerate(capture):
        table[i] = c
    slots = jnp.asarray(table)
    captured = jnp.zeros((C + 1, *x.shape), x.dtype) if capture else None

    def step(carry, index):
        x, captured, cache = carry
        if captured is not None:
            captured = jax.lax.dynamic_update_index_in_dim(captured, x, slots[index], 0)
        layer = {**{k: w.replace(index=index) for k, w in packed.items()},
                 **{k: w[index] for k, w in small.items()}}
        x, cache = layer_fn(layer, x, *context, cache, index)
        return (x, captured, cache), None

    (x, captured, cache), _ = jax.lax.scan(step, (x, captured, cache),
                                           jnp.arange(L, dtype=jnp.int32))
    if capture:
        captured = captured.at[table[L]].set(x)
        captured = jnp.moveaxis(captured[:C], 0, 2)  # [B, T, C, D]
    return x, captured, cache


def hidden_states(config: ModelConfig, params: Params, tokens, positions, cache: KVCache):
    """tokens[B, T], positions[B, T] -> (hidden[B, T, D] after the final norm, cache)."""
    hidden, _, cache = run_layers(config, params, tokens, positions, cache)
    return hidden, cache


def logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Output layer: hidden[..., D] -> logits[..., V] in fp32."""
    head = params.get("lm_head")
    if isinstance(head, layouts.Panels):  # the kernel's fp32 result, kept
        return dense(hidden, head, out_dtype=jnp.float32)
    if head is not None:
        return einsum("...D,DV->...V", hidden, head, preferred_element_type=jnp.float32)
    return einsum("...D,VD->...V", hidden, params["embed"], preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: Params, tokens, positions, cache: KVCache):
    """tokens[B, T], positions[B, T] -> (logits[B, T, V] fp32, hidden[B, T, D], cache)."""
    hidden, cache = hidden_states(config, params, tokens, positions, cache)
    return logits(params, hidden), hidden, cache


def forward_capture(config: ModelConfig, params: Params, tokens, positions, cache: KVCache,
                    capture: tuple[int, ...]):
    """forward, plus the residual streams entering the layers in `capture` (see run_layers):
    -> (logits[B, T, V], hidden[B, T, D], captured[B, T, C, D] or None, cache)."""
    hidden, captured, cache = run_layers(config, params, tokens, positions, cache, capture)
    return logits(params, hidden), hidden, captured, cache


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params in the layout above (for tests and as Orbax's restore target)."""
    return unstack_layers(init_stacked_params(config, key, dtype))


def init_stacked_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """init_params with the layers stacked: params["layers"] is one dict of [L, ...] arrays.

    Keys: embed, then wqkv, wo, w_gate_up, w_down of each layer in turn, then lm_head. Each
    kind is drawn for all layers at once (vmapped: the same values as one draw per layer), so
    a program making a 32-layer model compiles four draws, not 128, and no per-layer slices
    (split the layers outside it: `unstack_layers`)."""
    D, F, V, Dh, L = (config.hidden_size, config.intermediate_size, config.vocab_size,
                      config.head_dim, config.num_layers)
    qkv = (config.num_kv_heads, config.num_groups + 2, Dh)
    keys = jax.random.split(key, 4 * L + 2)
    per_layer = keys[1:1 + 4 * L].reshape(L, 4)  # [L, 4]: wqkv, wo, w_gate_up, w_down

    def dense(shape, keys):  # keys [] or [L] -> [*shape] or [L, *shape]
        draw = lambda k: (jax.random.normal(k, shape) * 0.02).astype(dtype)  # noqa: E731
        return jax.vmap(draw)(keys) if keys.ndim else draw(keys)

    def const(value, shape):  # [L, *shape]
        return jnp.full((L, *shape), value, dtype)

    layers = {"attn_norm": const(1, (D,)), "wqkv": dense((D, *qkv), per_layer[:, 0]),
              "wo": dense((config.num_heads * Dh, D), per_layer[:, 1]),
              "mlp_norm": const(1, (D,)), "w_gate_up": dense((D, 2, F), per_layer[:, 2]),
              "w_down": dense((F, D), per_layer[:, 3])}
    if config.attention_bias:
        layers["bqkv"] = const(0, qkv)
    if config.qk_norm:
        layers["q_norm"] = const(1, (Dh,))
        layers["k_norm"] = const(1, (Dh,))
    params = {"embed": dense((V, D), keys[0]), "layers": layers,
              "final_norm": jnp.ones((D,), dtype)}
    if not config.tie_word_embeddings:
        params["lm_head"] = dense((D, V), keys[4 * L + 1])
    return params


def unstack_layers(params: Params) -> Params:
    """params with params["layers"] [L, ...] arrays split into the list of L layer dicts."""
    stacked = params["layers"]
    count = len(next(iter(stacked.values())))
    return {**params, "layers": [{name: w[i] for name, w in stacked.items()}
                                 for i in range(count)]}
