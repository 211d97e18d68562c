"""Validation of generation arguments, shared by the library and the CLI (imports no JAX).

`flags=True` names the CLI flags (`--top-p`) instead of the keyword arguments (`top_p`).
"""

from __future__ import annotations

from jaxspec.errors import UserError

MAX_SPECULATIVE_TOKENS = 32


def _name(arg: str, flags: bool) -> str:
    return "--" + arg.replace("_", "-") if flags else arg


def check_sampling(temperature: float, top_k: int, top_p: float, *, flags: bool = False) -> None:
    if not temperature >= 0:  # also rejects nan
        raise UserError(f"{_name('temperature', flags)} must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"{_name('top_p', flags)} must be in (0, 1], got {top_p}")
    if top_k < 0 or int(top_k) != top_k:
        raise UserError(f"{_name('top_k', flags)} must be an integer >= 0, got {top_k}")


def check_max_new_tokens(max_new_tokens: int, *, flags: bool = False) -> None:
    if max_new_tokens < 1:
        raise UserError(f"{_name('max_new_tokens', flags)} must be >= 1, got {max_new_tokens}")


def check_speculative_tokens(n: int | str, *, flags: bool = False) -> None:
    """1..MAX_SPECULATIVE_TOKENS, or "auto" (chosen by measurement: jaxspec.tuning)."""
    if n == "auto":
        return
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPECULATIVE_TOKENS:
        raise UserError(f"{_name('num_speculative_tokens', flags)} must be in "
                        f"1..{MAX_SPECULATIVE_TOKENS} or 'auto', got {n!r}")
