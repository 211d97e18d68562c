"""The one validation layer of the public surface, shared by the library and the CLI (no JAX
import at module level: the CLI validates its flags before loading anything).

Every argument of `SpeculativeDecoder(...)`, `.generate(...)`, `.memory_plan(...)`,
`load_model(...)` and `python -m jaxspec.generate` goes through a check here, so the API and the
CLI accept the same values. A bad value raises `UserError` with one line that names the
argument, the value and what is allowed. `flags=True` names the CLI flags (`--top-p`) instead
of the keyword arguments (`top_p`).

Integers are Python or NumPy integers (never bools, never floats: 3.0 is refused rather than
truncated) and must fit the int32 scalars of the compiled programs; seeds fit uint32. Floats
are finite.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np

from jaxspec.errors import UserError

MAX_SPECULATIVE_TOKENS = 32
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1  # seeds are u32 words (one per row, or one for the batch)
MODES = ("dynamic", "chunked", "static")


def _name(arg: str, flags: bool) -> str:
    return "--" + arg.replace("_", "-") if flags else arg


def show(value) -> str:
    """A short repr of a bad value for an error line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(arg: str, value, lo: int, hi: int = INT32_MAX, *, flags: bool = False) -> int:
    """`value` as an int in lo..hi, else UserError naming `arg`."""
    if not is_integer(value) or not lo <= value <= hi:
        raise UserError(f"{_name(arg, flags)} must be an integer in {lo}..{hi}, "
                        f"got {show(value)}")
    return int(value)


def real(arg: str, value, allowed: str, ok, *, flags: bool = False) -> float:
    """`value` as a finite float for which ok(value) holds; else UserError saying `allowed`."""
    number = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
              and math.isfinite(value))
    if not (number and ok(float(value))):
        raise UserError(f"{_name(arg, flags)} must be {allowed}, got {show(value)}")
    return float(value)


def one_of(arg: str, value, choices: Sequence, *, flags: bool = False):
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{_name(arg, flags)} must be one of {', '.join(map(str, choices))}, "
                        f"got {show(value)}")
    return value


def check_sampling(temperature, top_k, top_p, *, flags: bool = False) -> None:
    real("temperature", temperature, "a finite number >= 0 (0 = greedy)", lambda t: t >= 0,
         flags=flags)
    real("top_p", top_p, "a number in (0, 1]", lambda p: 0 < p <= 1, flags=flags)
    integer("top_k", top_k, 0, flags=flags)


def check_max_new_tokens(max_new_tokens, *, flags: bool = False) -> int:
    return integer("max_new_tokens", max_new_tokens, 1, flags=flags)


def check_speculative_tokens(n, *, flags: bool = False) -> None:
    """None (the draft's or the default γ), 1..MAX_SPECULATIVE_TOKENS, or "auto" (chosen by
    measurement: jaxspec.tuning)."""
    if n is None or n == "auto":
        return
    if not is_integer(n) or not 1 <= n <= MAX_SPECULATIVE_TOKENS:
        raise UserError(f"{_name('num_speculative_tokens', flags)} must be in "
                        f"1..{MAX_SPECULATIVE_TOKENS} or 'auto', got {show(n)}")


def check_seed(seed, batch: int | None = None, *, flags: bool = False) -> int | list[int]:
    """One int in 0..SEED_MAX for the batch, or (the API, given `batch`) one per prompt."""
    if is_integer(seed) or batch is None or isinstance(seed, (str, bytes)):
        return integer("seed", seed, 0, SEED_MAX, flags=flags)
    try:
        seeds = list(seed)
    except TypeError:
        raise UserError(f"seed must be an integer in 0..{SEED_MAX} or one per prompt, got "
                        f"{show(seed)}") from None
    if len(seeds) != batch:
        raise UserError(f"seed: got {len(seeds)} seeds for {batch} prompts (give one int, or "
                        "one per prompt)")
    return [integer(f"seed[{i}]", s, 0, SEED_MAX) for i, s in enumerate(seeds)]


