"""Buffer sizing: how wide the prompt is padded and how many slots a row's buffer has.

Both round up to buckets so that new prompt lengths and max_new_tokens rarely recompile.
"""

from __future__ import annotations

from jaxspec.models.cache import bucket

PROMPT_BUCKET = 16  # prefill is compute-bound: its cost follows the padded width


def required_len(prompt_width: int, max_new_tokens: int, gamma: int) -> int:
    """Slots a row needs: its prompt, max_new_tokens, and room for one more verify.

    The last iteration starts with at most prompt + max_new_tokens - 1 tokens and writes
    γ + 1 tokens (and their keys/values) after them; one spare slot keeps it simple.
    """
    return prompt_width + max_new_tokens + gamma + 1


def prompt_width(length: int) -> int:
    """Padded prompt width [P]: a multiple of 16."""
    return bucket(length, PROMPT_BUCKET)


def loop_max_len(prompt_length: int, max_new_tokens: int, gamma: int) -> int:
    """Token buffer and KV cache slots per row [S]: required_len of the padded prompt,
    rounded up to a multiple of 128."""
    return bucket(required_len(prompt_width(prompt_length), max_new_tokens, gamma))
