"""The reference rejection sampler (jaxspec.decode.rejection), re-exported where it used to live."""

from jaxspec.decode.rejection import REFERENCE, Rejection, rejection, rejection_greedy  # noqa: F401
