"""Draft names, one grammar for the CLI's validation and the API.

    default            the trained draft head shipped for the target with prompt lookup first,
                       or none (the API decides: api.default_draft)
    none               plain decoding
    ngram[:N]          prompt lookup over the row's own tokens, longest suffix N (default 3,
                       at most NGRAM_MAX: the draft is unrolled over suffix lengths)
    layerskip:K        the target's first K layers as its own draft
    anything else      a model sharing the target's tokenizer, or a draft head checkpoint:
                       a path or a model name
    DRAFT+ngram[:N]    prompt lookup first, DRAFT (one of the above but none and ngram) where
                       the row's last tokens did not occur before (drafts.lookup_first)

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
    lookup: int | None = None  # DRAFT+ngram:N: N, the lookup tried first (None: no lookup)


def _number(spec: str, arg: str, default: int | None) -> int:
    if not arg and default is not None:
        return default
    if not (arg.isascii() and arg.isdigit()):
        raise UserError(f"draft {spec!r}: expected a number after ':'")
    return int(arg)


def split_lookup(spec: str) -> tuple[str, int | None]:
    """("DRAFT", N) for "DRAFT+ngram[:N]", else (spec, None); a bad N raises UserError."""
    base, plus, suffix = spec.rpartition("+")
    if not plus or not base or suffix.partition(":")[0] != NGRAM:
        return spec, None
    return base, _ngram_size(spec, suffix.partition(":")[2])


def _ngram_size(spec: str, arg: str) -> int:
    number = _number(spec, arg, NGRAM_DEFAULT)
    if not 1 <= number <= NGRAM_MAX:
        raise UserError(f"draft {spec!r}: the n-gram length must be in 1..{NGRAM_MAX}")
    return number


def parse(spec: str | None) -> DraftName:
    """Classify a draft name; a bad number after ngram:/layerskip: raises UserError."""
    if spec is not None:
        base, lookup = split_lookup(spec)
        if lookup is not None:
            name = parse(base)
            if name.kind in (NONE, NGRAM):
                raise UserError(f"draft {spec!r}: '+ngram' follows a model draft or a draft "
                                f"head, not {base!r}")
            return dataclasses.replace(name, lookup=lookup)
    if spec is None or spec == NONE:
        return DraftName(NONE)
    if spec == DEFAULT:
        return DraftName(DEFAULT)
    kind, colon, arg = spec.partition(":")
    if kind == NGRAM:
        return DraftName(NGRAM, number=_ngram_size(spec, arg))
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


def lookup_first(draft, max_ngram: int, target, skip_fallback: bool = True):
    """The loop draft `draft` (not model-free) with prompt lookup (longest suffix max_ngram)
    tried first (drafts.lookup_first); γ: the draft's own measured γ, if it has one."""
    from jaxspec.drafts.lookup_first import LookupFirst
    from jaxspec.drafts.ngram import NgramDraft

    lookup = NgramDraft(max_ngram=max_ngram, target_vocab=target.config.vocab_size)
    return LookupFirst(draft, lookup, gamma=getattr(draft, "gamma", LookupFirst.gamma),
                       skip_fallback=skip_fallback)
