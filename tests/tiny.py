"""Tiny random models for the sampling, rejection and loop tests.

`init_params` draws weights with std 0.02, which gives nearly uniform logits; `tiny_params`
scales every projection so that argmaxes are decisive and distributions are peaked and varied.
`TinyModel` is the smallest object the public API accepts as a model (config, params,
tokenizer, path).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxspec import model
from jaxspec.cache import init_cache
from jaxspec.config import ModelConfig

DENSE = ("embed", "lm_head", "wqkv", "wo", "w_gate_up", "w_down")


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Model-like object for `jaxspec.SpeculativeDecoder` (id-only: no tokenizer)."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    path: Any = None


def tiny_config(*, vocab: int = 48, hidden: int = 32, layers: int = 1, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 64, max_positions: int = 256,
                eos: tuple[int, ...] = (), tied: bool = False) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        eos_token_ids=tuple(eos))


def _scale(tree, factor: float):
    """Multiply every dense weight (not the norms) of a params tree by factor."""
    if isinstance(tree, dict):
        return {k: (v * factor if k in DENSE else _scale(v, factor)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_scale(v, factor) for v in tree]
    return tree


def tiny_params(config: ModelConfig, seed: int = 0, *, std: float = 0.5):
    """Random params whose dense weights have standard deviation `std` (not 0.02)."""
    params = model.init_params(config, jax.random.key(seed), jnp.float32)
    return _scale(params, std / 0.02)


def tiny_model(seed: int = 0, *, std: float = 0.5, **config_kwargs) -> TinyModel:
    config = tiny_config(**config_kwargs)
    return TinyModel(config=config, params=tiny_params(config, seed, std=std))


def perturbed(target: TinyModel, *, noise: float, seed: int = 1) -> TinyModel:
    """A draft close to the target: its params plus Gaussian noise of std `noise`."""
    leaves, treedef = jax.tree.flatten(target.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + noise * jax.random.normal(k, leaf.shape, leaf.dtype)
             for leaf, k in zip(leaves, keys)]
    return dataclasses.replace(target, params=jax.tree.unflatten(treedef, noisy))


def resized_vocab(m: TinyModel, vocab: int, *, seed: int = 2, std: float = 0.5) -> TinyModel:
    """The same model with its embedding/output tables cut or padded (random rows) to `vocab`."""
    params = dict(m.params)
    old = m.config.vocab_size
    key_e, key_h = jax.random.split(jax.random.key(seed))
    if vocab <= old:
        params["embed"] = params["embed"][:vocab]
        if "lm_head" in params:
            params["lm_head"] = params["lm_head"][:, :vocab]
    else:
        extra = vocab - old
        params["embed"] = jnp.concatenate(
            [params["embed"], std * jax.random.normal(key_e, (extra, params["embed"].shape[1]))])
        if "lm_head" in params:
            params["lm_head"] = jnp.concatenate(
                [params["lm_head"],
                 std * jax.random.normal(key_h, (params["lm_head"].shape[0], extra))], axis=1)
    config = dataclasses.replace(m.config, vocab_size=vocab)
    return TinyModel(config=config, params=params, tokenizer=m.tokenizer, path=m.path)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(config: ModelConfig, params, tokens):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, _, _ = model.forward(config, params, tokens, positions, init_cache(config, B, T))
    return logits


def full_logits(config: ModelConfig, params, tokens) -> np.ndarray:
    """Teacher-forced logits [B, T, V] of tokens[B, T]: positions 0..T-1, a fresh cache.

    Rows are right-padded to a multiple of 32 before the (jitted) forward, so successive calls
    with growing sequences compile rarely; causal attention makes the padding invisible.
    """
    tokens = np.asarray(tokens, np.int32)
    B, T = tokens.shape
    padded = np.zeros((B, -(-T // 32) * 32), np.int32)
    padded[:, :T] = tokens
    return np.asarray(_teacher_forced(config, params, jnp.asarray(padded)))[:, :T]


def greedy_reference(m: TinyModel, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy decoding by re-running every full sequence without a cache at each step.

    Rows stop after an EOS id of the model's config or after max_new tokens.
    """
    eos = set(m.config.eos_token_ids)
    seqs, done = [list(p) for p in prompts], [False] * len(prompts)
    width = max(len(p) for p in prompts) + max_new
    for _ in range(max_new):
        batch = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            batch[b, : len(s)] = s
        logits = full_logits(m.config, m.params, batch)
        for b, s in enumerate(seqs):
            if not done[b]:
                s.append(int(np.argmax(logits[b, len(s) - 1])))
                done[b] = s[-1] in eos
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def chi2_pvalue(counts, probs, *, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of counts[K] to probs[K] (float64, renormalised).

    Cells whose expected count is below min_expected are merged into one cell (dropped if that
    merged cell is still too small). A count in a cell of probability zero gives p-value 0.
    """
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    if np.any(counts[probs <= 0] > 0):
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    observed, wanted = list(counts[big]), list(expected[big])
    if expected[~big].sum() >= min_expected:
        observed.append(counts[~big].sum())
        wanted.append(expected[~big].sum())
    observed, wanted = np.asarray(observed), np.asarray(wanted)
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    return float(stats.chi2.sf(statistic, df=len(observed) - 1))