def _rows(prompts) -> list:
    """The rows of `prompts` (a sequence, or an array with a leading axis), else UserError."""
    if isinstance(prompts, (str, bytes)):
        raise UserError(f"prompts must be a list of prompts, each a list of token ids (encode "
                        f"text with the model's tokenizer first), got {show(prompts)}")
    if hasattr(prompts, "__array__") and not isinstance(prompts, Sequence):
        prompts = np.asarray(prompts)  # a NumPy or JAX array [B, P]
    if isinstance(prompts, np.ndarray) and prompts.ndim != 2:
        raise UserError(f"prompts: an array of prompts must be 2-D [batch, length], got shape "
                        f"{prompts.shape}")
    if not isinstance(prompts, (Sequence, np.ndarray)):
        raise UserError(f"prompts must be a list of prompts, each a list of token ids, got "
                        f"{show(prompts)}")
    if len(prompts) == 0:
        raise UserError("prompts is empty: give at least one prompt")
    return list(prompts)


def _prompt(i: int, row, vocab: int) -> list[int]:
    if hasattr(row, "__array__") and not isinstance(row, Sequence):
        row = np.asarray(row)
    if isinstance(row, np.ndarray):
        if row.ndim != 1:
            raise UserError(f"prompts[{i}] must be a list of token ids, got an array of shape "
                            f"{row.shape}")
        if (row.dtype.kind in "iu" and row.size and row.min() >= 0
                and row.max() < vocab):  # the common case, checked without a Python loop
            return row.tolist()
        row = list(row)  # the loop below names the bad id
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise UserError(f"prompts[{i}] must be a list of token ids (encode text with the "
                        f"model's tokenizer first), got {show(row)}")
    if len(row) == 0:
        raise UserError(f"prompts[{i}] is empty: every prompt needs at least one token")
    for j, token in enumerate(row):
        if not is_integer(token) or not 0 <= token < vocab:
            raise UserError(f"prompts[{i}][{j}] must be a token id, an integer in "
                            f"0..{vocab - 1}, got {show(token)}")
    return [int(t) for t in row]


def check_prompts(prompts, vocab: int) -> list[list[int]]:
    """Prompts as lists of Python ints: a sequence of token-id sequences (lists, tuples, 1-D
    integer arrays) or a 2-D integer array, ids in 0..vocab-1."""
    return [_prompt(i, row, vocab) for i, row in enumerate(_rows(prompts))]


def check_callback(arg: str, value) -> None:
    if value is not None and not callable(value):
        raise UserError(f"{arg} must be a function or None, got {show(value)}")


def check_parallel(tp, dp, *, flags: bool = False) -> None:
    integer("tp", tp, 1, flags=flags)
    integer("dp", dp, 1, flags=flags)


def check_source(arg: str, source) -> str:
    """A path or model name (str or os.PathLike) as a str."""
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"{arg} must be a path or model name, got {show(source)}")
    return os.fspath(source)


def check_decoder(num_speculative_tokens, mode, static_iterations, prng_impl, tp, dp) -> None:
    """SpeculativeDecoder's scalar arguments (the target, draft and device are checked where
    they are resolved)."""
    check_speculative_tokens(num_speculative_tokens)
    if mode is not None:
        one_of("mode", mode, MODES)
    integer("static_iterations", static_iterations, 1)
    check_prng_impl(prng_impl)
    check_parallel(tp, dp)


def check_prng_impl(prng_impl) -> None:
    """None or a PRNG implementation JAX knows ("threefry2x32", "rbg", ...; asks JAX)."""
    if prng_impl is None:
        return
    import jax

    try:
        jax.random.key(0, impl=prng_impl)
    except (ValueError, TypeError) as e:
        raise UserError(f"prng_impl: {' '.join(str(e).split())}") from None
