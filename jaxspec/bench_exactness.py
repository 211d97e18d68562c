"""Greedy exactness, measured: speculative output against plain output, token for token.

In exact arithmetic the two are identical (the verify keeps exactly the target's argmaxes). In
floating point the target's logits for a position come from a verify over γ + 1 positions in
one case and from a one-token step in the other; a backend whose products round differently
with the number of rows (bf16 on GPU) can then pick the other token at a near-tie, and the
outputs part from there. This counts how often that happens: per γ, each prompt is decoded at
batch 1 by both, and the first differing position (if any) is recorded, with the gap between
the plain run's two best logits there (how near the tie was).
"""

from __future__ import annotations

import numpy as np

from jaxspec.models import decoder
from jaxspec.xla_options import compiler_options


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """The first index where a and b differ (a length difference counts), or None."""
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return index if index is not None or len(a) == len(b) else min(len(a), len(b))


def top2_gap(target, tokens: list[int]) -> float:
    """The target's best logit minus its second best after `tokens`, from one prefill over
    them (an estimate of how near the tie was: neither decoding path computed it this way)."""
    import jax
    import jax.numpy as jnp

    from jaxspec.models import layout as layouts
    from jaxspec.models.cache import init_cache

    ids = jnp.asarray([tokens], jnp.int32)
    positions = jnp.arange(len(tokens), dtype=jnp.int32)[None]
    cache = init_cache(target.config, 1, len(tokens), target.params["embed"].dtype,
                       target.layout or layouts.default())
    forward = jax.jit(decoder.forward, static_argnums=0, compiler_options=compiler_options())
    logits, _, _ = forward(target.config, target.params, ids, positions, cache)
    top = np.sort(np.asarray(logits[0, -1], np.float32))[-2:]
    return float(top[1] - top[0])


def run(target, draft, gammas, prompts: list[list[int]], max_new_tokens: int,
        progress=lambda it: it) -> dict:
    """Per γ: how many prompts' speculative output differs from the plain output, where."""
    from jaxspec import SpeculativeDecoder

    plain = SpeculativeDecoder(target, None)
    reference = [plain.generate([p], max_new_tokens=max_new_tokens).tokens[0] for p in prompts]
    rows = []
    for gamma in progress(gammas):
        spec = SpeculativeDecoder(target, draft, num_speculative_tokens=gamma)
        outputs = [spec.generate([p], max_new_tokens=max_new_tokens).tokens[0] for p in prompts]
        mismatches = []
        for prompt, ref, out in zip(prompts, reference, outputs):
            at = first_mismatch(ref, out)
            if at is not None:
                gap = top2_gap(target, prompt + ref[:at]) if at < len(ref) else None
                mismatches.append({"position": at, "top2_gap": gap})
        rows.append({"gamma": gamma, "prompts": len(prompts),
                     "mismatching_prompts": len(mismatches),
                     "mismatch_rate": len(mismatches) / len(prompts),
                     "tokens_compared": sum(len(r) for r in reference),
                     "mismatches": mismatches})
    return {"max_new_tokens": max_new_tokens, "rows": rows,
            "dtype": str(target.params["embed"].dtype)}


def print_table(r: dict) -> None:
    print(f"greedy speculative vs plain output, {r['dtype']}, {r['max_new_tokens']} new tokens "
          "per prompt, batch 1")
    print("| γ | prompts | mismatching | rate | first mismatch (position, top-2 logit gap) |\n"
          "|---|---|---|---|---|")
    for row in r["rows"]:
        where = ", ".join(f"{m['position']} ({_gap(m['top2_gap'])})" for m in row["mismatches"])
        print(f"| {row['gamma']} | {row['prompts']} | {row['mismatching_prompts']} | "
              f"{row['mismatch_rate']:.2f} | {where or '-'} |")


def _gap(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = r["rows"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar([str(row["gamma"]) for row in rows], [row["mismatch_rate"] for row in rows])
    ax.set_xlabel("γ")
    ax.set_ylabel("prompts whose output differs")
    ax.set_ylim(0, 1)
    ax.set_title(f"greedy exactness, {r['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
