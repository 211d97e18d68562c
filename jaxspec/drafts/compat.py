"""Draft/target compatibility, checked before anything compiles."""

from __future__ import annotations

from jaxspec.errors import UserError


def check_compatible(target, draft) -> None:
    """Refuse a draft whose tokenizer differs from the target's.

    Embedding tables may differ by padding rows (Qwen2.5-0.5B has 151,936, Qwen2.5-7B 152,064):
    the loop masks the ids one side lacks. When both models carry tokenizers, their vocabularies
    must be identical; id-only models (no tokenizer files) are checked on EOS ids alone.
    """
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    if t_tok is not None and d_tok is not None and t_tok.get_vocab() != d_tok.get_vocab():
        raise UserError(
            f"draft tokenizer differs from the target's ({len(d_tok)} vs {len(t_tok)} tokens, "
            "or different ids): the draft must share the target's tokenizer"
        )
    t_eos, d_eos = set(target.config.eos_token_ids), set(draft.config.eos_token_ids)
    if t_eos and d_eos and not t_eos & d_eos:
        raise UserError(f"draft EOS ids {sorted(d_eos)} share nothing with the target's "
                        f"{sorted(t_eos)}: the draft must share the target's tokenizer")
