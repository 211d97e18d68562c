"""jaxspec.pytree: frozen dataclasses that are pytrees (children and static fields)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxspec import pytree


@pytree.dataclass
class Pair:
    a: jax.Array
    b: jax.Array
    tag: str = pytree.static(default="x")


def test_children_are_leaves_and_static_fields_are_in_the_treedef():
    p = Pair(jnp.ones(2), jnp.zeros(3), tag="y")
    leaves, treedef = jax.tree.flatten(p)
    assert [x.shape for x in leaves] == [(2,), (3,)]
    assert jax.tree.unflatten(treedef, leaves).tag == "y"
    assert treedef != jax.tree.structure(Pair(jnp.ones(2), jnp.zeros(3)))  # tag differs
    doubled = jax.tree.map(lambda x: x * 2, p)
    assert isinstance(doubled, Pair) and doubled.tag == "y"


def test_replace_copies_and_instances_are_frozen():
    p = Pair(jnp.ones(2), jnp.zeros(3))
    q = p.replace(b=jnp.ones(3))
    assert float(q.b.sum()) == 3 and float(p.b.sum()) == 0 and q.a is p.a
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.a = jnp.zeros(2)


def test_a_static_field_is_part_of_a_jitted_programs_key():
    traces = []

    @jax.jit
    def f(p):
        traces.append(p.tag)
        return p.a.sum() + p.b.sum()

    f(Pair(jnp.ones(2), jnp.zeros(3)))
    f(Pair(jnp.ones(2) * 3, jnp.zeros(3)))  # same tag: no new trace
    f(Pair(jnp.ones(2), jnp.zeros(3), tag="z"))
    assert traces == ["x", "z"]
