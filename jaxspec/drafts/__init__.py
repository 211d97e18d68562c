"""Drafts: what proposes tokens for the target to verify.

`base` declares the protocol every draft implements (state, prefill, propose, observe) and
`registry` the names drafts are given by. One module per kind: `model_draft` (a smaller model
sharing the target's tokenizer), `layerskip` (the target's first K layers), `ngram` (prompt
lookup, no model). Importing this package imports no JAX.
"""
