"""Random inputs of the rejection contract for the kernel tests (NumPy, fp32).

Rows of a batch cycle through four kinds of draft: "near" (q a different softmax), "equal"
(q = p: every draft accepted, the bonus drawn), "one_hot" (an n-gram draft) and "above"
(q = p·(1 + 1e-3): a rejection leaves a zero residual, so the draw falls back to p).
Probabilities are peaked softmaxes with some entries exactly zero (as after top-k/top-p) and
no subnormals (XLA on CPU flushes them to zero, NumPy does not).

`away_from_boundaries` redraws u_γ until u_γ·total is at least MARGIN·total from every CDF
boundary of the row's final distribution (computed in float64): the kernel's tiled fp32 CDF
is within ~1.5e-6·total of the exact one (XLA's cumsum within ~3e-7), so beyond the margin
both count the same entries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

F32 = np.float32
MARGIN = 1e-5
KINDS = ("near", "equal", "one_hot", "above")


@dataclasses.dataclass
class Inputs:
    drafts: np.ndarray  # [B, γ] int32
    q: np.ndarray  # [B, γ, V] f32
    p: np.ndarray  # [B, γ+1, V] f32
    u: np.ndarray  # [B, γ+1] f32


def probabilities(rng, shape, scale=3.0, zero_fraction=0.3) -> np.ndarray:
    """Peaked fp32 distributions [..., V] with some exact zeros (never the row's maximum)."""
    logits = rng.standard_normal(shape) * scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    zero = rng.random(shape) < zero_fraction
    np.put_along_axis(zero, np.argmax(logits, -1)[..., None], False, -1)
    w[zero] = 0.0
    w = (w / w.sum(-1, keepdims=True)).astype(F32)
    w[w < 1e-30] = 0.0
    return w


def uniforms(rng, shape) -> np.ndarray:
    """fp32 uniforms in [0, 1) on the 2^-23 grid, as the loop's `sampling.uniforms`."""
    return (rng.integers(0, 2**23, shape) / 2**23).astype(F32)


def draw(rng, weights: np.ndarray) -> np.ndarray:
    """One index per row of weights [..., V] with positive weight (float64 inverse CDF)."""
    cdf = np.cumsum(weights.astype(np.float64), -1)
    u = rng.random(weights.shape[:-1])[..., None] * cdf[..., -1:]
    index = np.minimum(np.sum(cdf <= u, -1), weights.shape[-1] - 1)
    last_positive = weights.shape[-1] - 1 - np.argmax(weights[..., ::-1] > 0, -1)
    return np.minimum(index, last_positive).astype(np.int32)


def random_inputs(rng, batch: int, gamma: int, vocab: int) -> Inputs:
    """Inputs with rows of every kind (see the module docstring), drafts drawn from q."""
    p = probabilities(rng, (batch, gamma + 1, vocab))
    q = probabilities(rng, (batch, gamma, vocab))
    u = uniforms(rng, (batch, gamma + 1))
    for b in range(batch):
        kind = KINDS[b % len(KINDS)]
        if kind == "equal":
            q[b] = p[b, :gamma]
        elif kind == "above":
            q[b] = p[b, :gamma] * F32(1.001)
            high = rng.random(gamma) < 0.5  # these positions reject (u·q(x) >= p(x))
            u[b, :gamma][high] = (1 - rng.integers(1, 400, int(high.sum())) / 2**20).astype(F32)
    drafts = draw(rng, q) if gamma else np.zeros((batch, 0), np.int32)
    for b in range(batch):
        if KINDS[b % len(KINDS)] == "one_hot":
            q[b] = 0.0
            q[b, np.arange(gamma), drafts[b]] = 1.0
    return Inputs(drafts, q, p, u)


def final_weights(inputs: Inputs, n: np.ndarray) -> np.ndarray:
    """[B, V] fp32 the distribution the token at position n[b] is drawn from (the contract)."""
    batch, gamma = inputs.drafts.shape
    rows = np.arange(batch)
    p_n = inputs.p[rows, n]
    q_n = inputs.q[rows, np.minimum(n, gamma - 1)] if gamma else np.zeros_like(p_n)
    q_n = np.where((n < gamma)[:, None], q_n, F32(0))
    residual = np.maximum(p_n - q_n, F32(0))
    return np.where(residual.sum(-1, keepdims=True) > 0, residual, p_n)


def margin(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """[B] distance of u·total to the nearest CDF boundary, as a fraction of the total."""
    cdf = np.cumsum(weights.astype(np.float64), -1)
    total = cdf[:, -1]
    return np.min(np.abs(cdf - (u.astype(np.float64) * total)[:, None]), -1) / total


def away_from_boundaries(rng, inputs: Inputs, n: np.ndarray) -> Inputs:
    """The same inputs with u_γ redrawn where it lies within MARGIN of a CDF boundary."""
    weights = final_weights(inputs, n)
    u = inputs.u.copy()
    for _ in range(100):
        close = margin(weights, u[:, -1]) < MARGIN
        if not close.any():
            return dataclasses.replace(inputs, u=u)
        u[close, -1] = uniforms(rng, int(close.sum()))
    raise AssertionError("could not place u away from the CDF boundaries")
