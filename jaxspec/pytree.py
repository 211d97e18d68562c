"""Frozen dataclasses that are JAX pytrees, with a `replace` method.

What `flax.struct.dataclass` gives, on `jax.tree_util.register_dataclass` alone: importing
flax (it loads flax.linen) cost every CLI process about 0.3 s.
"""

from __future__ import annotations

import dataclasses

import jax


def dataclass(cls):
    """A frozen dataclass registered as a pytree: every field is a child unless made `static`."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.replace = _replace
    return jax.tree_util.register_dataclass(cls)


def static(**kwargs):
    """A field kept in the treedef (hashable; part of a jitted program's key), not a child."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _replace(self, **changes):
    """A copy with `changes` applied (dataclasses.replace)."""
    return dataclasses.replace(self, **changes)
