"""Training a draft head (jaxspec.drafts.head) on the target's own outputs.

`prompts` makes the training prompts, `record` generates on-policy data with the target
(hidden states and top logits recorded as it decodes), `objective` is the unrolled forward-KL
loss, `trainer` the optax loop with Orbax checkpoints and resume. `scripts/train_draft.py` is
the command line.
"""
