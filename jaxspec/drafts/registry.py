"""Draft names, one grammar for the CLI's validation and the API.

    default            the trained draft head shipped for the target, or none (the API decides)
    none               plain decoding
    ngram[:N]          prompt lookup over the row's own tokens, longest suffix N (default 3,
                       at most NGRAM_MAX: the draft is unrolled over suffix lengths)
    layerskip:K        the target's first K layers as its own draft
    anything else      a model sharing the target's tokenizer, or a draft head checkpoint:
                       a path or a model name

`parse` imports no JAX (the CLI validates before loading anything); `build` makes the loop's
draft object. Loading a draft checkpoint is the API's job: `build` takes a loaded model.
"""

from __future__ import annotations

import dataclasses

from jaxspec.errors import UserError

NONE, NGRAM, LAYERSKIP, MODEL, DEFAULT = "none", "ngram", "layerskip", "model", "default"
NGRAM_DEFAULT = 3
NGRAM_MAX = 32


@dataclasses.dataclass(frozen=True)
class DraftName:
    kind: str  # DEFAULT, NONE, NGRAM, LAYERSKIP or MODEL
    number: int | None = None  # N of ngram, K of layerskip
    source: str | None = None  # MODEL: the path or model name


def _number(spec: str, arg: str, default: int | None) -> int:
    if not arg and default is not None:
        return default
    if not (arg.isascii() and arg.isdigit()):
        raise UserError(f"draft {spec!r}: expected a number after ':'")
    return int(arg)


def parse(spec: str | None) -> DraftName:
    """Classify a draft name; a bad number after ngram:/layerskip: raises UserError."""
    if spec is None or spec == NONE:
        return DraftName(NONE)
    if spec == DEFAULT:
        return DraftName(DEFAULT)
    kind, colon, arg = spec.partition(":")
    if kind == NGRAM:
        number = _number(spec, arg, NGRAM_DEFAULT)
        if not 1 <= number <= NGRAM_MAX:
            raise UserError(f"draft {spec!r}: the n-gram length must be in 1..{NGRAM_MAX}")
        return DraftName(NGRAM, number=number)
    if kind == LAYERSKIP:
        return DraftName(LAYERSKIP, number=_number(spec, arg if colon else "", None))
    return DraftName(MODEL, source=spec)


def build(draft, target):
    """(draft object for the loop, draft model holding its params, or None).

    draft: None, a name that parse() accepts other than a model source, an object that
    implements the Draft protocol (used as it is; its params, if any, come from the caller),
    or a loaded model (config and params) sharing the target's tokenizer.
    """
    from jaxspec.drafts.base import Draft
    from jaxspec.drafts.compat import check_compatible
    from jaxspec.drafts.layerskip import layerskip
    from jaxspec.drafts.model_draft import ModelDraft
    from jaxspec.drafts.ngram import NgramDraft

    vocab = target.config.vocab_size
    if isinstance(draft, str) or draft is None:
        name = parse(draft)
        if name.kind == NONE:
            return None, None
        if name.kind == NGRAM:
            return NgramDraft(max_ngram=name.number, target_vocab=vocab), None
        if name.kind in (MODEL, DEFAULT):
            raise TypeError(f"registry.build takes a loaded model, not {draft!r}: resolve it "
                            "first (jaxspec.api.resolve_draft)")
        draft = layerskip(target, name.number)
    elif isinstance(draft, Draft):
        return draft, None
    check_compatible(target, draft)
    return ModelDraft(draft.config, vocab), draft
