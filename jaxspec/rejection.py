"""The reference rejection sampler, re-exported where it used to live (`jaxspec.rejection.rejection`)."""

from jaxspec.decode.rejection import REFERENCE, Rejection, rejection, rejection_greedy  # noqa: F401
