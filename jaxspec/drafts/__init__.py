"""Drafts: what proposes tokens for the target to verify.

A draft object is static (hashable) and has `init_cache(batch, max_len, dtype)`,
`prefill(params, prompt, cache)` and `propose(params, cache, tokens, lengths, *, gamma,
sampler, values, uniforms) -> (draft_tokens[B, γ], q[B, γ, V] or None when greedy, cache)`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxspec.drafts.compat import check_compatible
from jaxspec.drafts.layerskip import layerskip
from jaxspec.drafts.model import ModelDraft
from jaxspec.drafts.ngram import NgramDraft
from jaxspec.errors import UserError


def _number(spec: str, arg: str, default: int | None) -> int:
    if not arg and default is not None:
        return default
    if not arg.isdigit():
        raise UserError(f"draft {spec!r}: expected a number after ':'")
    return int(arg)


def resolve(draft, target):
    """(draft object for the loop, draft model holding params, or None).

    `draft`: None or "none"; "ngram[:N]" (prompt lookup, longest suffix N, default 3);
    "layerskip:K" (the target's first K layers); a model from load_model; or a checkpoint path.
    """
    if draft is None or draft == "none":
        return None, None
    vocab = target.config.vocab_size
    if isinstance(draft, str):
        kind, _, arg = draft.partition(":")
        if kind == "ngram":
            return NgramDraft(max_ngram=max(1, _number(draft, arg, 3)), target_vocab=vocab), None
        if kind == "layerskip":
            draft = layerskip(target, _number(draft, arg, None))
        else:
            from jaxspec.checkpoint import load_model

            draft = load_model(draft, dtype=jnp.dtype(target.params["embed"].dtype).name)
    check_compatible(target, draft)
    return ModelDraft(draft.config, vocab), draft
