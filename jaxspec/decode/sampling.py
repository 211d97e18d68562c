"""logits -> probabilities -> tokens, shared by target, draft and plain decoding.

Temperature, top-k and top-p are applied in fp32 in Hugging Face's order (temperature, then
top-k, then top-p on the renormalised top-k distribution). Top-k and top-p find their cut-off
by bisection over the bit patterns of the fp32 logits: 32 compare-and-reduce passes give the
exact threshold with no sort and no top_k over the vocabulary (Trainium's compiler rejects both
at vocabulary size). Nothing here uses `argmax` (a variadic reduce) or host callbacks.

`Sampler` is static (decides what is traced); `SamplingValues` holds the traced values (named
`values` wherever they are passed), so a new temperature, top-k or top-p value does not
recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec import pytree
from jaxspec.validation import check_sampling


@dataclasses.dataclass(frozen=True)
class Sampler:
    greedy: bool = True  # temperature == 0: take the argmax, no probabilities needed
    use_top_k: bool = False  # top-k filter active (k > 0)
    use_top_p: bool = False  # top-p filter active (p < 1)


@pytree.dataclass
class SamplingValues:
    temperature: jax.Array  # f32 []
    top_k: jax.Array  # i32 []
    top_p: jax.Array  # f32 []


def make(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Validate user values; return (static Sampler, traced SamplingValues)."""
    check_sampling(temperature, top_k, top_p)
    greedy = temperature == 0
    sampler = Sampler(greedy=greedy, use_top_k=not greedy and top_k > 0,
                      use_top_p=not greedy and top_p < 1)
    values = SamplingValues(
        temperature=jnp.float32(temperature if not greedy else 1.0),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
    )
    return sampler, values


def _lowbias32(x: jax.Array) -> jax.Array:
    """A bijection of u32 with near-ideal avalanche: lowbias32 with the constants
    [16 21f0aaad 15 735a2d97 15] from Wellons' hash-prospector."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x21F0AAAD)
    x = (x ^ (x >> 15)) * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def row_seeds(key: jax.Array, batch: int) -> jax.Array:
    """Seed words u32[B, 2] of the loop's rows, from a PRNG key or from one seed per row.

    key: a PRNG key (`jax.random.key`; "rbg" keeps threefry out): two words k are drawn from
    it and row b gets (k[0], k[1] + b), so rows differ and do not depend on the batch size;
    or integer seeds [B]: row b gets (0, seeds[b]), its own stream whatever shares its batch.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        k = jax.random.bits(key, (2,), jnp.uint32)
        rows = jnp.arange(batch, dtype=jnp.uint32)
        return jnp.stack([jnp.broadcast_to(k[0], (batch,)), k[1] + rows], axis=1)
    if not jnp.issubdtype(key.dtype, jnp.integer) or key.shape != (batch,):
        raise ValueError(f"key must be a PRNG key (jax.random.key) or integer seeds [{batch}], "
                         f"got {key.dtype}{list(key.shape)}")
    return jnp.stack([jnp.zeros((batch,), jnp.uint32), key.astype(jnp.uint32)], axis=1)


def uniforms(seeds: jax.Array, counter, n: int) -> jax.Array:
    """The loop's uniforms u[..., n] in [0, 1): draws 0..n-1 of iteration `counter` for rows
    with seed words seeds[..., 2] (u32, from `row_seeds`); counter broadcasts to seeds[..., 0].

    Stateless and counter based: draw i is the top 23 bits of
    h = L(L(L(L(0x9E3779B9 ^ s0) ^ s1) ^ counter) ^ i), L the lowbias32 hash (a bijection
    of u32), placed in the mantissa of a float in [1, 2), minus 1. So a row's uniforms depend
    only on its seed words, the counter and i (not on the batch, the row's place in it or the
    other rows), and rows of a batch that share s0 never hash to equal h at the same
    (counter, i). Only elementwise u32 xor, shift and multiply: no threefry (which neuronx-cc
    does not fully support) and no rng_bit_generator (whose vmap draws every row from one
    state).
    """
    h = jnp.uint32(0x9E3779B9)
    counter = jnp.asarray(counter).astype(jnp.uint32)[..., None]
    for word in (seeds[..., :1], seeds[..., 1:], counter, jnp.arange(n, dtype=jnp.uint32)):
        h = _lowbias32(h ^ word)  # [..., 1] for the row's words, then [..., n]
    mantissa = (h >> 9) | jnp.uint32(0x3F800000)  # a float in [1, 2)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def first_argmax(x: jax.Array) -> jax.Array:
    """Index of the first maximum along the last axis, without a variadic reduce."""
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the fp32 values x (-inf lowest; -0.0 == +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)  # -0.0 ties +0.0 (torch)
    flip = jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
    return bits ^ flip


def _largest_key(keys: jax.Array, enough) -> jax.Array:
    """Largest threshold T[..., 1] with enough(keys >= T) true; `enough` must be monotone.

    Built bit by bit from the most significant: 32 passes over the last axis.
    """

    def set_bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(enough(keys >= candidate), candidate, t)

    start = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
    return jax.lax.fori_loop(0, 32, set_bit, start)


def top_k_mask(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep every logit >= the k-th largest (ties kept, as Hugging Face); k <= 0 keeps all."""
    keys = _order_keys(logits)
    k_clipped = jnp.clip(k, 1, logits.shape[-1])
    threshold = _largest_key(keys, lambda kept: jnp.sum(kept, -1, keepdims=True) >= k_clipped)
    return jnp.where((keys >= threshold) | (k <= 0), logits, -jnp.inf)


def top_p_mask(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_keys(logits)
    threshold = _largest_key(
        keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0), -1, keepdims=True) >= p
    )
    return jnp.where((keys >= threshold) | (p >= 1), logits, -jnp.inf)


def filtered_logits(sampler: Sampler, values: SamplingValues, logits: jax.Array) -> jax.Array:
    """Temperature, top-k, top-p on logits[..., V] (fp32). Masked entries become -inf."""
    logits = logits.astype(jnp.float32) / values.temperature
    if sampler.use_top_k:
        logits = top_k_mask(logits, values.top_k)
    if sampler.use_top_p:
        logits = top_p_mask(logits, values.top_p)
    return logits


def probabilities(sampler: Sampler, values: SamplingValues, logits: jax.Array) -> jax.Array:
    """The sampling distribution [..., V] for logits[..., V]."""
    return jax.nn.softmax(filtered_logits(sampler, values, logits), axis=-1)


def sample(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Draw one index per row from nonnegative weights[..., V] (need not sum to 1).

    Inverse CDF with uniforms u[...] in [0, 1); zero-weight entries are never drawn.
    """
    cdf = jnp.cumsum(weights, axis=-1)
    below = jnp.sum(cdf <= u[..., None] * cdf[..., -1:], axis=-1)
    iota = jnp.arange(weights.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(weights > 0, iota, 0), axis=-1)
    return jnp.minimum(below, last_positive).astype(jnp.int32)


def next_token(sampler: Sampler, values: SamplingValues, logits: jax.Array, u: jax.Array):
    """One token per row from logits[..., V]: argmax when greedy, else a draw using u[...]."""
    if sampler.greedy:
        return first_argmax(logits)
    return sample(probabilities(sampler, values, logits), u)
