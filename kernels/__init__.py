"""Backend kernels for jaxspec, imported as `jaxspec.kernels`.

The boundary is the rejection-sampling contract of `jaxspec.rejection.rejection`
(draft_tokens[B, γ], q[B, γ, V], p[B, γ+1, V], uniforms[B, γ+1]) -> (n_accepted[B],
tokens[B, γ+1]). A kernel (NKI on Trainium) implements that same contract and is tested
against the pure jax.numpy reference on identical inputs. No kernel ships yet: every backend
uses the reference.
"""
