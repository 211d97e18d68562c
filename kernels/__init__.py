"""Backend kernels for jaxspec, imported as `jaxspec.kernels`.

The seam is the rejection-sampling contract of `jaxspec.decode.rejection`
(draft_tokens[B, γ], q[B, γ, V], p[B, γ+1, V], uniforms[B, γ+1]) -> (n_accepted[B],
tokens[B, γ+1]), and its greedy limit. An implementation is a `Rejection` (name, sampled,
greedy) that the loop's static spec names (`LoopSpec.rejection`); each is tested against the
pure jax.numpy reference on identical inputs, uniforms included.

Only the reference ships today: every platform uses it. A Trainium (NKI) implementation will
register here and be picked for the "neuron" platform.
"""

from __future__ import annotations

from jaxspec.decode.rejection import REFERENCE, Rejection

IMPLEMENTATIONS: dict[str, Rejection] = {REFERENCE.name: REFERENCE}


def for_platform(platform: str) -> Rejection:
    """The rejection implementation for a JAX platform name ("cpu", "gpu", "neuron", ...)."""
    return REFERENCE


__all__ = ["IMPLEMENTATIONS", "REFERENCE", "Rejection", "for_platform"]
