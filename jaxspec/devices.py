"""Backend selection: the JAX device that jaxspec places params on and runs its programs on.

`resolve(device)` turns what the user asked for into a device:

  None               None: JAX's default backend, nothing placed explicitly (the historical
                     behaviour)
  "auto"             the first device of the first platform JAX reports among neuron, gpu, cpu
  "cpu" "gpu" "neuron"
                     the first device of that platform; one JAX does not see raises UserError
                     naming the platforms it does see
  a jax.Device       used as it is

JAX probes a platform with `jax.devices(name)`, which raises RuntimeError when it is absent.
"gpu" covers CUDA and ROCm (devices report "gpu", their clients "cuda"/"rocm"); Trainium is
"neuron" (the Neuron PJRT plugin of jax-neuronx). `platform(device)` gives the canonical name
that the per-platform choices key on: the layout policy (`models.layout.for_platform`), the
rejection kernel (`jaxspec.kernels.for_platform`) and `loop_defaults` (Trainium: static loop
mode and the "rbg" PRNG).

Importing this module imports no JAX (the CLI imports it before parsing its flags).
"""

from __future__ import annotations

import contextlib

from jaxspec.errors import UserError

CHOICES = ("auto", "cpu", "gpu", "neuron")
AUTO_ORDER = ("neuron", "gpu", "cpu")  # what "auto" tries, first found wins
GPU_NAMES = frozenset({"gpu", "cuda", "rocm"})
NEURON = "neuron"


def canonical(name: str) -> str:
    """A platform name as jaxspec keys on it: "cuda"/"rocm" -> "gpu", others unchanged."""
    return "gpu" if name in GPU_NAMES else name


def first_device(name: str):
    """The first device of platform `name`, or None when JAX reports no such platform."""
    import jax

    try:
        found = jax.devices(name)
    except RuntimeError:
        return None
    return found[0] if found else None


def available() -> list[str]:
    """The platforms (among neuron, gpu, cpu, and the default backend) that JAX sees."""
    import jax

    seen = {canonical(jax.default_backend())}
    seen.update(name for name in AUTO_ORDER if first_device(name) is not None)
    return sorted(seen)


def resolve(device):
    """None, "auto", "cpu", "gpu", "neuron" or a jax.Device -> a jax.Device, or None for
    JAX's default backend; raises UserError for a platform JAX does not see."""
    import jax

    if device is None or isinstance(device, jax.Device):
        return device
    if device not in CHOICES:
        raise UserError(f"device must be one of {', '.join(CHOICES)} or a jax.Device, got "
                        f"{device!r}")
    for name in (AUTO_ORDER if device == "auto" else (device,)):
        found = first_device(name)
        if found is not None:
            return found
    raise UserError(f"device {device!r} is not available: JAX sees only "
                    f"{', '.join(available())}")


def or_default(device):
    """`device`, or the default backend's first device for None (where arrays then land)."""
    import jax

    return device if device is not None else jax.devices()[0]


def platform(device) -> str:
    """The canonical platform of `device` (None: JAX's default backend)."""
    import jax

    return canonical(device.platform if device is not None else jax.default_backend())


def loop_defaults(platform_name: str, mode: str | None, prng_impl: str | None):
    """(mode, prng_impl) with the platform's defaults filled in for None.

    Trainium ("neuron"): static mode (neuronx-cc needs static trip counts, so the while loops
    of dynamic and chunked modes are refused) and the "rbg" PRNG (threefry is not fully
    supported). Elsewhere: dynamic mode and JAX's default PRNG.
    """
    if platform_name != NEURON:
        return mode or "dynamic", prng_impl
    if mode not in (None, "static"):
        raise UserError("the neuron device runs only mode='static' (neuronx-cc needs static "
                        "loop trip counts)")
    return "static", prng_impl or "rbg"


def streaming_mode(platform_name: str) -> str:
    """The loop mode that streams (returns to the host every few iterations): static on
    Trainium, chunked elsewhere (no idle iterations once every row is done)."""
    return "static" if platform_name == NEURON else "chunked"


def put(tree, device):
    """`tree` committed to `device` (unchanged for None: JAX's default placement)."""
    import jax

    return tree if device is None else jax.device_put(tree, device)


def on(device):
    """A context in which new arrays and compiled programs default to `device` (None: no
    change)."""
    import jax

    return contextlib.nullcontext() if device is None else jax.default_device(device)
