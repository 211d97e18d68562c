"""The training objective: the head unrolled over K draft steps (EAGLE-3's training-time test),
forward KL against the target's recorded distributions.

Step 1 runs every entry p of a recorded row with the target's fused feature, as `observe` and
the first proposal do at inference. Step k > 1 runs entry p with the head's own step-(k-1)
output at p - 1 as its feature, as the k-th proposal of a chain that began at p - k + 1; its
attention sees the step-1 (target-fed) keys up to p - k + 1 and one key of each later step of
its own chain (p - k + j for step j), exactly the cache a proposal sees. Entry p at any step
predicts x_{p+2}; its target is the recorded distribution at position p + 1.

Shapes: B rows, W positions, C fused streams, D hidden size, k recorded top tokens, V_d the
draft vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.drafts import head as heads
from jaxspec.models import decoder

STEP_DECAY = 0.8  # weight of step k's loss: STEP_DECAY ** (k - 1)


def _shift(x: jax.Array, m: int) -> jax.Array:
    """x[B, W, ...] moved m positions later along W (zeros first)."""
    if m == 0:
        return x
    pad = [(0, 0), (m, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad)[:, : x.shape[1]]


def _gather(x: jax.Array, entries: jax.Array) -> jax.Array:
    """x[B, W, ...] at entries[B, E] -> [B, E, ...]."""
    return jnp.take_along_axis(x, entries.reshape(entries.shape + (1,) * (x.ndim - 2)), axis=1)


def _attention(config, q, keys, values, entries) -> jax.Array:
    """Step len(keys)'s attention at entries[B, E]: q [B, E, K, G, Dh]; keys/values[0]
    [B, W, K, Dh] step 1's, at every position; keys/values[j >= 1] [B, E, K, Dh] step j + 1's,
    at the same entries -> [B, E, H·Dh]."""
    B, E = q.shape[:2]
    W = keys[0].shape[1]
    back = len(keys) - 1  # step k = back + 1
    scale = 1 / math.sqrt(config.head_dim)
    main = decoder.einsum("BTKGD,BSKD->BKGTS", q, keys[0], preferred_element_type=jnp.float32)
    visible = jnp.arange(W)[None, None] <= entries[:, :, None] - back  # [B, E, W]
    main = jnp.where(visible[:, None, None], main * scale, -jnp.inf)
    chain = [decoder.einsum("BTKGD,BTKD->BKGT", q, _shift(keys[j], back - j),
                            preferred_element_type=jnp.float32) * scale
             for j in range(1, len(keys))]
    scores = jnp.concatenate([main] + [c[..., None] for c in chain], axis=-1)  # [B,K,G,E,W+k-1]
    weights = jax.nn.softmax(scores, axis=-1).astype(values[0].dtype)
    out = decoder.einsum("BKGTS,BSKD->BTKGD", weights[..., :W], values[0])
    for j in range(1, len(keys)):
        w = weights[..., W + j - 1].transpose(0, 3, 1, 2)[..., None]  # [B, E, K, G, 1]
        out = out + w * _shift(values[j], back - j)[:, :, :, None]
    return out.reshape(B, E, -1)


def unrolled(config: heads.HeadConfig, head, embed, tokens, hidden, steps: int,
             entries: jax.Array | None = None):
    """tokens [B, W], hidden [B, W, C, D] -> outputs [steps, B, E, D] of the unrolled head at
    entries[B, E] (consecutive positions in each row, clipped repeats of W - 1 at the end
    aside; None: every position, E = W). Step 1 runs every position (its keys are what the
    later steps attend to), the later steps only the entries."""
    lc, layer = config.layer, head["layers"][0]
    B, W = tokens.shape
    every = jnp.broadcast_to(jnp.arange(W), (B, W))
    entries = every if entries is None else entries
    following = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # x_{p+1}
    inv_frequencies = decoder.inv_frequencies(lc)

    def step(at, feature, keys, values):  # at [B, T] positions, feature [B, T, D]
        rope_cs = decoder.rope_tables(at, inv_frequencies, jnp.float32)
        x = heads.layer_inputs(config, head, embed, _gather(following, at), feature)
        q, k, v = decoder.project_qkv(lc, layer, x, rope_cs)
        keys, values = keys + [k], values + [v]
        attended = decoder.dense(_attention(lc, q, keys, values, at), layer["wo"])
        return heads.layer_output(config, head, feature, attended), keys, values

    fed, keys, values = step(every, heads.fuse(head, hidden), [], [])  # [B, W, D]
    outs = [_gather(fed, entries)]
    feature = _gather(fed, jnp.maximum(entries - 1, 0))  # step 2 at p: step 1's output at p - 1
    for _ in range(1, steps):
        out, keys, values = step(entries, feature, keys, values)
        outs.append(out)
        feature = _shift(out, 1)
    return jnp.stack(outs)


def losses(config: heads.HeadConfig, params, d2t, t2d, embed, batch, steps: int,
           window: int | None = None):
    """(loss, metrics) for a batch {tokens, hidden, top_ids, top_logp, lengths,
    prompt_lengths}.

    params: the head's trainable params; d2t [V_d] draft -> target ids, t2d [V] target ->
    draft ids (-1 outside the draft vocabulary). Loss: Σ_k STEP_DECAY^(k-1) · mean over valid
    entries of the cross-entropy of the head against the target's top-k probabilities
    (forward KL up to a constant; mass outside the draft vocabulary cannot be matched).
    Metrics: the loss, per step the greedy agreement with the target's top token, and tau,
    1 + the mean length of agreeing chains over the K steps (greedy accepted tokens per
    verify if γ = K).

    Only the entries that are proposals at inference count: p >= prompt_length - 1, whose
    predictions are generated tokens (the prompt's entries are context: the head's keys). A
    prompt's own next tokens are easy to predict (every chat prompt starts with the same
    system text) and would inflate the agreement. `window` (static): at most this many entries
    per row count, from its first proposing entry on (see `window`; None: the full width).
    Only those entries go through the output layer and the unrolled steps after the first: the
    prompt's entries serve only as step 1's keys."""
    head = {**params, "d2t": d2t}
    tokens, top_ids = batch["tokens"], batch["top_ids"]
    W = tokens.shape[1]
    G = W if window is None else min(window, W)
    last = batch["lengths"][:, None] - 2  # [B, 1]: the last entry with x_{p+1} and a target
    first = batch["prompt_lengths"][:, None] - 1  # the first entry that proposes
    # the entries that may count, [B, G]; clipped ones repeat W - 1, past every row's last
    p = jnp.minimum(first + jnp.arange(G), W - 1)
    outs = unrolled(config, head, embed, tokens, batch["hidden"], steps, p)  # [K, B, G, D]
    logp = jax.nn.log_softmax(heads.head_logits(config, head, outs), axis=-1)  # [K, B, G, V_d]
    at_next = lambda x: jnp.take_along_axis(  # noqa: E731  x[B, W, k] at p + 1: [B, G, k]
        jnp.pad(x[:, 1:], ((0, 0), (0, 1), (0, 0))), p[:, :, None], axis=1)
    target_ids = at_next(top_ids)
    target_p = jnp.exp(at_next(batch["top_logp"]))  # the padded entry is never valid
    draft_ids = t2d[target_ids]  # [B, G, k]
    picked = jnp.take_along_axis(logp, jnp.maximum(draft_ids, 0)[None], axis=-1)  # [K,B,G,k]
    ce = -jnp.sum(jnp.where(draft_ids >= 0, target_p * picked, 0.0), axis=-1)  # [K, B, G]
    agree = d2t[jnp.argmax(logp, axis=-1)] == target_ids[None, :, :, 0]  # [K, B, G]
    loss, metrics = 0.0, {}
    for k in range(steps):
        valid = (p >= first + k) & (p <= last)  # step k of a chain that began at p - k
        count = jnp.maximum(jnp.sum(valid), 1)
        loss = loss + STEP_DECAY ** k * jnp.sum(jnp.where(valid, ce[k], 0.0)) / count
        metrics[f"agree{k + 1}"] = jnp.sum(valid & agree[k]) / count
    starts = (p >= first) & (p <= last + 1 - steps)
    tau = 1 + _chain_lengths(agree, steps)
    metrics["tau"] = jnp.sum(jnp.where(starts, tau, 0)) / jnp.maximum(jnp.sum(starts), 1)
    metrics["loss"] = loss
    return loss, metrics


def window(lengths, prompt_lengths) -> int:
    """The most entries any row has that propose (the `window` for `losses`): a row proposes
    from entry prompt_length - 1 to entry length - 2."""
    return max(1, int(np.max(np.asarray(lengths) - np.asarray(prompt_lengths))))


def _chain_lengths(agree, steps: int) -> jax.Array:
    """[B, G]: for a chain starting at entry s, how many of its steps agree in a row (step k
    of the chain is entry s + k - 1 of agree[k - 1]; entries consecutive along G)."""
    W = agree.shape[-1]
    alive = jnp.ones(agree.shape[1:], bool)
    total = jnp.zeros(agree.shape[1:], jnp.int32)
    for k in range(steps):
        ahead = jnp.pad(agree[k][:, k:], ((0, 0), (0, k)))[:, :W]  # agree[k] at s + k
        alive = alive & ahead
        total = total + alive
    return total
