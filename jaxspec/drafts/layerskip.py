"""Self-speculation draft: the target's first k layers, its final norm and its output layer."""

from __future__ import annotations

import dataclasses

from jaxspec.errors import UserError


def layerskip(target, num_layers: int):
    """A draft model sharing the target's arrays (no copy) but running only num_layers layers."""
    if not 1 <= num_layers < target.config.num_layers:
        raise UserError(f"layerskip needs 1 <= layers < {target.config.num_layers}, "
                        f"got {num_layers}")
    config = dataclasses.replace(target.config, num_layers=num_layers)
    params = {**target.params, "layers": target.params["layers"][:num_layers]}
    return dataclasses.replace(target, config=config, params=params)


def parse(spec: str, target):
    """`layerskip:K` -> the draft model, or None when spec is not a layerskip spec."""
    kind, _, arg = spec.partition(":")
    if kind != "layerskip":
        return None
    if not arg.isdigit():
        raise UserError(f"draft {spec!r}: expected layerskip:K with K a number of layers")
    return layerskip(target, int(arg))
