"""Host-side summary of the statistics the loop counted (same keys for the API and `--json`)."""

from __future__ import annotations

import numpy as np

from jaxspec.decode.state import DecodeState


def _rates(iterations: int, accepted: int, proposed: int) -> dict:
    return {
        "draft_tokens_proposed": proposed,
        "draft_tokens_accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        # tokens per verify step, the bonus/replacement token included
        "mean_accepted_length": (accepted + iterations) / iterations if iterations else 0.0,
    }


def summarize(state: DecodeState, *, gamma: int, draft, wall_seconds: float,
              compile_seconds: float, draft_state=None) -> dict:
    """Overall and per-row statistics of a finished generation (draft: the loop's draft object
    or None; it counts its own forward passes, zero for model-free drafts, from its final
    `draft_state` where they depend on the text)."""
    lengths, prompt_lengths = np.asarray(state.lengths), np.asarray(state.prompt_lengths)
    iterations = np.asarray(state.stats.iterations)
    accepted = np.asarray(state.stats.accepted)
    proposed = np.asarray(state.stats.proposed)
    verified = np.asarray(state.stats.verified)
    per_position = np.asarray(state.stats.accepted_per_position)  # [B, γ]
    new = lengths - prompt_lengths
    steps = int(np.asarray(state.step))
    rows = [
        {"new_tokens": int(new[b]), "prompt_tokens": int(prompt_lengths[b]),
         **_rates(int(iterations[b]), int(accepted[b]), int(proposed[b])),
         "accepted_per_position": per_position[b].tolist(),
         "target_forward_calls": 1 + int(iterations[b]),
         "target_positions_verified": int(verified[b])}
        for b in range(len(lengths))
    ]
    return {
        "new_tokens": int(new.sum()),
        "prompt_tokens": int(prompt_lengths.sum()),
        "tokens_per_second": float(new.sum() / wall_seconds) if wall_seconds > 0 else 0.0,
        "wall_seconds": wall_seconds,
        "compile_seconds": compile_seconds,
        "num_speculative_tokens": gamma,
        **_rates(int(iterations.sum()), int(accepted.sum()), int(proposed.sum())),
        "accepted_per_position": per_position.sum(axis=0).tolist(),
        "target_forward_calls": 1 + steps,  # prefill + one verify per iteration (whole batch)
        # positions verified while each row was active (γ + 1 an iteration; 1 where none of
        # the batch's rows proposed), summed over rows
        "target_positions_verified": int(verified.sum()),
        "draft_forward_calls": (draft.forward_calls(gamma, steps, draft_state)
                                if draft is not None else 0),
        "rows": rows,
    }
