"""The XLA options jaxspec compiles its own programs with, per platform: scoped to those
programs (passed to each compile), so a user's other JAX code keeps XLA's defaults.

CPU: XLA:CPU hands reductions, with the elementwise work fused around them, to YNNPACK when
their shapes are large enough, and YNNPACK's exponential and summation order are not XLA's.
The softmax row of a position inside a 5-token verify then rounded differently from the same
row of a one-token step (1 ulp), so a row's numbers depended on how many positions were
computed with it. In bf16 the activations' rounding amplified that until greedy tokens flipped
at near-ties: greedy speculative output differed from plain output on 7 of 12 prompts × 128
tokens (SmolLM2-135M's shape, bf16, γ 2, 3 and 4), and on none with the reductions left to XLA
(`scripts/benchmark.py --exactness`). With the attention products' operands in the order
`decoder.attention` gives them (the cache on the left), a verified position then equals a
one-token step bit for bit, in fp32 and bf16 (tests/models/test_decoder.py,
tests/test_xla_options.py). Dots stay on YNNPACK, as XLA's default has them. Decoding speed
did not change (measured).

Compile sites pass `compiler_options(device)`; module-level programs use `jit`, which looks the
options up at each call. An XLA that no longer knows an option (a later jaxlib) compiles with
its defaults instead: `compiler_options` tries them once per platform on a trivial program.
"""

from __future__ import annotations

import functools

# XLA's default YNNPACK fusions minus LIBRARY_FUSION_TYPE_REDUCE
OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type":
                   "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}


def compiler_options(device=None) -> dict:
    """The options for programs compiled for `device` (a jax.Device; None: where JAX places
    new arrays now, i.e. a `jax.default_device` in effect or the default backend), as
    `jax.jit(..., compiler_options=...)` and `Lowered.compile` take them; {} on platforms with
    none. Pass them to your own `jax.jit` of `jaxspec.generate_tokens` to get the numerics
    jaxspec's own programs have."""
    import jax

    from jaxspec import devices

    if device is None:
        current = jax.config.jax_default_device  # a Device, a platform name or None
        platform = (devices.canonical(current) if isinstance(current, str)
                    else devices.platform(current))
    else:
        platform = devices.platform(device)
    return dict(_accepted(platform))


def jit(fun, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` compiled with the options for the platform it is called on
    (as `compiler_options()` finds it at each call), for jaxspec's module-level programs."""

    def jitted():
        return _jitted(fun, tuple(jit_kwargs.items()), tuple(compiler_options().items()))

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
    return call


@functools.cache
def _jitted(fun, jit_kwargs: tuple, options: tuple):
    import jax

    return jax.jit(fun, **dict(jit_kwargs), compiler_options=dict(options))


@functools.cache
def _accepted(platform: str) -> tuple:
    options = OPTIONS.get(platform, {})
    if not options:
        return ()
    import jax
    import numpy as np

    from jaxspec import compile_cache, devices

    compile_cache.enable()  # JAX decides at a process's first compile whether it caches
    try:
        with devices.on(devices.first_device(platform)):
            jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError:  # an option this XLA does not know: its defaults
        return ()
    return tuple(options.items())
