"""Backend kernels for jaxspec, imported as `jaxspec.kernels`.

The seam is the rejection-sampling contract of `jaxspec.decode.rejection`
(draft_tokens[B, γ], q[B, γ, V], p[B, γ+1, V], uniforms[B, γ+1]) -> (n_accepted[B],
tokens[B, γ+1]), and its greedy limit (draft_tokens[B, γ], the target's logits[B, γ+1, V]) ->
(n_accepted[B], argmaxes[B, γ+1]). An implementation is a `Rejection` (name, sampled,
greedy) that the loop's static spec names (`LoopSpec.rejection`); each is tested against the
pure jax.numpy reference on identical inputs, uniforms included.

Implementations: the reference (every platform), and "nki" (`nki_rejection`, a Trainium NKI
kernel, picked for the "neuron" platform) registered only where the real `nki` package of
the Neuron SDK imports. The NKI kernel is written for NKI 0.6 and tested through its NumPy
model (`numpy_model`) on CPU; it has not yet run on Trainium hardware. Importing this package
never needs nki.
"""

from __future__ import annotations

from jaxspec.decode.rejection import REFERENCE, Rejection

from . import nki_rejection

IMPLEMENTATIONS: dict[str, Rejection] = {REFERENCE.name: REFERENCE}
if nki_rejection.NKI is not None:
    IMPLEMENTATIONS[nki_rejection.NKI.name] = nki_rejection.NKI


def for_platform(platform: str) -> Rejection:
    """The rejection implementation for a JAX platform name ("cpu", "gpu", "neuron", ...):
    the NKI kernel on "neuron" when nki is installed, the reference otherwise."""
    if platform == "neuron" and "nki" in IMPLEMENTATIONS:
        return IMPLEMENTATIONS["nki"]
    return REFERENCE


__all__ = ["IMPLEMENTATIONS", "REFERENCE", "Rejection", "for_platform"]
